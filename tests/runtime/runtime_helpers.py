"""Tiny random HF checkpoints of every supported architecture, and small engine helpers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmdepot.convert.converter import ConvertOptions, convert_model

VOCAB = 160
ARCHS = ("llama", "mistral", "qwen2", "internlm2", "llama3_rope", "linear_rope", "dynamic_rope")


def tiny_tokenizer(dst: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
    fast.save_pretrained(dst)


def _llama_config(**over):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
    kw.update(over)
    return kw


def build_hf(kind: str, dst: Path, seed: int = 0):
    """Save a random tiny checkpoint of `kind`; returns the HF model (fp32) that defines its logits.

    Weights are rounded to fp16 first, so an fp16 workspace holds exactly the reference weights.
    For internlm2 (no transformers class) the reference is the Llama model the checkpoint is packed from.
    """
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config()))
    elif kind == "llama3_rope":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})))
    elif kind == "linear_rope":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})))
    elif kind == "dynamic_rope":  # max_position_embeddings 32: the tests run past it
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(max_position_embeddings=32, rope_parameters={
            "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})))
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**_llama_config(sliding_window=16)))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**_llama_config(use_sliding_window=False)))
    elif kind == "internlm2":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config()))
    else:
        raise ValueError(kind)
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        if kind == "qwen2":  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.copy_((torch.randn_like(proj.bias) * 0.5).half().float())
    dst.mkdir(parents=True, exist_ok=True)
    if kind == "internlm2":
        _save_internlm2(model, dst)
        model.save_pretrained(dst / "llama-reference", safe_serialization=True)
    else:
        model.save_pretrained(dst, safe_serialization=True)
    tiny_tokenizer(dst)
    return model


def _save_internlm2(model, dst: Path) -> None:
    from safetensors.torch import save_file

    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d, g = cfg.hidden_size // hq, hq // hkv
    sd = model.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        wq = sd[p + "self_attn.q_proj.weight"].reshape(hkv, g, d, -1)
        wk = sd[p + "self_attn.k_proj.weight"].reshape(hkv, 1, d, -1)
        wv = sd[p + "self_attn.v_proj.weight"].reshape(hkv, 1, d, -1)
        out[q + "attention.wqkv.weight"] = torch.cat([wq, wk, wv], dim=1).reshape(-1, cfg.hidden_size)
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    conf = cfg.to_dict()
    conf.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False)
    (dst / "config.json").write_text(json.dumps(conf, indent=2))


def reference_dir(hf_dir: Path) -> Path:
    """The directory AutoModelForCausalLM can load as the reference for a checkpoint built by build_hf."""
    ref = Path(hf_dir) / "llama-reference"
    return ref if ref.is_dir() else Path(hf_dir)


def convert(src: Path, dst: Path, tp: int = 1, dtype: str = "fp16", **kw) -> Path:
    convert_model(str(src), dst, ConvertOptions(tp=tp, dtype=dtype, **kw))
    return dst


def prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one forward over an idle engine's first blocks."""
    bs = engine.bm.block_size
    n = len(ids)
    blocks = list(range(-(-n // bs)))
    meta = {"tokens": ids, "positions": list(range(n)), "slots": list(range(n)), "seqs": [(n, n, blocks)],
            "logit_rows": list(range(n))}
    return engine.runner.run(meta)


def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    rot = model.model.rotary_emb
    if rot.rope_type == "dynamic":
        # HF's dynamic RoPE keeps the longest length seen across calls; each request starts afresh here
        rot.inv_freq = rot.original_inv_freq.clone()
        rot.max_seq_len_cached = rot.original_max_seq_len
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def eval_ppl_error(*args) -> str:
    """`lmdepot eval ppl ARGS` must fail with exit 2 and exactly one `error:` line; returns it."""
    from click.testing import CliRunner

    from lmdepot.cli import main

    r = CliRunner().invoke(main, ["eval", "ppl", *map(str, args)])
    assert r.exit_code == 2, (r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def record_graph_and_eager_steps(runner, graphs) -> list:
    """Make every step that replays a graph run eagerly on the same metadata first; returns the
    list that collects (batch, eager logits, graph logits)."""
    execute, pairs = runner.execute, []

    def both(meta):
        if not graphs.fits(meta, runner.cfg):
            return execute(meta)
        runner.graphs = None
        try:
            eager = execute(meta).clone()
        finally:
            runner.graphs = graphs
        out = execute(meta)
        pairs.append((len(meta["seqs"]), eager, out.clone()))
        return out

    runner.execute = both
    # an asynchronous decode step (engine async_steps) takes its ids from the device: run it here with
    # them as a list, so that it is compared too
    runner.run_decode = lambda meta, tokens: both({**meta, "tokens": tokens.tolist()})
    return pairs
