"""Tiny random-weight HF checkpoints built from transformers configs (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHS = ("llama", "llama3-tied", "mistral", "qwen2", "internlm2")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer over a synthetic vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def make_tiny_checkpoint(out: Path, arch: str, dtype: torch.dtype = torch.float16, **overrides) -> Path:
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    if arch == "llama":
        config = _llama_config(**overrides)
    elif arch == "llama3-tied":
        config = _llama_config(tie_word_embeddings=True, **({"rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}} | overrides))
    elif arch == "mistral":
        config = MistralConfig(**(dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=4, sliding_window=128,
                                       max_position_embeddings=256) | overrides))
    elif arch == "qwen2":
        config = Qwen2Config(**(dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                     tie_word_embeddings=False) | overrides))
    elif arch == "internlm2":
        return make_internlm2_checkpoint(out, dtype, **overrides)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # HF initializes norms to ones and biases to zeros; make them informative
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.1)
    model.save_pretrained(out)
    make_tokenizer(out, config.vocab_size)
    return out


def make_internlm2_checkpoint(out: Path, dtype: torch.dtype = torch.float16, **overrides) -> Path:
    """InternLM2 has no transformers class: pack a Llama model's weights with InternLM2's names.

    wqkv rows interleave GQA groups: for each kv head, its `groups` q heads, then k, then v.
    The returned dir also holds `reference/`, the equivalent Llama checkpoint.
    """
    ref = make_tiny_checkpoint(out / "reference", "llama", dtype, **overrides)
    from safetensors.torch import load_file, save_file

    cfg = json.loads((ref / "config.json").read_text())
    sd = load_file(ref / "model.safetensors")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    groups = heads // kv
    new = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "model.norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        q = sd[f"{p}.self_attn.q_proj.weight"].reshape(kv, groups, d, -1)
        k = sd[f"{p}.self_attn.k_proj.weight"].reshape(kv, 1, d, -1)
        v = sd[f"{p}.self_attn.v_proj.weight"].reshape(kv, 1, d, -1)
        new[f"{p}.attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1]).contiguous()
        new[f"{p}.attention.wo.weight"] = sd[f"{p}.self_attn.o_proj.weight"]
        new[f"{p}.feed_forward.w1.weight"] = sd[f"{p}.mlp.gate_proj.weight"]
        new[f"{p}.feed_forward.w3.weight"] = sd[f"{p}.mlp.up_proj.weight"]
        new[f"{p}.feed_forward.w2.weight"] = sd[f"{p}.mlp.down_proj.weight"]
        new[f"{p}.attention_norm.weight"] = sd[f"{p}.input_layernorm.weight"]
        new[f"{p}.ffn_norm.weight"] = sd[f"{p}.post_attention_layernorm.weight"]
    save_file(new, out / "model.safetensors")
    internlm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
                "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
                "num_attention_heads": heads, "num_key_value_heads": kv,
                "num_hidden_layers": cfg["num_hidden_layers"], "vocab_size": cfg["vocab_size"],
                "rms_norm_eps": cfg["rms_norm_eps"], "rope_theta": 10000.0, "hidden_act": "silu",
                "max_position_embeddings": cfg["max_position_embeddings"], "bos_token_id": 1, "eos_token_id": 2,
                "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(internlm, indent=2))
    make_tokenizer(out, cfg["vocab_size"])
    return out
