"""The decode-graph runner's padded static-buffer path, run uncaptured on the CPU
(LMDEPOT_GRAPHS_ON_CPU=1): same tokens as the eager engine, padded rows only touch the scratch block.
Capture and replay themselves are checked on a GPU in test_gpu.py."""

import pytest
import torch

from lmdepot.runtime.cuda_graph import buckets
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert buckets(1000)[-3:] == [224, 240, 256]   # bigger batches decode eagerly


def _prompts():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 150, (n,), generator=gen).tolist() for n in (3, 17, 9, 30, 5, 12, 21, 8, 40, 2, 15)]


@pytest.mark.parametrize("kind", ["llama", "mistral", "dynamic_rope"])
def test_padded_decode_path_matches_eager(tiny, monkeypatch, kind):
    _, ws = tiny(kind)
    prompts = _prompts()
    # Different lengths: sequences finish at different steps, so the batch walks down the buckets.
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    kw = dict(dtype="fp32", num_kv_blocks=48, cache_block_seq_len=16, max_batch_size=16, session_len=80, quiet=True)
    with LLM(ws, eager=True, **kw) as eager:
        assert eager.engine.runner.graphs is None
        want = [o.token_ids for o in eager.generate(prompts, params)]
    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    with LLM(ws, **kw) as llm:
        runner = llm.engine.runner
        graphs = runner.graphs
        assert graphs.sizes == [1, 2, 4, 8, 16] and graphs.max_blocks == 5
        # one scratch block past what the block manager hands out
        assert llm.engine.bm.num_blocks == 48 and runner.model.layers[0].attention.k_cache.shape[0] == 49
        scratch = runner.model.layers[0].attention.k_cache[48].clone()
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == want
        if kind == "llama":
            assert {16, 8, 4, 2, 1} <= graphs.used   # 11 rows pad to 16, then fewer as they finish
            # padded rows wrote their (position 0, token 0) KV into the scratch block (and nowhere else:
            # the tokens above would differ otherwise)
            assert not torch.equal(scratch, runner.model.layers[0].attention.k_cache[48])
        elif kind == "mistral":
            assert not graphs.used   # every batch has a sequence past the 16-token window: eager
        runner.close()
        assert runner.graphs is None


def test_a_one_token_prefill_chunk_runs_eagerly(tiny, monkeypatch):
    """q_len 1 but not the sequence's last token: it predicts nothing, so it is no decode step."""
    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    _, ws = tiny("llama")
    with LLM(ws, dtype="fp32", num_kv_blocks=16, cache_block_seq_len=16, max_batch_size=4, quiet=True) as llm:
        graphs = llm.engine.runner.graphs
        meta = {"tokens": [5], "positions": [0], "slots": [0], "seqs": [(1, 1, [0])], "logit_rows": []}
        assert not graphs.fits(meta, llm.engine.cfg)
        meta["logit_rows"] = [0]
        assert graphs.fits(meta, llm.engine.cfg)
        assert not graphs.fits({**meta, "seqs": [(1, 1, [0] * 99)]}, llm.engine.cfg)   # wider than session_len


def test_padded_decode_path_under_tp2(tiny, monkeypatch):
    """Both ranks take the padded path on the same steps (the decision comes from the broadcast
    metadata): tp=2 with it gives the tp=1 eager tokens."""
    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")   # inherited by the spawned rank
    _, ws1 = tiny("qwen2")
    _, ws2 = tiny("qwen2", tp=2)
    prompts = _prompts()[:5]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    kw = dict(dtype="fp32", num_kv_blocks=32, cache_block_seq_len=16, max_batch_size=8, session_len=64, quiet=True)
    with LLM(ws1, eager=True, **kw) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(ws2, tp=2, **kw) as llm:
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        assert 8 in llm.engine.runner.graphs.used   # 5 rows padded to 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors; the GPU runs test_gpu.py")
def test_padded_path_through_the_triton_kernels(tiny, monkeypatch):
    """The static buffers as the captured kernels read them (Triton's interpreter on the CPU): padded
    rows, scratch-block tables and full-width block tables give the eager kernels' logits."""
    from lmdepot.runtime import ops
    from lmdepot.runtime.kernels import paged_decode_attention as decode_mod
    from lmdepot.runtime.ops import triton_ops

    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    for name, fn in (("rope_store_kv", triton_ops.rope_store_kv_kernel),
                     ("paged_attention", triton_ops.paged_attention_kernel)):
        monkeypatch.setitem(ops._TABLE, name, fn)
    calls, orig = [], decode_mod.paged_decode_attention
    monkeypatch.setattr(decode_mod, "paged_decode_attention",
                        lambda *a, **kw: calls.append(a[3].shape) or orig(*a, **kw))   # a[3]: block tables
    _, ws = tiny("llama")
    with LLM(ws, dtype="fp32", num_kv_blocks=24, cache_block_seq_len=16, max_batch_size=4, session_len=64,
             quiet=True) as llm:
        runner = llm.engine.runner
        graphs, execute, pairs = runner.graphs, runner.execute, []

        def both(meta):
            if not graphs.fits(meta, runner.cfg):
                return execute(meta)
            runner.graphs = None
            try:
                eager = execute(meta).clone()
            finally:
                runner.graphs = graphs
            pairs.append((eager, execute(meta).clone()))
            return pairs[-1][1]

        runner.execute = both
        prompts = _prompts()[:3]
        llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 6, 4)])
    assert graphs.used == {1, 2, 4} and len(pairs) == 5
    assert (4, 4) in calls   # the padded batch: 4 rows, block tables as wide as session_len / 16
    for eager, padded in pairs:
        assert torch.allclose(eager, padded, atol=1e-5, rtol=1e-5)
