"""Triton kernels behind the op table, installed when the runtime runs on a CUDA device.

The op table is process-wide, so each op checks where its tensors live and hands CPU tensors to
the reference: a CPU engine beside a GPU one keeps working. Ops without a kernel here (rope,
store_kv, prefill attention, dense linears via cuBLAS) keep their torch reference, which runs on
the GPU as is.
"""

from __future__ import annotations

import torch

from lmdepot.runtime import ops
from lmdepot.runtime.ops import reference

_installed = False


def rms_norm(x, weight, eps):
    if not x.is_cuda:
        return reference.rms_norm(x, weight, eps)
    from lmdepot.runtime.kernels.rms_norm import rms_norm as kernel

    return kernel(x, None, weight, eps)[0]


def linear_int4(x, qweight, scales, zeros, in_features, bias):
    if not x.is_cuda or x.dtype == torch.float32:
        return reference.linear_int4(x, qweight, scales, zeros, in_features, bias)
    from lmdepot.runtime.kernels.w4a16 import w4a16_linear

    out = w4a16_linear(x, qweight, scales, zeros)
    return out if bias is None else out + bias


def paged_attention(q, k, v, k_cache, v_cache, ctx, scale):
    """Decode steps (one new token per sequence) use the split-K paged kernel; prefill and sliding
    windows past their width fall back to the reference."""
    window = ctx.sliding_window
    # tl.dot needs 16 rows/cols: tiny head dims or pages go to the reference too.
    if not q.is_cuda or q.shape[-1] < 16 or k_cache.shape[1] < 16 or \
            any(s.q_len != 1 or (window and s.ctx_len > window) for s in ctx.seqs):
        return reference.paged_attention(q, k, v, k_cache, v_cache, ctx, scale)
    from lmdepot.runtime.kernels.paged_decode_attention import paged_decode_attention

    return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)


# --- quantized KV cache (int8 / int4 online): store and decode-attention kernels -----------------

def _kv_kernels_fit(cache, head_dim: int) -> bool:
    """Online caches with one quantizer per token and head (the defaults), power-of-two heads."""
    return (not cache.static and cache.group == head_dim and head_dim >= 16
            and not head_dim & (head_dim - 1))


def store_kv_quant(k, v, cache, slot_mapping):
    from lmdepot.runtime.context import get_context
    from lmdepot.runtime.ops import kv_quant

    ctx = get_context()
    if not k.is_cuda or not _kv_kernels_fit(cache, k.shape[-1]) or \
            (cache.key_channel and ctx.block_tables is None):
        return kv_quant.store_kv_quant(k, v, cache, slot_mapping)
    from lmdepot.runtime.kernels.kv_store_channel import store_keys_channel
    from lmdepot.runtime.kernels.kv_store_quant import store_quant_per_token

    if cache.key_channel:   # the step's batch from the context's device tensors (CUDA-graph safe)
        store_keys_channel(k, cache, ctx.block_tables, ctx.context_lens, ctx.q_start_loc, ctx.max_q_len)
    else:
        store_quant_per_token(k, slot_mapping, cache.codes[0], cache.scales[0], cache.zeros[0],
                              cache.bits, cache.rotate)
    store_quant_per_token(v, slot_mapping, cache.codes[1], cache.scales[1], cache.zeros[1],
                          cache.bits, cache.rotate)


def paged_attention_quant(q, k, v, cache, ctx, scale):
    """Decode steps read the int8/int4 codes in the split-K kernel; the rest uses the reference."""
    window = ctx.sliding_window
    if not q.is_cuda or not _kv_kernels_fit(cache, q.shape[-1]) or cache.codes[0].shape[1] < 16 or \
            any(s.q_len != 1 or (window and s.ctx_len > window) for s in ctx.seqs):
        return reference.paged_attention_quant(q, k, v, cache, ctx, scale)
    from lmdepot.runtime.kernels.paged_decode_attention_quant import paged_decode_attention_quant

    return paged_decode_attention_quant(q, cache, ctx.block_tables, ctx.context_lens, scale)


def _install_kv_quant() -> None:
    for name, fn in (("store_kv_quant", store_kv_quant), ("paged_attention_quant", paged_attention_quant)):
        ops.register(name, fn)


def install() -> None:
    global _installed
    if _installed:
        return
    for name, fn in (("rms_norm", rms_norm), ("linear_int4", linear_int4), ("paged_attention", paged_attention)):
        ops.register(name, fn)
    _install_kv_quant()
    _installed = True
