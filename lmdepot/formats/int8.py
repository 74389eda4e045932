"""int8 weight layout of format v1 (weight_type = int8, W8A8 SmoothQuant).

A linear weight W of shape (in_features, out_features) is stored as
- `qweight`: int8 (in, out), the same orientation as plain weights;
- `scales`: float32 (out,), one per output channel;
- W[i, o] = qweight[i, o] * scales[o].
Symmetric: scale = max|W[:, o]| / 127, q = clamp(round(w / scale), -127, 127); -128 is never used,
so negating a code never overflows. Activations are quantized the same way per token at run time.
"""

from __future__ import annotations

import torch

QMAX = 127
_TINY = 1e-8  # an all-zero column keeps a usable (non-zero) scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(in, out) float -> (qweight int8 (in, out), scales float32 (out,))."""
    w = w.to(torch.float32)
    scales = (w.abs().amax(dim=0) / QMAX).clamp(min=_TINY)
    q = torch.round(w / scales).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qweight.to(torch.float32) * scales.to(torch.float32)).to(dtype)
