"""Asymmetric group-wise int4 quantization of (in, out) weights, with per-part zero padding.

Groups are g consecutive input rows. A weight whose rows will be split across tensor-parallel
ranks (row-parallel wo and w2) is quantized in `parts` equal row slices, each padded on its own
with zero rows up to a multiple of g, so every rank's file holds whole groups of its own rows
only. With parts = 1 this is the plain rule of format v1 (pad the last group).

Per group and output column: lo = min(w, 0), hi = max(w, 0) over the group's rows (padding
rows are zeros, so they never widen the range); scale = fp16((hi - lo) / 15), zero =
clamp(round(-lo / scale), 0, 15), q = clamp(round(w / scale + zero), 0, 15). Including 0 in the
range makes a zero weight, padding included, quantize to q = zero exactly.
"""

from __future__ import annotations

import torch

from lmdepot.convert.linear import Linear
from lmdepot.errors import ConvertError
from lmdepot.formats.int4 import QMAX, group_params, group_rows
from lmdepot.formats.int4 import quantize_groups as quantize

GROUP_SIZES = (32, 64, 128, 256)


def check_group_size(g: int) -> int:
    if g not in GROUP_SIZES:
        raise ConvertError(f"--w-group-size {g}: must be one of {', '.join(map(str, GROUP_SIZES))}")
    return g


def _ungrouped(wg: torch.Tensor, rows: int, parts: int) -> torch.Tensor:
    cols = wg.shape[-1]
    per = rows // parts
    return wg.reshape(parts, -1, cols)[:, :per].reshape(rows, cols)


def fake_quantize(w: torch.Tensor, g: int, parts: int = 1) -> torch.Tensor:
    """Quantize and dequantize, back to (in, out) without the padding rows."""
    wg = group_rows(w.to(torch.float32), g, parts)
    scales, zeros = group_params(wg)
    q = torch.round(wg / scales[:, None] + zeros[:, None]).clamp(0, QMAX)
    return _ungrouped((q - zeros[:, None]) * scales[:, None], w.shape[0], parts).to(w.dtype)


def quantize_linear(lin: Linear, g: int) -> Linear:
    """One rank's float slice -> int4 Linear (the converter packs and writes it)."""
    q, scales, zeros = quantize(lin.weight, g)
    return Linear(q=q, scales=scales.to(torch.float16), zeros=zeros.to(torch.float16), bias=lin.bias)
