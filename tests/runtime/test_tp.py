"""Tensor parallel over gloo: two processes give the tp=1 logits and greedy tokens."""

import shutil

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


def test_generate_cli_with_tp2(tiny):
    import os
    import subprocess
    import sys

    _, ws1 = tiny("qwen2")
    _, ws2 = tiny("qwen2", tp=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    outs = []
    for ws, tp in ((ws1, 1), (ws2, 2)):
        r = subprocess.run([sys.executable, "-m", "lmdepot.cli", "generate", str(ws), "--tp", str(tp), "--prompt",
                            "w7 w8 w9 w10 w11", "--no-chat-template", "--temperature", "0", "--max-new-tokens", "8",
                            "--cache-max-entry-count", "0.01"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] and len(outs[0].split()) == 8


def test_a_corrupt_file_of_another_rank_is_named(tiny, tmp_path):
    import pytest

    from lmdepot.errors import LmdepotError

    _, ws2 = tiny("qwen2", tp=2)
    ws = tmp_path / "ws"
    shutil.copytree(ws2, ws)
    path = ws / "weights/layers.1.1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(LmdepotError, match=r"rank 1: .*weights/layers\.1\.1\.safetensors.*corrupt"):
        LLM(ws, dtype="fp32", num_kv_blocks=8, quiet=True)   # tp comes from the workspace
