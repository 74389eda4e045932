"""Triton kernels behind the op table, installed when the runtime runs on a CUDA device.

The op table is process-wide, so each op checks where its tensors live and hands CPU tensors to
the reference: a CPU engine beside a GPU one keeps working. Ops without a kernel here (rope,
store_kv, prefill attention, dense linears via cuBLAS) keep their torch reference, which runs on
the GPU as is.
"""

from __future__ import annotations

import functools

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


def rms_norm_quant(x, weight, eps):
    if not x.is_cuda:
        return reference.rms_norm_quant(x, weight, eps)
    from lmdepot.runtime.kernels.rms_norm_quant import rms_norm_quant as kernel

    return kernel(x, weight, eps)


def quant_per_token(x):
    if not x.is_cuda:
        return reference.quant_per_token(x)
    from lmdepot.runtime.kernels.rms_norm_quant import quant_per_token as kernel

    return kernel(x)


@functools.cache
def _int8_dot(device: torch.device) -> bool:
    """Triton's int8 tl.dot needs Ampere (sm_80) or newer; older GPUs fall back, with one warning."""
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return True
    import warnings

    warnings.warn("W8A8: this GPU has no int8 tensor-core kernel (needs sm_80+); using the slow torch reference")
    return False


def linear_w8a8(xq, x_scales, qweight, w_scales, bias, dtype):
    if not xq.is_cuda or not _int8_dot(xq.device):
        return reference.linear_w8a8(xq, x_scales, qweight, w_scales, bias, dtype)
    from lmdepot.runtime.kernels.w8a8 import w8a8_linear

    return w8a8_linear(xq, x_scales, qweight, w_scales, bias, out_dtype=dtype)


def _install_w8a8() -> None:
    """W8A8 (weight_type = int8): fused RMSNorm + per-token quant, plain per-token quant, int8 GEMM."""
    for name, fn in (("rms_norm_quant", rms_norm_quant), ("quant_per_token", quant_per_token),
                     ("linear_w8a8", linear_w8a8)):
        ops.register(name, fn)


def install() -> None:
    global _installed
    if _installed:
        return
    for name, fn in (("rms_norm", rms_norm), ("linear_int4", linear_int4), ("paged_attention", paged_attention)):
        ops.register(name, fn)
    _install_w8a8()
    _installed = True
