"""The op layer: every numeric kernel the model calls goes through here.

Ops are plain functions looked up in a table, so another backend (e.g. Triton kernels) can replace
any of them with `register(name, fn)` without touching the model. The torch reference
implementations in `reference.py` define the semantics.
"""

from __future__ import annotations

from typing import Callable

from lmdepot.runtime.ops import kv_quant, reference

_TABLE: dict[str, Callable] = {
    name: getattr(reference, name)
    for name in ("rms_norm", "add_rms_norm", "rope_cos_sin", "apply_rope", "linear", "linear_int4", "silu_mul",
                 "silu_mul_linear", "store_kv", "rope_store_kv", "paged_attention", "paged_attention_quant",
                 "rms_norm_quant", "quant_per_token", "linear_w8a8")
}
_TABLE["store_kv_quant"] = kv_quant.store_kv_quant


def register(name: str, fn: Callable) -> None:
    if name not in _TABLE:
        raise KeyError(f"unknown op {name}")
    _TABLE[name] = fn


def get(name: str) -> Callable:
    """The implementation registered now (the runner checks that its CUDA graphs capture safe ones)."""
    return _TABLE[name]


def rms_norm(x, weight, eps):
    return _TABLE["rms_norm"](x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    """(rms_norm(x + residual) * weight, x + residual)."""
    return _TABLE["add_rms_norm"](x, residual, weight, eps)


def add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias=None, out_dtype=None):
    """(linear(add_rms_norm(x, residual, norm_weight, eps)[0], weight, bias, out_dtype), x + residual):
    a sublayer's residual add and the next norm with the linear that reads it (q/k/v, gate/up,
    lm_head), which a kernel may compute in its input loads. x may be a float32 tensor-parallel sum."""
    return _TABLE["add_rms_norm_linear"](x, residual, norm_weight, eps, weight, bias, out_dtype)


def norm_then_linear(x, residual, norm_weight, eps, weight, bias=None, out_dtype=None):
    """add_rms_norm_linear's definition (and default): the two registered ops one after the other."""
    h, res = add_rms_norm(x, residual, norm_weight, eps)
    return linear(h, weight, bias, out_dtype), res


def rope_cos_sin(inv_freq, positions, dtype):
    return _TABLE["rope_cos_sin"](inv_freq, positions, dtype)


def apply_rope(x, cos, sin, rot_dim):
    return _TABLE["apply_rope"](x, cos, sin, rot_dim)


def linear(x, weight, bias=None, out_dtype=None):
    """x @ weight.T (+ bias); out_dtype=float32 keeps the unrounded sums (tensor-parallel partials)."""
    return _TABLE["linear"](x, weight, bias, out_dtype)


def linear_int4(x, weight, in_features, bias=None, out_dtype=None):
    """x @ an int4 group-quantized weight (+ bias). weight: a dict, the workspace tensors {"qweight",
    "scales", "zeros"} (formats/int4.py) or, on the GPU, the layout Linear made of them at load
    (triton_ops.int4_layout: w4a16_gemv.repack's {"qt", "scales", "zeros", "group"})."""
    return _TABLE["linear_int4"](x, weight, in_features, bias, out_dtype)


def rms_norm_quant(x, weight, eps):
    """W8A8: (int8 codes of rms_norm(x) * weight per token, float32 per-token scales)."""
    return _TABLE["rms_norm_quant"](x, weight, eps)


def quant_per_token(x):
    return _TABLE["quant_per_token"](x)


def linear_w8a8(xq, x_scales, qweight, w_scales, bias, dtype):
    """int8 x int8 -> int32, scaled: xq (..., K), qweight (N, K); output in `dtype`."""
    return _TABLE["linear_w8a8"](xq, x_scales, qweight, w_scales, bias, dtype)


def silu_mul(gate_up):
    """silu(gate) * up from the fused gate/up projection output (..., 2·I) -> (..., I)."""
    return _TABLE["silu_mul"](gate_up)


def silu_mul_linear(gate_up, weight, bias=None, out_dtype=None):
    """linear(silu_mul(gate_up), weight, bias, out_dtype): the MLP's down projection with its
    activation, which a kernel may compute while loading its input."""
    return _TABLE["silu_mul_linear"](gate_up, weight, bias, out_dtype)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    return _TABLE["store_kv"](k, v, k_cache, v_cache, slot_mapping)


def rope_store_kv(q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping):
    """apply_rope on q and k, then store_kv; returns the rotated (q, k). q and k may be rotated in
    place (they are the qkv projection's fresh output), so use the returned tensors. With k_cache and
    v_cache None (a quantized cache stores k and v itself) it only rotates: one launch, not four."""
    return _TABLE["rope_store_kv"](q, k, v, cos, sin, rot_dim, k_cache, v_cache, slot_mapping)


def paged_attention(q, k, v, k_cache, v_cache, ctx, scale):
    return _TABLE["paged_attention"](q, k, v, k_cache, v_cache, ctx, scale)


def store_kv_quant(k, v, cache, slot_mapping):
    """Quantize and store new k/v into a QuantKVCache (runtime/kv_cache.py)."""
    return _TABLE["store_kv_quant"](k, v, cache, slot_mapping)


def paged_attention_quant(q, k, v, cache, ctx, scale):
    return _TABLE["paged_attention_quant"](q, k, v, cache, ctx, scale)


_TABLE["add_rms_norm_linear"] = norm_then_linear
