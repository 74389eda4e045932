"""Store new keys or values into a paged cache with per-token online int8 / int4 quantizers.

One program per (new token, kv head): one asymmetric range over the whole head (0 included, so the
zero point is an exact uint8 code), fp16 scale; int4 codes are packed two per byte (channel 2i low
nibble). The optional Hadamard rotation is the reference's float32 GEMM, before the launch. The
torch reference is ops/kv_quant.py (quantize_online / store_kv_quant); the kernel computes each code
the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from lmdepot.runtime.kernels.kv_quant_tile import INTERPRETED

SCALE_FLOOR = 2.0 ** -20   # = ops/kv_quant.SCALE_FLOOR


@triton.jit
def round_half_even(x):
    """torch.round's rounding (ties to even); the interpreter has no libdevice.rint."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def rint(x, RINT: tl.constexpr):
    """torch.round: one instruction on a GPU (RINT), round_half_even under the interpreter."""
    if RINT:
        y = libdevice.rint(x)
    else:
        y = round_half_even(x)
    return y


@triton.jit
def _store_kernel(x_ptr, slot_ptr, c_ptr, s_ptr, z_ptr, stride_xt, stride_xh, c_s, c_h, p_s, p_h,
                  D: tl.constexpr, BITS: tl.constexpr, FLOOR: tl.constexpr, RINT: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_i = tl.arange(0, D // 2)
    row = x_ptr + t * stride_xt + h * stride_xh
    even = tl.load(row + 2 * offs_i).to(tl.float32)
    odd = tl.load(row + 2 * offs_i + 1).to(tl.float32)
    qmax = 2.0 ** BITS - 1.0
    lo = tl.minimum(tl.minimum(tl.min(even, 0), tl.min(odd, 0)), 0.0)
    hi = tl.maximum(tl.maximum(tl.max(even, 0), tl.max(odd, 0)), 0.0)
    scale = tl.maximum((hi - lo) / qmax, FLOOR).to(tl.float16).to(tl.float32)
    zero = tl.minimum(tl.maximum(rint(-lo / scale, RINT), 0.0), qmax)
    q_even = tl.minimum(tl.maximum(rint(even / scale, RINT) + zero, 0.0), qmax).to(tl.uint8)
    q_odd = tl.minimum(tl.maximum(rint(odd / scale, RINT) + zero, 0.0), qmax).to(tl.uint8)
    out = c_ptr + slot * c_s + h * c_h
    if BITS == 4:
        tl.store(out + offs_i, q_even | (q_odd << 4))
    else:
        tl.store(out + 2 * offs_i, q_even)
        tl.store(out + 2 * offs_i + 1, q_odd)
    tl.store(s_ptr + slot * p_s + h * p_h, scale.to(tl.float16))
    tl.store(z_ptr + slot * p_s + h * p_h, zero.to(tl.uint8))


def store_quant_per_token(x, slot_mapping, codes, scales, zeros, bits: int, rotate: bool) -> None:
    """x (T, hkv, D) into codes (N, P, hkv, D or D // 2) uint8 and per-token scales/zeros
    (N, P, hkv, 1) at the flat slots; quantizer = the whole head (group = head_dim). `rotate`: the
    reference's float32 product with the Hadamard matrix first (one batched GEMM; done per program
    in the kernel it cost ~0.2 ms a launch at 128 x 32 heads on an H200, session 11)."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    T, hkv, D = x.shape
    if T == 0:
        return
    if rotate:
        x = x.float() @ hadamard_on(D, str(x.device))
    cf, sf = codes.view(-1, *codes.shape[2:]), scales.view(-1, *scales.shape[2:])
    _store_kernel[(T, hkv)](x, slot_mapping, codes, scales, zeros, x.stride(0), x.stride(1),
                            cf.stride(0), cf.stride(1), sf.stride(0), sf.stride(1),
                            D=D, BITS=bits, FLOOR=SCALE_FLOOR, RINT=not INTERPRETED)
