"""Rotary embedding of q and k fused with the float KV-cache write: one launch instead of three.

q (T, Hq, D), k and v (T, Hkv, D) are views of the qkv projection's output (any row/head strides,
unit stride along D). q and k are rotated in place (HF's rotate_half convention on the first rot_dim
channels, the rest passed through), then k and v go to k_cache/v_cache (blocks, page, Hkv, D) at
slot_mapping (slot = block * page + offset; a negative slot is a padding row and is not stored).
Without caches (None) only q and k are rotated: the quantized caches' prologue, whose store quantizes.

cos/sin (T, rot_dim) come from ops.rope_cos_sin, computed once per step for all layers (that also
covers every RoPE scaling, dynamic NTK included). The rotation runs in the activation dtype, one
rounding per multiply and per add exactly as HF's `q * cos + rotate_half(q) * sin` does, with FMA
contraction off, so the result is bit-identical to the torch reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmdepot.runtime.ops import reference as ref_ops


def reference(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping):
    q = ref_ops.apply_rope(q, cos, sin, rot_dim)
    k = ref_ops.apply_rope(k, cos, sin, rot_dim)
    if k_cache is None:
        return q, k
    keep = slot_mapping >= 0
    ref_ops.store_kv(k[keep], v[keep], k_cache, v_cache, slot_mapping[keep])
    return q, k


@triton.jit
def _rotate(ptr, stride_h, heads, c1, s1, c2, s2, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_HALF: tl.constexpr):
    """Rotates the first 2 * HALF channels of `heads` rows in place; returns both rotated halves."""
    offs_h = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < heads) & (offs[None, :] < HALF)
    p1 = ptr + offs_h[:, None] * stride_h + offs[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    # Same operations, same dtype, same order as the reference: x*cos + rotate_half(x)*sin.
    y1 = x1 * c1[None, :] + (-x2) * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    tl.store(p1, y1, mask=mask)
    tl.store(p1 + HALF, y2, mask=mask)
    return y1, y2


@triton.jit
def _kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, HQ, HKV,
            PAGE: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, STORE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    mask_c = offs < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + offs, mask=mask_c, other=0.0)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=mask_c, other=0.0)
    s1 = tl.load(sin_ptr + t * stride_st + offs, mask=mask_c, other=0.0)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + offs, mask=mask_c, other=0.0)
    _rotate(q_ptr + t * stride_qt, stride_qh, HQ, c1, s1, c2, s2, HALF, BLOCK_HQ, BLOCK_HALF)
    k1, k2 = _rotate(k_ptr + t * stride_kt, stride_kh, HKV, c1, s1, c2, s2, HALF, BLOCK_HKV, BLOCK_HALF)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if STORE and slot >= 0:
        blk, off = slot // PAGE, slot % PAGE
        offs_h = tl.arange(0, BLOCK_HKV)
        mask_h = offs_h[:, None] < HKV
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch
        mask_r = mask_h & mask_c[None, :]
        tl.store(kc + offs[None, :], k1.to(kc_ptr.dtype.element_ty), mask=mask_r)
        tl.store(kc + HALF + offs[None, :], k2.to(kc_ptr.dtype.element_ty), mask=mask_r)
        # Channels past rot_dim (partial rotary) are copied unrotated; v is copied whole.
        offs_d = tl.arange(0, BLOCK_D)
        mask_tail = mask_h & (offs_d[None, :] >= 2 * HALF) & (offs_d[None, :] < D)
        tail = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask_tail)
        tl.store(kc + offs_d[None, :], tail.to(kc_ptr.dtype.element_ty), mask=mask_tail)
        mask_v = mask_h & (offs_d[None, :] < D)
        vals = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask_v)
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
        tl.store(vc, vals.to(vc_ptr.dtype.element_ty), mask=mask_v)


def rope_store_kv(q, k, v, cos, sin, rot_dim: int, k_cache, v_cache, slot_mapping):
    """Rotates q and k in place and stores k, v into the caches (None: not stored); returns (q, k)."""
    T, hq, d = q.shape
    hkv = k.shape[1]
    assert rot_dim % 2 == 0 and rot_dim <= d and cos.shape[-1] == rot_dim, (rot_dim, d, cos.shape)
    store = k_cache is not None
    if not store:   # unused operands: k stands in for the caches
        k_cache = v_cache = k.unsqueeze(1)
    for x in (q, k, v, k_cache, v_cache, cos, sin):
        assert x.stride(-1) == 1, "unit stride along the last dim"
    if T == 0:
        return q, k
    half = rot_dim // 2
    _kernel[(T,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), hq, hkv,
        PAGE=k_cache.shape[1], D=d, HALF=half, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_HALF=triton.next_power_of_2(max(half, 1)), BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HKV=triton.next_power_of_2(hkv), STORE=store, num_warps=4, enable_fp_fusion=False)
    return q, k
