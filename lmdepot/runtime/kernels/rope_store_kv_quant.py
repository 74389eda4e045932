"""Rotary embedding of q and k fused with the quantized (int8 / int4) KV-cache write.

The quantized counterpart of rope_store_kv.py. One program per (new token, kv head): it rotates
the token's q heads of that kv head's GQA group and the k head in place (rope_store_kv's
rotate_heads: the same dtype ops in the same order as ops.apply_rope, FMA contraction off, so the
rotated q and k are bit-identical to the reference's), then quantizes the rotated k head and the v
head into their slot with kv_store_quant's per-token quantizer (store_head). Rotated q and k are
left in place for the attention kernels, as the float path leaves them.

With the per-channel key scheme (int4 `channel`) a key block's ranges depend on all of its tokens,
which other programs of the launch rotate, so the keys go through kv_store_channel's kernel in a
second launch, reading the rotated k: two launches instead of the separate rope ops (about six
torch launches each for q and k) and two stores.

cos/sin (T, rot_dim) come from ops.rope_cos_sin, once per step for all layers (every RoPE scaling,
dynamic NTK included, lives in them). Torch reference: `reference` below (ops.apply_rope, then
ops/kv_quant.store_kv_quant), the unfused sequence.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmdepot.runtime.kernels.kv_store_channel import store_keys_channel
from lmdepot.runtime.kernels.kv_store_quant import SCALE_FLOOR, store_head
from lmdepot.runtime.kernels.rope_store_kv import cos_sin_halves, rotate_heads


def reference(q, k, v, cos, sin, rot_dim, cache, slot_mapping):
    from lmdepot.runtime.ops import kv_quant
    from lmdepot.runtime.ops import reference as ref_ops

    q = ref_ops.apply_rope(q, cos, sin, rot_dim)
    k = ref_ops.apply_rope(k, cos, sin, rot_dim)
    kv_quant.store_kv_quant(k, v, cache, slot_mapping)
    return q, k


@triton.jit
def _kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, rot_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
            c_s, c_h, p_s, p_h, GROUP: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
            BLOCK_HALF: tl.constexpr, BLOCK_G: tl.constexpr, BITS: tl.constexpr, ROTATE: tl.constexpr,
            STORE_K: tl.constexpr, FLOOR: tl.constexpr):
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    c1, s1, c2, s2 = cos_sin_halves(cos_ptr + t * stride_ct, sin_ptr + t * stride_st, HALF, BLOCK_HALF)
    rotate_heads(q_ptr + t * stride_qt + h * GROUP * stride_qh, stride_qh, GROUP, c1, s1, c2, s2, HALF, BLOCK_G,
                 BLOCK_HALF)
    k_row = k_ptr + t * stride_kt + h * stride_kh
    rotate_heads(k_row, stride_kh, 1, c1, s1, c2, s2, HALF, 1, BLOCK_HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    store_head(v_ptr + t * stride_vt + h * stride_vh, slot, h, rot_ptr, vc_ptr, vs_ptr, vz_ptr, c_s, c_h, p_s, p_h,
               D, BITS, ROTATE, FLOOR)
    if STORE_K:
        # The quantizer reads the whole rotated head back, channels other threads of this program
        # rotated: make their stores visible first.
        tl.debug_barrier()
        store_head(k_row, slot, h, rot_ptr, kc_ptr, ks_ptr, kz_ptr, c_s, c_h, p_s, p_h, D, BITS, ROTATE, FLOOR)


def rope_store_kv_quant(q, k, v, cos, sin, rot_dim: int, cache, slot_mapping, block_tables=None,
                        context_lens=None, q_start_loc=None, max_q_len: int = 0):
    """Rotates q (T, hq, D) and k (T, hkv, D) in place and stores k, v into the QuantKVCache (online
    scales, one quantizer per head, power-of-two D); returns (q, k). The channel key scheme also
    needs the step's block_tables / context_lens / q_start_loc device tensors and max_q_len."""
    from lmdepot.runtime.ops.kv_quant import hadamard_on

    T, hq, d = q.shape
    hkv = k.shape[1]
    assert rot_dim % 2 == 0 and rot_dim <= d and cos.shape[-1] == rot_dim and hq % hkv == 0, (rot_dim, d, hq, hkv)
    for x in (q, k, v, cos, sin):
        assert x.stride(-1) == 1, "unit stride along the last dim"
    if T == 0:
        return q, k
    vc, vs, vz = cache.codes[1], cache.scales[1], cache.zeros[1]
    kc, ks, kz = (vc, vs, vz) if cache.key_channel else (cache.codes[0], cache.scales[0], cache.zeros[0])
    assert kc.stride() == vc.stride() and ks.stride() == vs.stride(), "K and V caches share one layout"
    rot = hadamard_on(d, str(q.device)) if cache.rotate else vs   # an unused pointer when not rotating
    cf, sf = vc.view(-1, *vc.shape[2:]), vs.view(-1, *vs.shape[2:])
    half, group = rot_dim // 2, hq // hkv
    _kernel[(T, hkv)](
        q, k, v, cos, sin, slot_mapping, rot, kc, ks, kz, vc, vs, vz,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        cf.stride(0), cf.stride(1), sf.stride(0), sf.stride(1),
        GROUP=group, D=d, HALF=half, BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
        BLOCK_G=triton.next_power_of_2(group), BITS=cache.bits, ROTATE=cache.rotate,
        STORE_K=not cache.key_channel, FLOOR=SCALE_FLOOR, enable_fp_fusion=False)
    if cache.key_channel:
        store_keys_channel(k, cache, block_tables, context_lens, q_start_loc, max_q_len)
    return q, k
