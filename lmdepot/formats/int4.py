"""int4 weight layout of format v1 (kernel-agnostic; kernels repack at load time).

A linear weight W of shape (in_features, out_features) is stored as
- `qweight`: int32 (ceil(in/g)*g/8, out); nibble j (bits 4j..4j+3) of row i holds input row 8i+j;
- `scales`, `zeros`: fp16 (ceil(in/g), out), one per group of g input rows;
- W[i, o] = (q[i, o] - zeros[i // g, o]) * scales[i // g, o].
When in_features is not a multiple of g, the input rows are padded with zero weights up to the
next multiple of g; the padded rows are dropped on dequantization.
"""

from __future__ import annotations

import torch

from lmdepot.errors import FormatError


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integers in [0, 15], rows % 8 == 0 -> (rows/8, cols) int32, plain nibble order."""
    if q.shape[0] % 8:
        raise FormatError(f"int4 packing needs rows divisible by 8, got {q.shape[0]}")
    q = q.to(torch.int64).reshape(q.shape[0] // 8, 8, q.shape[1])
    shifts = (torch.arange(8, dtype=torch.int64, device=q.device) * 4).view(1, 8, 1)
    packed = (q << shifts).sum(dim=1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (rows/8, cols) int32 -> (rows, cols) uint8."""
    shifts = (torch.arange(8, dtype=torch.int32, device=packed.device) * 4).view(1, 8, 1)
    q = (packed.unsqueeze(1) >> shifts) & 0xF
    return q.reshape(packed.shape[0] * 8, packed.shape[1]).to(torch.uint8)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(qweight).to(torch.float32)
    group = q.shape[0] // scales.shape[0]
    s = scales.to(torch.float32).repeat_interleave(group, dim=0)
    z = zeros.to(torch.float32).repeat_interleave(group, dim=0)
    return ((q - z) * s)[:in_features].to(dtype)


QMAX = 15
_TINY = 2.0**-24  # smallest positive fp16: an all-zero group keeps a usable (non-zero) scale


def group_rows(w: torch.Tensor, g: int, parts: int = 1) -> torch.Tensor:
    """(in, out) -> (parts * groups_per_part, g, out); each of `parts` equal row slices is zero-padded
    on its own to whole groups (row-parallel weights are grouped per tensor-parallel rank)."""
    rows, cols = w.shape
    if rows % parts:
        raise FormatError(f"cannot split {rows} input rows into {parts} equal parts")
    per = rows // parts
    pad = -(-per // g) * g - per
    w = w.reshape(parts, per, cols)
    if pad:
        w = torch.cat([w, w.new_zeros(parts, pad, cols)], dim=1)
    return w.reshape(-1, g, cols)


def group_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scales (fp16-representable, as float32) and integer zeros of grouped weights.

    The range always includes 0 (lo = min(w, 0), hi = max(w, 0)), so zero weights, padding
    included, quantize to q = zero exactly and never widen a group's range."""
    hi = wg.amax(dim=1).clamp(min=0)
    lo = wg.amin(dim=1).clamp(max=0)
    scales = ((hi - lo) / QMAX).to(torch.float16).clamp(min=_TINY).to(torch.float32)
    zeros = torch.round(-lo / scales).clamp(0, QMAX)
    return scales, zeros


def quantize_groups(w: torch.Tensor, g: int, parts: int = 1):
    """Round-to-nearest: (in, out) float -> codes (padded rows, out) uint8, scales, zeros (groups, out)."""
    wg = group_rows(w.to(torch.float32), g, parts)
    scales, zeros = group_params(wg)
    q = torch.round(wg / scales[:, None] + zeros[:, None]).clamp(0, QMAX)
    return q.reshape(-1, wg.shape[-1]).to(torch.uint8), scales, zeros


def quantize_int4_rtn(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """The workspace tensors (qweight, scales, zeros) of W (in, out), last group zero-padded."""
    q, scales, zeros = quantize_groups(w, group_size)
    return {"qweight": pack_int4(q), "scales": scales.to(torch.float16), "zeros": zeros.to(torch.float16)}
