"""The parameter operands both attention launchers over a quantized paged KV cache pass their kernels
(paged_decode_attention_quant.py, prefill_attention_quant.py; schemes: runtime/ops/kv_quant.py).
Both kernels run on the raw codes and apply the quantizers as vectors (per token or per channel),
so nothing is dequantized element by element any more."""

from __future__ import annotations


def param_operands(cache):
    """The parameter tensors both attention launchers pass for a QuantKVCache: (key scale, key zero,
    key min, key sink, value scale, value zero, the tensor whose strides are the per-channel ones).
    Without the channel key scheme the key min/sink slots are unused and get the value scales, and
    the per-channel strides are read off the value scales."""
    vs, vz = cache.scales[1], cache.zeros[1]
    if cache.key_channel:
        return cache.key_scale, vz, cache.key_min, cache.key_sink, vs, vz, cache.key_scale
    return cache.scales[0], cache.zeros[0], vs, vs, vs, vz, vs
