"""The decode-graph runner's padded static-buffer path, run uncaptured on the CPU
(LMDEPOT_GRAPHS_ON_CPU=1): same tokens as the eager engine, padded rows only touch the scratch block.
Capture and replay themselves are checked on a GPU in test_gpu.py."""

import pytest
import torch

from lmdepot.runtime.cuda_graph import buckets
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams
from runtime_helpers import record_graph_and_eager_steps


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


def _capture_time_context(monkeypatch):
    """Padded steps see the Context a graph's python code saw while capturing (every ctx.seqs entry a
    1-token sequence): an op that reads a per-step value from python instead of the buffers goes wrong."""
    from lmdepot.runtime import cuda_graph

    at_capture = cuda_graph.DecodeGraphs._context
    monkeypatch.setattr(cuda_graph.DecodeGraphs, "_context", lambda self, b, lens=None: at_capture(self, b))


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors; the GPU runs test_gpu.py")
def test_padded_path_through_the_triton_kernels(tiny, monkeypatch):
    """The static buffers as the captured kernels read them (Triton's interpreter on the CPU): padded
    rows, scratch-block tables and full-width block tables give the eager kernels' logits, with the
    capture-time Context (1-token ctx.seqs) as a captured graph's python code saw it."""
    from lmdepot.runtime import ops
    from lmdepot.runtime.kernels import paged_decode_attention as decode_mod
    from lmdepot.runtime.ops import triton_ops

    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    _capture_time_context(monkeypatch)
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
        graphs = runner.graphs
        pairs = record_graph_and_eager_steps(runner, graphs)
        prompts = _prompts()[:3]
        llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 6, 4)])
    assert graphs.used == {1, 2, 4} and len(pairs) == 5
    assert (4, 4) in calls   # the padded batch: 4 rows, block tables as wide as session_len / 16
    for _, eager, padded in pairs:
        assert torch.allclose(eager, padded, atol=1e-5, rtol=1e-5)


# --- quantized KV cache (quant_policy 8 / 4) ---------------------------------------------------------
QUANT = [(8, "plain"), (8, "rotate"), (4, "plain"), (4, "rotate"), (4, "channel")]


def _quant_kernels(monkeypatch):
    """Route the quantized cache's ops to its Triton kernels on CPU tensors (the interpreter), as
    ops/triton_ops.py routes them on CUDA: the store kernels always, the decode kernel on decode steps."""
    from lmdepot.runtime import ops
    from lmdepot.runtime.context import get_context
    from lmdepot.runtime.kernels.kv_store_channel import store_keys_channel
    from lmdepot.runtime.kernels.kv_store_quant import store_quant_per_token
    from lmdepot.runtime.kernels.paged_decode_attention_quant import paged_decode_attention_quant
    from lmdepot.runtime.ops import reference

    def store(k, v, cache, slot_mapping):
        ctx = get_context()
        if cache.key_channel:
            store_keys_channel(k, cache, ctx.block_tables, ctx.context_lens, ctx.q_start_loc, ctx.max_q_len)
        else:
            store_quant_per_token(k, slot_mapping, cache.codes[0], cache.scales[0], cache.zeros[0], cache.bits,
                                  cache.rotate)
        store_quant_per_token(v, slot_mapping, cache.codes[1], cache.scales[1], cache.zeros[1], cache.bits,
                              cache.rotate)

    def attend(q, k, v, cache, ctx, scale):
        if not ctx.is_decode:
            return reference.paged_attention_quant(q, k, v, cache, ctx, scale)
        return paged_decode_attention_quant(q, cache, ctx.block_tables, ctx.context_lens, scale)

    monkeypatch.setitem(ops._TABLE, "store_kv_quant", store)
    monkeypatch.setitem(ops._TABLE, "paged_attention_quant", attend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors; the GPU runs test_gpu.py")
@pytest.mark.parametrize("policy, scheme", QUANT)
def test_padded_quant_path_through_the_triton_kernels(tiny, monkeypatch, policy, scheme):
    """The quantized cache's store and decode kernels on the static buffers (padded rows, scratch-block
    tables, full-width tables) give the eager engine's tokens and per-step logits. The padded steps
    run with the capture-time Context (every ctx.seqs entry a 1-token sequence, as the python code
    saw it while capturing): the kernels must read each per-step value from the buffers."""
    _quant_kernels(monkeypatch)
    _capture_time_context(monkeypatch)
    _, ws = tiny("llama")
    kw = dict(dtype="fp32", num_kv_blocks=24, cache_block_seq_len=16, max_batch_size=4, session_len=64, quiet=True,
              quant_policy=policy, kv_scheme=scheme, async_steps=False)   # every step through runner.execute
    prompts = _prompts()[:3]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 6, 4)]
    tokens, logits = {}, {}
    for padded in (False, True):
        if padded:
            monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
        with LLM(ws, eager=not padded, **kw) as llm:
            runner = llm.engine.runner
            execute, steps = runner.execute, []
            runner.execute = lambda meta: steps.append(execute(meta).clone()) or steps[-1]
            tokens[padded] = [o.token_ids for o in llm.generate(prompts, params)]
            logits[padded] = steps
            if padded:
                assert runner.graphs.used == {1, 2, 4}   # 3 rows pad to 4
                assert runner.model.layers[0].attention.kv_quant.codes[0].shape[0] == 25   # + the scratch block
            else:
                assert runner.graphs is None
    assert tokens[True] == tokens[False]
    assert len(logits[True]) == len(logits[False]) == 6   # one prefill step, five decode steps
    for eager, padded in zip(logits[False], logits[True]):
        assert torch.allclose(eager, padded, atol=1e-4, rtol=1e-4)


def _cache_tensors(cache) -> dict[str, torch.Tensor]:
    out = {f"codes{i}": c for i, c in enumerate(cache.codes)}
    out.update({f"scales{i}": s for i, s in enumerate(cache.scales) if s is not None})
    out.update({f"zeros{i}": z for i, z in enumerate(cache.zeros) if z is not None})
    if cache.key_channel:
        out.update(key_scale=cache.key_scale, key_min=cache.key_min, key_sink=cache.key_sink)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors; the GPU runs test_gpu.py")
@pytest.mark.parametrize("policy, scheme", QUANT)
def test_padded_rows_write_only_the_scratch_block_of_a_quantized_cache(tiny, monkeypatch, policy, scheme):
    """Three sequences decode one token, padded to a batch of 8: every byte of the cache (codes,
    per-token scales/zeros, per-block key params and first-key rows) outside the new tokens' slots
    (for channel keys: outside the sequences' last blocks) and the scratch block stays as it was."""
    _quant_kernels(monkeypatch)
    _capture_time_context(monkeypatch)
    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    _, ws = tiny("llama")
    with LLM(ws, dtype="fp32", num_kv_blocks=12, cache_block_seq_len=16, max_batch_size=8, session_len=64,
             quiet=True, quant_policy=policy, kv_scheme=scheme) as llm:
        runner = llm.engine.runner
        gen = torch.Generator().manual_seed(0)
        before = []
        for layer in runner.model.layers:   # an arbitrary (finite) cache state
            for name, t in _cache_tensors(layer.attention.kv_quant).items():
                if t.dtype == torch.uint8:
                    t.copy_(torch.randint(0, 256 if name.startswith("codes") else 2 ** policy, t.shape, generator=gen))
                else:
                    t.copy_(torch.rand(t.shape, generator=gen) * (0.1 if "scale" in name else 2.0))
            before.append({n: t.clone() for n, t in _cache_tensors(layer.attention.kv_quant).items()})
        # context lengths 21, 16 and 40 after this step: slots at offsets 4, 15 and 7 of blocks 9, 2 and 11
        seqs = [(1, 21, [5, 9]), (1, 16, [2]), (1, 40, [0, 7, 11])]
        meta = {"tokens": [7, 8, 9], "positions": [20, 15, 39], "slots": [9 * 16 + 4, 2 * 16 + 15, 11 * 16 + 7],
                "seqs": seqs, "logit_rows": [0, 1, 2]}
        assert runner.graphs.fits(meta, runner.cfg)
        assert torch.isfinite(runner.execute(meta)).all()
        assert runner.graphs.used == {4}
        scratch = 12
        for layer, old in zip(runner.model.layers, before):
            for name, t in _cache_tensors(layer.attention.kv_quant).items():
                written = t != old[name]
                # the padded row's token landed in the scratch block (a block's first token sets no key range)
                assert written[scratch].any() or name in ("key_scale", "key_min"), name
                written[scratch] = False
                if t.dim() == 3:   # per-block key params: only the sequences' last blocks
                    assert set(written.any(-1).any(-1).nonzero().flatten().tolist()) <= {9, 2, 11}, name
                elif name == "codes0" and scheme == "channel":   # the last blocks are requantized
                    assert set(written.flatten(1).any(-1).nonzero().flatten().tolist()) <= {9, 2, 11}, name
                else:   # per-token codes and params: only the new tokens' slots
                    rows = written.flatten(2).any(-1).nonzero().tolist()
                    assert rows and set(map(tuple, rows)) <= {(9, 4), (2, 15), (11, 7)}, name


@pytest.mark.parametrize("policy", [0, 8])
def test_a_failed_capture_warns_once_and_decodes_eagerly(tiny, monkeypatch, capsys, policy):
    """Capture raising at engine start (here at the second bucket, after the first one captured) drops
    every graph, prints one warning line naming the bucket and the root error, and the engine decodes
    eagerly with the eager engine's tokens."""
    from lmdepot.runtime import cuda_graph

    _, ws = tiny("llama")
    kw = dict(dtype="fp32", num_kv_blocks=24, cache_block_seq_len=16, max_batch_size=4, session_len=64, quiet=True,
              quant_policy=policy)
    prompts, params = _prompts()[:3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(ws, eager=True, **kw) as llm:
        want = [o.token_ids for o in llm.generate(prompts, params)]
    capsys.readouterr()

    class FakeGraph:
        resets = 0

        def reset(self):
            FakeGraph.resets += 1

    def capture_one(self, b):
        if b == 4:
            self.graphs[b] = FakeGraph()
            return
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:   # what torch.cuda.graph's exit raises on top of it
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    init = cuda_graph.DecodeGraphs.__init__

    def capturing_init(self, *a, **kw):
        init(self, *a, **kw)
        self.capture = True   # as on CUDA

    monkeypatch.setattr(cuda_graph.DecodeGraphs, "__init__", capturing_init)
    monkeypatch.setattr(cuda_graph.DecodeGraphs, "_capture_one", capture_one)
    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    with LLM(ws, **kw) as llm:
        assert llm.engine.runner.graphs is None and FakeGraph.resets == 1
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
    err = capsys.readouterr().err
    assert err == ("[lmdepot] warning: CUDA graph capture failed at batch 2 (RuntimeError: CUDA error: operation"
                   " not permitted when stream is capturing); decode steps run eagerly\n")
