"""RMSNorm fused with dynamic per-token int8 quantization (the activation side of W8A8).

One program per token row: norm as in rms_norm.py (HF Llama rounding), then the row's absmax gives
scale = absmax / 127 and codes q = floor(y * 127 / absmax + 0.5), clamped to ±127. With
APPLY_NORM = False the same kernel only quantizes (the inputs of wo and w2). Returns the int8 codes
and float32 scales (tokens,), which feed the W8A8 GEMM (w8a8.py) without a float round trip.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmdepot.runtime.ops.reference import quant_per_token as quant_reference  # noqa: F401 (the semantics)
from lmdepot.runtime.ops.reference import rms_norm_quant as reference  # noqa: F401


@triton.jit
def _kernel(x_ptr, w_ptr, q_ptr, s_ptr, H, stride_x, eps, APPLY_NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if APPLY_NORM:
        hf = h.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(h.dtype)
        y = (w * (hf * inv).to(h.dtype)).to(tl.float32)
    else:
        y = h.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-8)
    # IEEE divisions (Triton's `/` is approximate on GPUs) and no FMA contraction (launch flag), so the
    # codes equal the torch reference's bit for bit.
    q = tl.floor(y * tl.div_rn(amax * 0.0 + 127.0, amax) + 0.5)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + row * H + offs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, tl.div_rn(amax, amax * 0.0 + 127.0))


def _launch(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out=None, scales_out=None):
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = out.view(x2.shape) if out is not None else torch.empty(x2.shape, device=x.device, dtype=torch.int8)
    s = scales_out.view(-1) if scales_out is not None else \
        torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
    if x2.shape[0]:
        _kernel[(x2.shape[0],)](x2, x2 if weight is None else weight, q, s, H, x2.stride(0), eps,
                                APPLY_NORM=weight is not None, BLOCK=triton.next_power_of_2(H),
                                num_warps=4 if H <= 4096 else 8, enable_fp_fusion=False)
    return q.view(x.shape), s.view(x.shape[:-1])


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None, scales_out=None):
    """(int8 codes of rms_norm(x) * weight, float32 per-token scales); `out`/`scales_out` optional buffers."""
    return _launch(x, weight, eps, out, scales_out)


def quant_per_token(x: torch.Tensor, out=None, scales_out=None):
    """(int8 codes of x, float32 per-token scales)."""
    return _launch(x, None, 0.0, out, scales_out)
