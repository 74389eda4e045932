"""silu(gate) * up over the fused gate/up projection output (T, 2·I) -> (T, I)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


@triton.jit
def _kernel(gu_ptr, y_ptr, I, BLOCK: tl.constexpr):
    row, pid = tl.program_id(0), tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(gu_ptr + row * 2 * I + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * I + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * I + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    I = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * I).contiguous()
    y = out if out is not None else torch.empty(gu.shape[0], I, device=gu.device, dtype=gu.dtype)
    block = min(1024, triton.next_power_of_2(I))
    _kernel[(gu.shape[0], triton.cdiv(I, block))](gu, y, I, BLOCK=block)
    return y.view(*gate_up.shape[:-1], I)
