"""RMSNorm fused with the residual add: one read of x and residual, one write of each output.

Rounding follows HF Llama: the residual sum is rounded to the activation dtype, the norm runs in
fp32 and is rounded before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    h = x if residual is None else x.to(residual.dtype) + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * normed, h


@triton.jit
def _kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, H, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    h = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:   # x may be a float32 tensor-parallel sum: rounded to the stream's dtype first
        dt = r_ptr.dtype.element_ty
        r = tl.load(r_ptr + row * H + offs, mask=mask, other=0.0)
        h = (h.to(dt).to(tl.float32) + r.to(tl.float32)).to(dt)   # exact sum, one rounding (as torch's add)
        tl.store(h_ptr + row * H + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
    normed = (hf * inv).to(h.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(h.dtype)
    tl.store(y_ptr + row * H + offs, w * normed, mask=mask)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """Returns (norm(x + residual) * weight, x + residual) in the residual's dtype (x's without one);
    rows are the last dim, contiguous."""
    H = x.shape[-1]
    x2 = x.reshape(-1, H).contiguous()
    if residual is None:
        h = x
        r2 = x2
    else:
        r2 = residual.reshape(-1, H).contiguous()
        h = residual_out if residual_out is not None else torch.empty_like(r2)
    y = out if out is not None else torch.empty_like(r2)
    _kernel[(x2.shape[0],)](x2, r2, weight, y, h, H, eps, HAS_RESIDUAL=residual is not None,
                            BLOCK=triton.next_power_of_2(H))
    return y.view(x.shape), h.view(x.shape)
