"""Tensor parallel over gloo: two processes give the tp=1 logits and greedy tokens."""

import shutil

import torch

from runtime_helpers import prefill_logits

from lmdepot.runtime.llm import LLM
from lmdepot.runtime.loader import load_rank
from lmdepot.runtime.sequence import SamplingParams

PROMPTS = [list(range(3, 60)), [40, 41, 42], list(range(100, 150)) * 2]


def run(ws, tp):
    llm = LLM(ws, tp=tp, dtype="fp32", num_kv_blocks=32, cache_block_seq_len=16, max_num_batched_tokens=48,
              quiet=True)
    try:
        logits = prefill_logits(llm.engine, PROMPTS[0])
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        return logits, [o.token_ids for o in outs]
    finally:
        llm.close()


def test_tp2_equals_tp1(tiny):
    _, ws1 = tiny("qwen2")          # GQA (4 q heads, 2 kv heads) with qkv bias
    _, ws2 = tiny("qwen2", tp=2)
    logits1, tokens1 = run(ws1, 1)
    logits2, tokens2 = run(ws2, 2)
    assert logits2.shape == logits1.shape
    assert (logits2 - logits1).abs().max() < 1e-5
    assert tokens2 == tokens1


def test_a_rank_loads_only_its_own_files(tiny, tmp_path):
    _, ws2 = tiny("qwen2", tp=2)
    ws = tmp_path / "ws"
    shutil.copytree(ws2, ws)
    for f in (ws / "weights").glob("*.1.safetensors"):
        f.unlink()   # rank 1's files are gone; rank 0 does not notice
    w = load_rank(ws, rank=0, tp=2)
    hq, hkv = w.cfg.heads_of_rank()
    assert w.layers[0]["attention.w_qkv.weight"].shape == (64, (hq + 2 * hkv) * 16)
    assert w.globals["tok_embeddings.weight"].shape == (80, 64)   # half the vocab rows
