"""Run a source checkpoint one decoder layer at a time, for calibration and AWQ search.

Every supported architecture is brought to the canonical Llama layer by the converter's adapters
(InternLM2's packed wqkv included), and that layer is loaded into transformers' `LlamaDecoderLayer`.
Only one layer's weights and the hidden states of the calibration samples live in memory.
Mistral's sliding window is not applied: calibration windows are assumed shorter than it.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from lmdepot.convert.arch import LayerTensors, adapter_for
from lmdepot.convert.source import Source
from lmdepot.errors import ConvertError
from lmdepot.formats.config import WorkspaceConfig

TOKENS_PER_BATCH = 4096  # bounds the (heads, T, T) attention scores of one forward


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hf_llama_config(cfg: WorkspaceConfig):
    from transformers import LlamaConfig

    rope = {"rope_type": cfg.rope_scaling_type or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_type:
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.original_max_position_embeddings)
    hf = LlamaConfig(hidden_size=cfg.hidden_units, intermediate_size=cfg.inter_size,
                     num_attention_heads=cfg.head_num, num_key_value_heads=cfg.kv_head_num,
                     head_dim=cfg.size_per_head, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
                     max_position_embeddings=cfg.max_position_embeddings, attention_bias=bool(cfg.attn_bias),
                     num_hidden_layers=1, vocab_size=cfg.vocab_size)
    hf._attn_implementation = "sdpa"
    return hf


class KVRecorder:
    """Stands in for a KV cache: the attention hands it the post-RoPE keys and the values."""

    def __init__(self, sink):
        self.sink = sink

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.sink(key, value)  # (batch, kv_heads, T, head_dim)
        return key, value


class LayerRunner:
    def __init__(self, src: Source, cfg: WorkspaceConfig, device: torch.device | None = None):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.src, self.cfg = src, cfg
        self.device = device or default_device()
        self.adapter = adapter_for(cfg.model_arch, asdict(cfg))
        self.hf_config = hf_llama_config(cfg)
        self.rotary = LlamaRotaryEmbedding(self.hf_config).to(self.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.src.get(self.adapter.embed)
        return table[tokens].to(device=self.device, dtype=torch.float32)

    def layer_tensors(self, i: int) -> LayerTensors:
        layer = self.adapter.layer(i, self.src.get, self.src.get_linear)
        if any(lin.quantized for lin in (*layer.qkv, layer.o, layer.gate, layer.up, layer.down)):
            raise ConvertError(f"{self.src.hf_dir}: the checkpoint is already quantized; calibration needs"
                               " floating-point weights")
        return layer

    def module(self, layer: LayerTensors):
        """A float32 LlamaDecoderLayer holding `layer`'s weights."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            mod = LlamaDecoderLayer(self.hf_config, 0)
        state = {}
        for name, lin in (("self_attn.q_proj", layer.qkv[0]), ("self_attn.k_proj", layer.qkv[1]),
                          ("self_attn.v_proj", layer.qkv[2]), ("self_attn.o_proj", layer.o),
                          ("mlp.gate_proj", layer.gate), ("mlp.up_proj", layer.up), ("mlp.down_proj", layer.down)):
            state[f"{name}.weight"] = lin.weight.t()
            if name.startswith("self_attn") and self.cfg.attn_bias:
                out = lin.weight.shape[1]
                state[f"{name}.bias"] = lin.bias if lin.bias is not None else torch.zeros(out)
        state["input_layernorm.weight"] = layer.attn_norm
        state["post_attention_layernorm.weight"] = layer.ffn_norm
        state = {k: v.to(device=self.device, dtype=torch.float32).contiguous() for k, v in state.items()}
        mod.load_state_dict(state, assign=True)
        return mod.eval()

    def batches(self, n: int, seqlen: int) -> list[slice]:
        per = max(1, TOKENS_PER_BATCH // seqlen)
        return [slice(s, min(s + per, n)) for s in range(0, n, per)]

    def rope(self, seqlen: int):
        pos = torch.arange(seqlen, device=self.device)[None]
        dummy = torch.zeros(1, seqlen, 1, device=self.device)
        return self.rotary(dummy, pos)

    def causal_mask(self, seqlen: int) -> torch.Tensor:
        m = torch.full((seqlen, seqlen), float("-inf"), device=self.device).triu(1)
        return m[None, None]

    @torch.no_grad()
    def forward(self, mod, hidden: torch.Tensor, kv_sink=None) -> torch.Tensor:
        """All samples through one decoder layer, in batches; returns the layer's outputs."""
        n, seqlen, _ = hidden.shape
        rope, mask = self.rope(seqlen), self.causal_mask(seqlen)
        out = torch.empty_like(hidden)
        for sl in self.batches(n, seqlen):
            cache = KVRecorder(kv_sink) if kv_sink else None
            y = mod(hidden[sl], attention_mask=mask, position_embeddings=rope, past_key_values=cache,
                    use_cache=cache is not None)
            out[sl] = y[0] if isinstance(y, tuple) else y
        return out

    @torch.no_grad()
    def attention(self, mod, x_normed: torch.Tensor) -> torch.Tensor:
        """self_attn output (before the residual) for already-normalized inputs (n, T, hidden)."""
        n, seqlen, _ = x_normed.shape
        rope, mask = self.rope(seqlen), self.causal_mask(seqlen)
        out = torch.empty_like(x_normed)
        for sl in self.batches(n, seqlen):
            out[sl] = mod.self_attn(x_normed[sl], position_embeddings=rope, attention_mask=mask)[0]
        return out
