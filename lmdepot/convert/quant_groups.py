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

BITS = 4
QMAX = 2**BITS - 1
GROUP_SIZES = (32, 64, 128, 256)
_TINY = 2.0**-24  # smallest positive fp16: an all-zero group keeps a usable (non-zero) scale


def check_group_size(g: int) -> int:
    if g not in GROUP_SIZES:
        raise ConvertError(f"--w-group-size {g}: must be one of {', '.join(map(str, GROUP_SIZES))}")
    return g


def padded_rows(rows: int, g: int) -> int:
    return -(-rows // g) * g


def _grouped(w: torch.Tensor, g: int, parts: int) -> torch.Tensor:
    """(in, out) -> (parts * groups_per_part, g, out), each part zero-padded on its own."""
    rows, cols = w.shape
    if rows % parts:
        raise ConvertError(f"cannot split {rows} input rows into {parts} equal parts")
    per = rows // parts
    pad = padded_rows(per, g) - per
    w = w.reshape(parts, per, cols)
    if pad:
        w = torch.cat([w, w.new_zeros(parts, pad, cols)], dim=1)
    return w.reshape(-1, g, cols)


def _ungrouped(wg: torch.Tensor, rows: int, parts: int) -> torch.Tensor:
    cols = wg.shape[-1]
    per = rows // parts
    return wg.reshape(parts, -1, cols)[:, :per].reshape(rows, cols)


def group_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scales (fp16-representable, float32) and integer zeros of grouped weights (G, g, out)."""
    hi = wg.amax(dim=1).clamp(min=0)
    lo = wg.amin(dim=1).clamp(max=0)
    scales = ((hi - lo) / QMAX).to(torch.float16).clamp(min=_TINY).to(torch.float32)
    zeros = torch.round(-lo / scales).clamp(0, QMAX)
    return scales, zeros


def quantize(w: torch.Tensor, g: int, parts: int = 1):
    """(in, out) float -> codes (parts * padded_per_part, out) uint8, scales, zeros (groups, out)."""
    wg = _grouped(w.to(torch.float32), g, parts)
    scales, zeros = group_params(wg)
    q = torch.round(wg / scales[:, None] + zeros[:, None]).clamp(0, QMAX)
    return q.reshape(-1, wg.shape[-1]).to(torch.uint8), scales, zeros


def fake_quantize(w: torch.Tensor, g: int, parts: int = 1) -> torch.Tensor:
    """Quantize and dequantize, back to (in, out) without the padding rows."""
    wg = _grouped(w.to(torch.float32), g, parts)
    scales, zeros = group_params(wg)
    q = torch.round(wg / scales[:, None] + zeros[:, None]).clamp(0, QMAX)
    return _ungrouped((q - zeros[:, None]) * scales[:, None], w.shape[0], parts).to(w.dtype)


def quantize_linear(lin: Linear, g: int) -> Linear:
    """One rank's float slice -> int4 Linear (the converter packs and writes it)."""
    q, scales, zeros = quantize(lin.weight, g)
    return Linear(q=q, scales=scales.to(torch.float16), zeros=zeros.to(torch.float16), bias=lin.bias)
