"""Triton kernels behind the op table, installed when the runtime runs on a CUDA device.

The op table is process-wide, so each op checks where its tensors live and hands CPU tensors to
the reference: a CPU engine beside a GPU one keeps working. Ops without a kernel here (separate
rope and store_kv, used by the quantized cache; dense linears of more than one row, via cuBLAS)
keep their torch reference, which runs on the GPU as is.
"""

from __future__ import annotations

import functools
import os

import torch

from lmdepot.runtime import ops
from lmdepot.runtime.ops import reference

_installed = False


def rms_norm(x, weight, eps):
    if not x.is_cuda:
        return reference.rms_norm(x, weight, eps)
    from lmdepot.runtime.kernels.rms_norm import rms_norm as kernel

    return kernel(x, None, weight, eps)[0]


def add_rms_norm(x, residual, weight, eps):
    if not x.is_cuda:
        return reference.add_rms_norm(x, residual, weight, eps)
    from lmdepot.runtime.kernels.rms_norm import rms_norm as kernel

    return kernel(x, residual, weight, eps)


def silu_mul(gate_up):
    if not gate_up.is_cuda:
        return reference.silu_mul(gate_up)
    from lmdepot.runtime.kernels.silu_mul import silu_mul as kernel

    return kernel(gate_up)


def int4_layout(weight: dict) -> dict:
    """An int4 linear's GPU layout, made once at load (Linear keeps only it): w4a16_gemv.repack's
    K-major dict, which the GEMV, the GEMM and the dequantize kernel read (linear_int4_packed). Groups
    whose spans repack cannot form (not 32, 64 or a multiple of 128) keep the workspace tensors, for
    w4a16.py's kernels (what they are kept for) or the reference (linear_int4). Format v1 allows groups
    of 32..256 only, all repacked; the fallback is for tensors from elsewhere (tests, later formats)."""
    from lmdepot.runtime.kernels import w4a16_gemv

    q, scales = weight["qweight"], weight["scales"]
    try:
        w4a16_gemv.span_of(q.shape[0] * 8 // scales.shape[0])
    except ValueError:
        return weight
    return w4a16_gemv.repack(q, scales, weight["zeros"])


def linear_int4(x, weight, in_features, bias=None, out_dtype=None):
    if "qt" in weight:   # repacked by int4_layout
        return linear_int4_packed(x, weight, bias, out_dtype)
    qweight = weight["qweight"]
    group = qweight.shape[0] * 8 // weight["scales"].shape[0]
    # w4a16.py's tiles need a power-of-two group of 16+ rows (a tile never straddles a group)
    if not x.is_cuda or x.dtype == torch.float32 or group < 16 or group & (group - 1):
        return reference.linear_int4(x, weight, in_features, bias, out_dtype)
    from lmdepot.runtime.kernels.w4a16 import w4a16_linear

    y = None
    if out_dtype is not None and out_dtype != x.dtype:   # the kernel's fp32 sums, unrounded
        y = torch.empty(*x.shape[:-1], qweight.shape[1], device=x.device, dtype=out_dtype)
    out = w4a16_linear(x, qweight, weight["scales"], weight["zeros"], out=y)
    return out if bias is None else out + bias.to(out.dtype)


def linear_int4_packed(x, packed, bias=None, out_dtype=None):
    """x @ a repacked int4 weight (int4_layout) by rows: up to w4a16_gemv.MAX_M the GEMV, to
    w4a16.DEQUANT_MIN_M - 1 (127) the GEMM (w4a16_gemm.py), from there (prefill) the (N, K) weight
    dequantized into scratch and multiplied by the dense linear op (cuBLAS). out_dtype=float32: the unrounded sums (a
    row-parallel rank's partial). Runs wherever the tensors are (the CPU tests drive it through
    Triton's interpreter)."""
    from lmdepot.runtime.kernels import w4a16_dequant, w4a16_gemm, w4a16_gemv
    from lmdepot.runtime.kernels.w4a16 import DEQUANT_MIN_M

    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], packed["qt"].shape[0]
    if M == 0:
        y = torch.empty(0, N, device=x.device, dtype=out_dtype or x.dtype)
    elif M >= DEQUANT_MIN_M:
        y = reference.linear(x2, w4a16_dequant.dequantize(packed, K, x.dtype), None, out_dtype)
    else:   # the kernels write the sums in out's dtype (float32: unrounded)
        out = None if out_dtype in (None, x.dtype) else torch.empty(M, N, device=x.device, dtype=out_dtype)
        kernel = w4a16_gemv.gemv if M <= w4a16_gemv.MAX_M else w4a16_gemm.gemm
        y = kernel(x2, packed, out=out)
    y = y.view(*lead, N)
    return y if bias is None else y + bias.to(y.dtype)


# Rows up to which dense linears take the GEMV kernel instead of cuBLAS (read once, at import): one row
# by default (tuned: a batch-1 decode step of a 7B model 4.42 -> 4.11 ms on an H200, docs/benchmarks.md),
# and only shapes whose launch needs no K split (those the GPU tuning run verified; every 7B-class
# shape at tp 1 and 2); LMDEPOT_DENSE_GEMV=0 keeps cuBLAS everywhere, =1 sends every 1-4 row input.
DENSE_GEMV_ROWS = {"0": 0, "1": 4}.get(os.environ.get("LMDEPOT_DENSE_GEMV", ""), 1)


def linear(x, weight, bias=None, out_dtype=None):
    if not x.is_cuda:
        return reference.linear(x, weight, bias, out_dtype)
    return linear_gemv(x, weight, bias, out_dtype)


def _gemv_applies(x, weight, bias) -> bool:
    """1 to DENSE_GEMV_ROWS contiguous fp16/bf16 rows against a same-dtype K-contiguous weight."""
    from lmdepot.runtime.kernels.gemv import heuristic_config

    rows = x.numel() // max(1, x.shape[-1])
    unsplit = DENSE_GEMV_ROWS > 1 or heuristic_config(1, weight.shape[0], weight.shape[-1])["split_k"] == 1
    return (0 < rows <= DENSE_GEMV_ROWS and unsplit and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and x.is_contiguous() and weight.stride(-1) == 1
            and (bias is None or bias.stride(-1) == 1))


def linear_gemv(x, weight, bias=None, out_dtype=None):
    """The GEMV kernel where it applies (_gemv_applies); anything else: the reference (cuBLAS on the GPU)."""
    from lmdepot.runtime.kernels.gemv import gemv

    if _gemv_applies(x, weight, bias):
        return gemv(x, weight, bias, out_dtype)
    return reference.linear(x, weight, bias, out_dtype)


def silu_mul_linear(gate_up, weight, bias=None, out_dtype=None):
    """Down projection of the activation: where the GEMV applies, silu·mul is computed in its input
    loads (one launch less per layer, the same numbers as the silu_mul kernel + the GEMV)."""
    from lmdepot.runtime.kernels.gemv import gemv

    if gate_up.is_cuda and gate_up.shape[-1] == 2 * weight.shape[-1] and _gemv_applies(gate_up, weight, bias):
        return gemv(gate_up, weight, bias, out_dtype, gated=True)
    return ops.linear(ops.silu_mul(gate_up), weight, bias, out_dtype)


def add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias=None, out_dtype=None):
    if not x.is_cuda:
        return ops.norm_then_linear(x, residual, norm_weight, eps, weight, bias, out_dtype)
    return add_rms_norm_linear_gemv(x, residual, norm_weight, eps, weight, bias, out_dtype)


def add_rms_norm_linear_gemv(x, residual, norm_weight, eps, weight, bias=None, out_dtype=None):
    """One row whose linear takes the GEMV (_gemv_applies, LMDEPOT_DENSE_GEMV not 0): the residual add
    and the norm computed in the GEMV's input loads (one launch less per norm, kernels/rms_norm.py's
    rounding; only the order of the sum of squares differs); else ops.add_rms_norm, then ops.linear.
    Runs wherever the tensors are (the CPU tests drive it through Triton's interpreter)."""
    from lmdepot.runtime.kernels.gemv import gemv

    if (x.numel() == residual.numel() == x.shape[-1] and x.is_contiguous() and norm_weight.is_contiguous()
            and x.dtype in (residual.dtype, torch.float32) and _gemv_applies(residual, weight, bias)):
        return gemv(x, weight, bias, out_dtype, norm=(residual, norm_weight, eps))
    return ops.norm_then_linear(x, residual, norm_weight, eps, weight, bias, out_dtype)


# --- attention: fused rope + KV write, paged prefill/extend and decode attention -------------------

def rope_store_kv(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping):
    if not q.is_cuda:
        return reference.rope_store_kv(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping)
    return rope_store_kv_kernel(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping)


def paged_attention(q, k, v, k_cache, v_cache, ctx, scale):
    if not q.is_cuda:
        return reference.paged_attention(q, k, v, k_cache, v_cache, ctx, scale)
    return paged_attention_kernel(q, k, v, k_cache, v_cache, ctx, scale)


# The routing below runs wherever the tensors are (the CPU tests drive it through Triton's interpreter).

def rope_store_kv_kernel(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping):
    if any(x is not None and x.stride(-1) != 1 for x in (q, k, v, cos, sin, k_cache, v_cache)):
        return reference.rope_store_kv(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping)
    from lmdepot.runtime.kernels.rope_store_kv import rope_store_kv as kernel

    return kernel(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping)


def paged_attention_kernel(q, k, v, k_cache, v_cache, ctx, scale):
    """Decode-only steps (one new token per sequence, no sliding window cutting in) use the split-K
    decode kernel, which spreads long contexts over the GPU; prefill, extend (prefix-cache hits,
    chunked prefill) and mixed prefill + decode batches the prefill kernel, a mixed batch's leading
    decodes the decode kernel (split_mixed). Only the step's device tensors and python ints of the
    Context are read (CUDA-graph safe)."""
    # tl.dot needs 16-wide operands: tiny head dims go to the reference; fp32 dots would run as tf32.
    if q.shape[-1] < 16 or q.shape[0] == 0:
        return reference.paged_attention(q, k, v, k_cache, v_cache, ctx, scale)
    from lmdepot.runtime.kernels.paged_decode_attention import paged_decode_attention
    from lmdepot.runtime.kernels.prefill_attention import prefill_attention

    decodes = _decode_fits(ctx, k_cache.shape[1])
    if ctx.is_decode and decodes:
        return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
    if q.dtype == torch.float32:
        return reference.paged_attention(q, k, v, k_cache, v_cache, ctx, scale)

    def prefill(q, block_tables, q_start_loc, context_lens, out=None):
        return prefill_attention(q, k_cache, v_cache, block_tables, q_start_loc, context_lens, ctx.max_q_len, scale,
                                 ctx.sliding_window, out=out)

    if decodes and ctx.leading_decodes >= MIXED_DECODES:
        return split_mixed(q, ctx, lambda q, bt, lens, out: paged_decode_attention(q, k_cache, v_cache, bt, lens, scale,
                                                                                   out=out), prefill)
    return prefill(q, ctx.block_tables, ctx.q_start_loc, ctx.context_lens)


MIXED_DECODES = 16   # fewer leading decodes in a mixed step: the one prefill launch costs less than two


def _decode_fits(ctx, page: int) -> bool:
    """The decode kernels' conditions: 16+ key pages (tl.dot), no sliding window cutting in."""
    window = ctx.sliding_window
    return page >= 16 and not (window and ctx.max_ctx_len > window)


def split_mixed(q, ctx, decode, prefill):
    """A mixed prefill + decode step in two launches: its leading one-token sequences (the scheduler
    puts running sequences first) through `decode`, the rest through `prefill`, into one output. In
    the prefill kernel a decode row is one useful row of a 64-128-row tile, one program per (sequence,
    kv head) walking the whole context; the split-K decode kernel reads the same keys spread over the GPU."""
    n = ctx.leading_decodes
    if ctx.tail_q_start_loc is None:   # every layer of the step splits the same way
        ctx.tail_q_start_loc = ctx.q_start_loc[n:] - n
    out = torch.empty_like(q)
    decode(q[:n], ctx.block_tables[:n], ctx.context_lens[:n], out[:n])
    prefill(q[n:], ctx.block_tables[n:], ctx.tail_q_start_loc, ctx.context_lens[n:], out[n:])
    return out


def _install_attention() -> None:
    for name, fn in (("rope_store_kv", rope_store_kv), ("paged_attention", paged_attention)):
        ops.register(name, fn)


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


# --- quantized KV cache (int8 / int4 online): store, prefill and decode attention kernels ------

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
    if not q.is_cuda:
        return reference.paged_attention_quant(q, k, v, cache, ctx, scale)
    return paged_attention_quant_kernel(q, k, v, cache, ctx, scale)


def paged_attention_quant_kernel(q, k, v, cache, ctx, scale):
    """As paged_attention_kernel over an int8/int4 cache: decode-only steps use the split-K
    decode-quant kernel, prefill/extend/mixed steps (and windowed decodes) the prefill-quant kernel,
    a mixed batch's leading decodes the decode-quant kernel once the prefill kernel has run here;
    static scales, other group sizes, fp32 and tiny heads the reference. Reads only ctx's device
    tensors and python ints (CUDA-graph safe)."""
    if q.shape[0] == 0 or ctx.block_tables is None or not _kv_kernels_fit(cache, q.shape[-1]):
        return reference.paged_attention_quant(q, k, v, cache, ctx, scale)
    from lmdepot.runtime.kernels.paged_decode_attention_quant import paged_decode_attention_quant
    from lmdepot.runtime.kernels.prefill_attention_quant import prefill_attention_quant

    decodes = _decode_fits(ctx, cache.codes[0].shape[1])
    if ctx.is_decode and decodes:
        return paged_decode_attention_quant(q, cache, ctx.block_tables, ctx.context_lens, scale)
    if q.dtype == torch.float32:   # fp32 dots would run as tf32
        return reference.paged_attention_quant(q, k, v, cache, ctx, scale)
    if decodes and ctx.leading_decodes >= MIXED_DECODES and \
            _prefill_quant_state.get((cache.bits, cache.key_channel, q.shape[-1])):   # the kernel has run here
        return split_mixed(
            q, ctx, lambda q, bt, lens, out: paged_decode_attention_quant(q, cache, bt, lens, scale, out=out),
            lambda q, bt, qsl, lens, out: prefill_attention_quant(q, cache, bt, qsl, lens, ctx.max_q_len, scale,
                                                                  ctx.sliding_window, out=out))
    return _prefill_quant(q, k, v, cache, ctx, scale)


_prefill_quant_state: dict = {}   # (bits, key_channel, head_dim) -> True once launched, False once failed


def _prefill_quant(q, k, v, cache, ctx, scale):
    """Safety net for a kernel no GPU had compiled when it was written: if its first CUDA launch for a
    cache variant raises, or any later launch hits a Triton compile/resource error (a new tile
    config), warn once and use the reference for that variant from then on."""
    from lmdepot.runtime.kernels.prefill_attention_quant import prefill_attention_quant

    key = (cache.bits, cache.key_channel, q.shape[-1])
    if _prefill_quant_state.get(key) is False:
        return reference.paged_attention_quant(q, k, v, cache, ctx, scale)
    try:
        out = prefill_attention_quant(q, cache, ctx.block_tables, ctx.q_start_loc, ctx.context_lens,
                                      ctx.max_q_len, scale, ctx.sliding_window)
    except Exception as exc:
        try:
            from triton.errors import TritonError
        except ImportError:   # older Triton: no common base class
            TritonError = ()
        if not q.is_cuda or (key in _prefill_quant_state and not isinstance(exc, TritonError)):
            raise   # the interpreter's tests see every error; a runtime error after a good launch too
        import warnings

        _prefill_quant_state[key] = False
        msg = str(exc).strip().splitlines()
        warnings.warn(f"prefill_attention_quant kernel failed ({type(exc).__name__}: "
                      f"{msg[0] if msg else ''}); using the torch reference")
        return reference.paged_attention_quant(q, k, v, cache, ctx, scale)
    _prefill_quant_state[key] = True
    return out


def _install_kv_quant() -> None:
    for name, fn in (("store_kv_quant", store_kv_quant), ("paged_attention_quant", paged_attention_quant)):
        ops.register(name, fn)


def install() -> None:
    global _installed
    if _installed:
        return
    for name, fn in (("rms_norm", rms_norm), ("add_rms_norm", add_rms_norm), ("silu_mul", silu_mul),
                     ("linear_int4", linear_int4), ("add_rms_norm_linear", add_rms_norm_linear)):
        ops.register(name, fn)
    if DENSE_GEMV_ROWS:
        ops.register("linear", linear)
        ops.register("silu_mul_linear", silu_mul_linear)
    _install_attention()
    _install_w8a8()
    _install_kv_quant()
    _installed = True
