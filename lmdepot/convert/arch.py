"""Architecture adapters: HF config.json -> config.ini keys, HF tensor names -> canonical layers.

A canonical layer holds q/k/v/o/gate/up/down as `Linear`s in workspace orientation
(in_features, out_features) plus the two norm vectors; the TP splitter only sees this form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmdepot.convert.linear import Linear
from lmdepot.errors import ConvertError

LLAMA_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED = (*LLAMA_FAMILY, "InternLM2ForCausalLM")


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}.get(
        hf.get("model_type", ""), "")
    if arch not in SUPPORTED:
        raise ConvertError(f"unsupported architecture {arch or hf.get('model_type') or '(none)'};"
                           f" supported: {', '.join(SUPPORTED)}")
    return arch


def _rope(hf: dict) -> dict:
    """rope keys from either transformers 4 (rope_theta/rope_scaling) or 5 (rope_parameters)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    src = params if params.get("rope_type") not in (None, "default") else scaling
    if kind == "default":
        return {"rope_theta": float(theta)}
    if kind not in ("linear", "dynamic", "llama3"):
        raise ConvertError(f"unsupported rope scaling type {kind!r}; supported: linear, dynamic, llama3")
    out = {"rope_theta": float(theta), "rope_scaling_type": kind, "rope_scaling_factor": float(src["factor"])}
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(src["low_freq_factor"]),
                   rope_high_freq_factor=float(src["high_freq_factor"]),
                   original_max_position_embeddings=int(src["original_max_position_embeddings"]))
    return out


def _first_id(value, default: int) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else default
    return default if value is None else int(value)


def model_keys(hf: dict, arch: str) -> dict:
    """config.ini model keys for an HF config.json."""
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or hidden // heads)
        bias = arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias") or hf.get("bias"))
        if hf.get("mlp_bias"):
            raise ConvertError("mlp_bias = true is not supported")
        keys = dict(
            model_arch=arch, head_num=heads, kv_head_num=int(hf.get("num_key_value_heads") or heads),
            size_per_head=head_dim, hidden_units=hidden, vocab_size=int(hf["vocab_size"]),
            num_layer=int(hf["num_hidden_layers"]), inter_size=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), attn_bias=int(bias),
            start_id=_first_id(hf.get("bos_token_id"), 1), end_id=_first_id(hf.get("eos_token_id"), 2),
            rotary_embedding=head_dim, max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            sliding_window=int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window", True) else 0,
            tie_word_embeddings=int(bool(hf.get("tie_word_embeddings", False))),
            use_logn_attn=int(bool(hf.get("use_logn_attn", False))),
            **_rope(hf))
        if keys["use_logn_attn"] and hf.get("seq_length"):
            # Qwen1 names its training length seq_length; log-n scaling starts past it (as in TurboMind).
            keys["max_position_embeddings"] = int(hf["seq_length"])
    except KeyError as exc:
        raise ConvertError(f"config.json lacks {exc.args[0]}") from None
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    return keys


@dataclass
class LayerTensors:
    qkv: tuple[Linear, Linear, Linear]  # q, k, v separately, full heads
    o: Linear
    gate: Linear
    up: Linear
    down: Linear
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor


Get = Callable[[str], torch.Tensor]
GetLinear = Callable[[str], Linear]


class LlamaAdapter:
    """Llama 1/2/3, Mistral and Qwen2 share the HF Llama layout."""

    embed, norm, lm_head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

    def __init__(self, keys: dict):
        self.keys = keys

    def linear_prefixes(self, i: int) -> dict[str, str]:
        p = f"model.layers.{i}"
        return {"q": f"{p}.self_attn.q_proj", "k": f"{p}.self_attn.k_proj", "v": f"{p}.self_attn.v_proj",
                "o": f"{p}.self_attn.o_proj", "gate": f"{p}.mlp.gate_proj", "up": f"{p}.mlp.up_proj",
                "down": f"{p}.mlp.down_proj"}

    def norm_names(self, i: int) -> tuple[str, str]:
        return f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"

    def layer(self, i: int, get: Get, get_linear: GetLinear) -> LayerTensors:
        lp = self.linear_prefixes(i)
        attn_norm, ffn_norm = self.norm_names(i)
        return LayerTensors((get_linear(lp["q"]), get_linear(lp["k"]), get_linear(lp["v"])), get_linear(lp["o"]),
                            get_linear(lp["gate"]), get_linear(lp["up"]), get_linear(lp["down"]),
                            get(attn_norm), get(ffn_norm))


class InternLM2Adapter(LlamaAdapter):
    """InternLM2 packs q, k, v into `wqkv`, interleaved per GQA group: [q * groups, k, v] per kv head."""

    embed, norm, lm_head = "model.tok_embeddings.weight", "model.norm.weight", "output.weight"

    def linear_prefixes(self, i: int) -> dict[str, str]:
        p = f"model.layers.{i}"
        return {"qkv": f"{p}.attention.wqkv", "o": f"{p}.attention.wo", "gate": f"{p}.feed_forward.w1",
                "up": f"{p}.feed_forward.w3", "down": f"{p}.feed_forward.w2"}

    def norm_names(self, i: int) -> tuple[str, str]:
        return f"model.layers.{i}.attention_norm.weight", f"model.layers.{i}.ffn_norm.weight"

    def layer(self, i: int, get: Get, get_linear: GetLinear) -> LayerTensors:
        lp = self.linear_prefixes(i)
        packed = get_linear(lp["qkv"])
        if packed.quantized:
            raise ConvertError("int4 InternLM2 checkpoints are not supported")
        kv, d = self.keys["kv_head_num"], self.keys["size_per_head"]
        groups = self.keys["head_num"] // kv
        w = packed.weight.reshape(packed.weight.shape[0], kv, groups + 2, d)
        b = None if packed.bias is None else packed.bias.reshape(kv, groups + 2, d)

        def part(sl):
            bias = None if b is None else b[:, sl].reshape(-1)
            return Linear(w[:, :, sl].reshape(w.shape[0], -1), bias=bias)

        attn_norm, ffn_norm = self.norm_names(i)
        return LayerTensors((part(slice(0, groups)), part(slice(groups, groups + 1)), part(slice(groups + 1, None))),
                            get_linear(lp["o"]), get_linear(lp["gate"]), get_linear(lp["up"]),
                            get_linear(lp["down"]), get(attn_norm), get(ffn_norm))


def adapter_for(arch: str, keys: dict) -> LlamaAdapter:
    return InternLM2Adapter(keys) if arch == "InternLM2ForCausalLM" else LlamaAdapter(keys)
