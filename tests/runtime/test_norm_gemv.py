"""The residual add + RMSNorm computed inside the one-row dense GEMV (ops.add_rms_norm_linear, NORM
mode of kernels/gemv.py) in the engine: Triton's interpreter on the CPU routes the ops as
ops/triton_ops.py does on CUDA, and the tokens and logits match the unfused path."""

import pytest
import torch

from lmdepot.runtime import ops
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams

PROMPTS = [[5, 17, 33, 8], [40, 2, 99, 150, 7, 61, 12]]


def _route(monkeypatch, gemv_rows: int, fused: bool):
    """The Triton ops on CPU tensors: the norm kernel, the dense GEMV for one row (gemv_rows=0:
    LMDEPOT_DENSE_GEMV=0, the torch linear) and, if fused, the NORM GEMV. Returns the list that
    records each NORM launch."""
    from lmdepot.runtime.kernels import gemv as gemv_mod
    from lmdepot.runtime.kernels.rms_norm import rms_norm
    from lmdepot.runtime.ops import triton_ops

    monkeypatch.setattr(triton_ops, "DENSE_GEMV_ROWS", gemv_rows)
    monkeypatch.setitem(ops._TABLE, "add_rms_norm", lambda x, r, w, eps: rms_norm(x, r, w, eps))
    monkeypatch.setitem(ops._TABLE, "linear", triton_ops.linear_gemv)
    monkeypatch.setitem(ops._TABLE, "add_rms_norm_linear",
                        triton_ops.add_rms_norm_linear_gemv if fused else ops.norm_then_linear)
    launches, orig = [], gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **k: (launches.append(k["norm"] is not None) if "norm" in k
                                                           else None) or orig(*a, **k))
    return launches


def _generate(ws, graphs: bool):
    """Greedy tokens and every step's logits (async_steps off: each step through runner.execute)."""
    kw = dict(dtype="fp16", num_kv_blocks=16, cache_block_seq_len=16, max_batch_size=2, session_len=64,
              quiet=True, async_steps=False)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(ws, eager=not graphs, **kw) as llm:
        runner = llm.engine.runner
        execute, steps = runner.execute, []
        runner.execute = lambda meta: steps.append(execute(meta).clone()) or steps[-1]
        tokens = [llm.generate([p], params)[0].token_ids for p in PROMPTS]   # batch 1: one-row decode steps
    return tokens, steps


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors; the GPU runs the test below")
@pytest.mark.parametrize("graphs", [False, True])
def test_fused_norm_gemv_matches_unfused_engine(tiny, monkeypatch, graphs):
    """Batch-1 decode steps (uncaptured decode-graph path too, LMDEPOT_GRAPHS_ON_CPU=1): per step 2 x 3
    layers - 1 (the first layer's first norm has no residual) + the final norm = 6 NORM launches, and
    one for each prefill's logit row;
    tokens equal those of LMDEPOT_DENSE_GEMV=0 (torch linears, separate norm kernel) and of the
    unfused kernels (norm kernel, then the GEMV); logits within the GEMVs' summation-order and one
    normed-value ulp differences."""
    if graphs:
        monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    _, ws = tiny("llama")
    runs = {}
    for name, rows, fused in (("fused", 1, True), ("unfused", 1, False), ("dense_gemv_0", 0, True)):
        with monkeypatch.context() as m:
            launches = _route(m, rows, fused)
            runs[name] = _generate(ws, graphs)
            if name == "fused":
                decode_steps = len(runs[name][1]) - len(PROMPTS)   # one prefill step per prompt
                # + each prefill's final norm: its one logit row (the last token's) takes the NORM lm_head
                assert decode_steps == 10 and launches.count(True) == 6 * decode_steps + len(PROMPTS)
            else:
                assert True not in launches
    tokens, logits = runs["fused"]
    assert len(logits) == 12
    # logits of |x| < 0.4 here, fp16 steps of 2.4e-4 there: a few steps' slack (bit-equal when written)
    for other in ("unfused", "dense_gemv_0"):
        assert runs[other][0] == tokens
        for a, b in zip(logits, runs[other][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_fused_norm_matches_dense_gemv_off(tmp_path, monkeypatch):
    """On CUDA with the Triton ops and decode CUDA graphs: batch-1 greedy decoding with the NORM GEMV gives
    LMDEPOT_DENSE_GEMV=0's tokens (cuBLAS, separate norm kernel), logits within 1e-2 of their largest.
    At hidden 512 every one-row launch splits K, which the default routing leaves to cuBLAS: the fused
    run takes LMDEPOT_DENSE_GEMV=1's routing (split launches too; NORM for one row)."""
    from lmdepot.convert.converter import ConvertOptions, convert_model
    from lmdepot.runtime.kernels import gemv as gemv_mod
    from lmdepot.runtime.ops import triton_ops
    from tests.tiny_models import make_tiny_checkpoint

    hf_dir = make_tiny_checkpoint(tmp_path / "hf", "llama", hidden_size=512, intermediate_size=1024,
                                  num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, vocab_size=500)
    convert_model(str(hf_dir), tmp_path / "ws", ConvertOptions())
    kw = dict(device="cuda", dtype="fp16", cache_block_seq_len=16, num_kv_blocks=64, max_batch_size=4,
              session_len=128, quiet=True, async_steps=False)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    launches, orig = [], gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **k: launches.append(k.get("norm") is not None) or orig(*a, **k))
    runs = {}
    for rows in (4, 0):
        monkeypatch.setattr(triton_ops, "DENSE_GEMV_ROWS", rows)
        with LLM(tmp_path / "ws", **kw) as llm:
            runner = llm.engine.runner
            assert runner.graphs is not None
            execute, steps = runner.execute, []
            runner.execute = lambda meta: steps.append(execute(meta).clone()) or steps[-1]
            runs[rows] = [llm.generate([p], params)[0].token_ids for p in PROMPTS], steps
            if rows:   # captured (graph warm-up and capture) and eager (prefill logits) NORM launches
                assert runner.graphs.replays > 0 and launches.count(True) >= 6
    assert True in launches and runs[4][0] == runs[0][0]
    for a, b in zip(runs[4][1], runs[0][1]):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-2
