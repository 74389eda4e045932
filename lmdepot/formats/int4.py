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


def quantize_int4_rtn(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Asymmetric round-to-nearest group quantization of W (in, out) with zero-padded last group."""
    w = w.to(torch.float32)
    rows, cols = w.shape
    padded = -(-rows // group_size) * group_size
    if padded != rows:
        w = torch.cat([w, w.new_zeros(padded - rows, cols)])
    g = w.reshape(padded // group_size, group_size, cols)
    if padded != rows:
        # Statistics of the last group come from its real rows only: padded zeros must not widen it.
        real = rows - (padded - group_size)
        wmax = g.amax(dim=1)
        wmin = g.amin(dim=1)
        wmax[-1] = g[-1, :real].amax(dim=0)
        wmin[-1] = g[-1, :real].amin(dim=0)
    else:
        wmax, wmin = g.amax(dim=1), g.amin(dim=1)
    wmax, wmin = wmax.clamp(min=0), wmin.clamp(max=0)  # zero stays exactly representable
    scales = ((wmax - wmin) / 15).clamp(min=1e-8).to(torch.float16).to(torch.float32)
    zeros = torch.round(-wmin / scales).clamp(0, 15)
    q = torch.round(g / scales.unsqueeze(1) + zeros.unsqueeze(1)).clamp(0, 15)
    return {"qweight": pack_int4(q.reshape(padded, cols)), "scales": scales.to(torch.float16),
            "zeros": zeros.to(torch.float16)}
