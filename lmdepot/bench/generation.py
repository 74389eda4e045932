"""`lmdepot bench generation`: decode speed of the engine and of HF transformers on the same model, in
the same run, beside the memory roofline (weight + KV bytes per step / measured copy bandwidth).

Models at real scale are random-weight checkpoints built from published configs (no hub access);
`--layers` keeps the per-layer shape and cuts the depth so a run fits a short device lease.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                         num_hidden_layers=28, vocab_size=151936, max_position_embeddings=32768),
}


def word_tokenizer(dst: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering the vocabulary, so synthetic checkpoints convert like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(dst)


def random_checkpoint(shape: str, dst: Path, layers: int | None = None) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kw = dict(SHAPES[shape]) | ({"num_hidden_layers": layers} if layers else {})
    config = (Qwen2Config if shape.startswith("qwen") else LlamaConfig)(**kw, tie_word_embeddings=False,
                                                                        bos_token_id=1, eos_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(dst)
    word_tokenizer(dst, config.vocab_size)
    return dst


def _engine_decode(ws: Path, batch: int, prompt_len: int, output_len: int, eager: bool = False) -> dict:
    from lmdepot.runtime.llm import LLM
    from lmdepot.runtime.sequence import SamplingParams

    llm = LLM(ws, dtype="fp16", max_batch_size=max(batch, 1), quiet=True, verify=False, eager=eager)
    try:
        gen = torch.Generator().manual_seed(0)
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        llm.generate([torch.randint(3, 1000, (prompt_len,), generator=gen).tolist()], SamplingParams(max_tokens=4))
        seqs = [llm.engine.add_request(torch.randint(3, 1000, (prompt_len,), generator=gen).tolist(), params)
                for _ in range(batch)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        first = None
        while llm.engine.has_unfinished():
            llm.engine.step()
            if first is None and all(s.num_output >= 1 for s in seqs):
                first = time.perf_counter()
        end = time.perf_counter()
    finally:
        llm.close()
    return {"ttft_s": first - start, "decode_tok_s": batch * (output_len - 1) / (end - first)}


def _hf_decode(hf_dir: Path, batch: int, prompt_len: int, output_len: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float16).cuda().eval()
    ids = torch.randint(3, 1000, (batch, prompt_len), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)
    prefill = run(1)
    total = run(output_len)
    return {"ttft_s": prefill, "decode_tok_s": batch * (output_len - 1) / (total - prefill)}


def run(shape: str = "llama2-7b", layers: int | None = 8, batches=(1, 16), prompt_len: int = 128,
        output_len: int = 128, peer: str | None = "hf", eager: bool = False) -> str:
    from lmdepot.bench.kernels import copy_bandwidth
    from lmdepot.convert.converter import ConvertOptions, convert_model
    from lmdepot.errors import LmdepotError

    if not torch.cuda.is_available():
        raise LmdepotError("bench generation needs a CUDA GPU (none visible)")
    bw = copy_bandwidth("cuda")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmdepot-bench-") as tmp:
        hf_dir = random_checkpoint(shape, Path(tmp) / "hf", layers)
        ws = Path(tmp) / "ws"
        convert_model(str(hf_dir), ws, ConvertOptions(tp=1, dtype="fp16"))
        weight_bytes = sum(p.stat().st_size for p in (ws / "weights").glob("*.safetensors"))
        cfg = SHAPES[shape]
        kv_per_token = 2 * (layers or cfg["num_hidden_layers"]) * cfg["num_key_value_heads"] * \
            cfg["hidden_size"] // cfg["num_attention_heads"] * 2
        for batch in batches:
            ours = _engine_decode(ws, batch, prompt_len, output_len, eager)
            step_bytes = weight_bytes + batch * (prompt_len + output_len // 2) * kv_per_token
            roof = batch * bw / step_bytes
            row = {"batch": batch, "engine": ours, "roofline_tok_s": roof,
                   "engine_roofline_pct": 100 * ours["decode_tok_s"] / roof}
            if peer == "hf":
                row["hf"] = _hf_decode(hf_dir, batch, prompt_len, output_len)
                torch.cuda.empty_cache()
                row["engine_vs_hf"] = ours["decode_tok_s"] / row["hf"]["decode_tok_s"]
            rows.append(row)
    meta = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "shape": shape, "layers": layers or SHAPES[shape]["num_hidden_layers"], "prompt_len": prompt_len,
            "output_len": output_len, "cuda_graphs": not eager, "copy_bandwidth_TBps": bw / 1e12, "weight_bytes": weight_bytes}
    return json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
