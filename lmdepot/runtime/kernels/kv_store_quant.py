"""Store new keys or values into a paged cache with per-token online int8 / int4 quantizers.

One program per (new token, kv head): optional Hadamard rotation of the head, one asymmetric range
over the whole head (0 included, so the zero point is an exact uint8 code), fp16 scale; int4 codes
are packed two per byte (channel 2i low nibble). The torch reference is ops/kv_quant.py
(quantize_online / store_kv_quant); the kernel computes each code the same way, up to the
rotation's float32 summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl

SCALE_FLOOR = 2.0 ** -20   # = ops/kv_quant.SCALE_FLOOR


@triton.jit
def round_half_even(x):
    """torch.round's rounding (ties to even); the interpreter has no libdevice.rint."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _half(x_ptr, rot_ptr, offs_d, offs_i, PARITY: tl.constexpr, ROTATE: tl.constexpr, D: tl.constexpr):
    """Channels 2i + PARITY of the (rotated) head: (D // 2,) float32."""
    if ROTATE:
        x = tl.load(x_ptr + offs_d).to(tl.float32)
        h = tl.load(rot_ptr + offs_d[:, None] * D + 2 * offs_i[None, :] + PARITY)
        return tl.sum(x[:, None] * h, axis=0)
    return tl.load(x_ptr + 2 * offs_i + PARITY).to(tl.float32)


@triton.jit
def _store_kernel(x_ptr, slot_ptr, rot_ptr, c_ptr, s_ptr, z_ptr, stride_xt, stride_xh,
                  c_s, c_h, p_s, p_h, D: tl.constexpr, BITS: tl.constexpr, ROTATE: tl.constexpr,
                  FLOOR: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_i = tl.arange(0, D // 2)
    row = x_ptr + t * stride_xt + h * stride_xh
    even = _half(row, rot_ptr, offs_d, offs_i, 0, ROTATE, D)
    odd = _half(row, rot_ptr, offs_d, offs_i, 1, ROTATE, D)
    qmax = 2.0 ** BITS - 1.0
    lo = tl.minimum(tl.minimum(tl.min(even, 0), tl.min(odd, 0)), 0.0)
    hi = tl.maximum(tl.maximum(tl.max(even, 0), tl.max(odd, 0)), 0.0)
    scale = tl.maximum((hi - lo) / qmax, FLOOR).to(tl.float16).to(tl.float32)
    zero = tl.minimum(tl.maximum(round_half_even(-lo / scale), 0.0), qmax)
    q_even = tl.minimum(tl.maximum(round_half_even(even / scale) + zero, 0.0), qmax).to(tl.uint8)
    q_odd = tl.minimum(tl.maximum(round_half_even(odd / scale) + zero, 0.0), qmax).to(tl.uint8)
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
    (N, P, hkv, 1) at the flat slots; quantizer = the whole head (group = head_dim)."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    T, hkv, D = x.shape
    if T == 0:
        return
    rot = hadamard_on(D, str(x.device)) if rotate else scales   # an unused pointer when not rotating
    cf, sf = codes.view(-1, *codes.shape[2:]), scales.view(-1, *scales.shape[2:])
    _store_kernel[(T, hkv)](x, slot_mapping, rot, codes, scales, zeros, x.stride(0), x.stride(1),
                            cf.stride(0), cf.stride(1), sf.stride(0), sf.stride(1),
                            D=D, BITS=bits, ROTATE=rotate, FLOOR=SCALE_FLOOR)
