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


def install() -> None:
    global _installed
    if _installed:
        return
    for name, fn in (("rms_norm", rms_norm), ("linear_int4", linear_int4), ("paged_attention", paged_attention)):
        ops.register(name, fn)
    _installed = True
