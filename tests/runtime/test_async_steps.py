"""Asynchronous decode steps (EngineConfig.async_steps): the engine launches decode step n+1 before
step n's tokens reach the host. On the CPU the static-buffer decode path runs uncaptured
(LMDEPOT_GRAPHS_ON_CPU=1); everything the host sees must equal the synchronous engine's."""

import pytest
import torch

from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams

KW = dict(dtype="fp32", cache_block_seq_len=16, max_batch_size=8, session_len=96, quiet=True)


@pytest.fixture
def ws(tiny, monkeypatch):
    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    return tiny("llama")[1]


def _prompts(n, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 150, (int(k),), generator=gen).tolist()
            for k in torch.randint(2, 40, (n,), generator=gen)]


def _drive(ws, on: bool, first, later, add_at: int = 4, eos=None, **kw):
    """Run `first` [(ids, params)], add `later` after `add_at` steps; every StepOutput per request in
    order, the engine's counters, and checks that hold for any run."""
    with LLM(ws, async_steps=on, **{**KW, **kw}) as llm:
        eng = llm.engine
        if eos is not None:
            eng.eos_ids = set(eos)
        seqs = [eng.add_request(ids, p) for ids, p in first]
        streams = {s.id: [] for s in seqs}
        steps = 0
        while eng.has_unfinished() or steps <= add_at:
            if steps == add_at:
                for ids, p in later:
                    s = eng.add_request(ids, p)
                    seqs.append(s)
                    streams[s.id] = []
            for out in eng.step():
                assert not streams[out.seq_id] or not streams[out.seq_id][-1][2], "output after a finish"
                streams[out.seq_id].append((out.token_id, out.text, out.finished, out.finish_reason))
            steps += 1
        for s in seqs:   # every streamed token is in the sequence, nothing past its finish
            assert s.finished and [t for t, *_ in streams[s.id]] == s.output_ids
            assert "".join(t for _, t, _, _ in streams[s.id]) == s.text
        assert eng.bm.num_free == eng.bm.num_blocks   # every block back, lookahead blocks included
        assert eng._inflight is None
        return ([streams[s.id] for s in seqs], eng.steps_ahead, eng.scheduler.num_preemptions, eng.bm.hits)


def _scenario(ws):
    """Sequences that end at different steps by max_tokens, a stop token, eos, a stop string; two more
    requests arrive mid-run, one sharing a cached prefix with the first."""
    prompts = _prompts(6)
    prompts[0] = (prompts[0] * 20)[:40]
    greedy = dict(temperature=0, ignore_eos=True)
    with LLM(ws, async_steps=False, **KW) as llm:
        base = llm.generate(prompts, SamplingParams(max_tokens=24, **greedy))
    words = base[3].text.split()
    first = [(prompts[0], SamplingParams(max_tokens=20, **greedy)),
             (prompts[1], SamplingParams(max_tokens=24, stop_token_ids=[base[1].token_ids[6]], **greedy)),
             (prompts[2], SamplingParams(max_tokens=24, temperature=0)),          # ends on the patched eos
             (prompts[3], SamplingParams(max_tokens=24, stop=[" ".join(words[5:7])], **greedy)),
             (prompts[4], SamplingParams(max_tokens=3, **greedy)),
             (prompts[5], SamplingParams(max_tokens=1, **greedy))]
    later = [(prompts[0][:34] + [7, 8, 9], SamplingParams(max_tokens=9, **greedy)),
             (_prompts(1, seed=11)[0], SamplingParams(max_tokens=14, **greedy))]
    return first, later, {2, base[2].token_ids[9]}


def test_async_steps_stream_exactly_what_sync_steps_do(ws):
    first, later, eos = _scenario(ws)
    want, ahead, _, hits = _drive(ws, False, first, later, eos=eos)
    assert ahead == 0 and hits >= 2   # the late request reused the first prompt's two full blocks
    got, ahead, _, _ = _drive(ws, True, first, later, eos=eos)
    assert ahead >= 10   # the steps where the batch went on unchanged were launched ahead
    assert got == want
    reasons = [s[-1][3] for s in want]
    assert reasons.count("stop") == 3 and reasons.count("length") == 5
    # the stop-string sequence was cut: its lookahead token was computed but never streamed
    assert len(want[3]) < 24


def test_async_steps_under_preemption(ws):
    """A cache too small for the batch: sequences are preempted and recomputed (from cached blocks)."""
    first = [(p, SamplingParams(max_tokens=30 + 4 * i, temperature=0, ignore_eos=True))
             for i, p in enumerate(_prompts(6, seed=8))]
    later = [(_prompts(1, seed=12)[0], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))]
    want, _, preempted, _ = _drive(ws, False, first, later, add_at=10, num_kv_blocks=8)
    assert preempted > 0
    got, ahead, preempted_async, _ = _drive(ws, True, first, later, add_at=10, num_kv_blocks=8)
    assert ahead > 0 and preempted_async > 0 and got == want


def test_async_steps_seeded_sampling_and_fallbacks(ws):
    prompts = _prompts(5, seed=5)
    first = [(p, SamplingParams(max_tokens=6 + 3 * i, temperature=0.8, top_p=0.9, top_k=40, seed=100 + i))
             for i, p in enumerate(prompts[:4])]
    want, _, _, _ = _drive(ws, False, first, [])
    got, ahead, _, _ = _drive(ws, True, first, [])
    assert ahead > 0 and got == want
    # a penalty needs the host's token history every step: that batch stays synchronous
    later = [(prompts[4], SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.3))]
    want, _, _, _ = _drive(ws, False, first[:1], later, add_at=0)
    got, ahead, _, _ = _drive(ws, True, first[:1], later, add_at=0)
    assert got == want and ahead == 0


def test_async_steps_keep_session_blocks_as_sync(ws):
    """A session's turn that ends (stop token) just as the lookahead step took a new block parks
    the blocks the sync path parks; the next turn gives the same tokens."""
    ids = _prompts(1, seed=3)[0]
    greedy = dict(temperature=0, ignore_eos=True)
    with LLM(ws, async_steps=False, **KW) as llm:
        a = llm.generate(ids, SamplingParams(max_tokens=10, **greedy), session_ids=["s"])
        probe = llm.generate([5, 6], SamplingParams(max_tokens=40, **greedy), session_ids=["s"]).token_ids
    start = len(ids) + 10 + 2   # index of turn 2's first output token
    # output k lands at index start + k; at a multiple of 16 the lookahead computing it took a fresh block
    k = next(k for k in range(len(probe)) if (start + k) % 16 == 0 and probe[k] not in probe[:k])
    runs = []
    for on in (False, True):
        with LLM(ws, async_steps=on, **KW) as llm:
            eng = llm.engine
            a = llm.generate(ids, SamplingParams(max_tokens=10, **greedy), session_ids=["s"])
            b = llm.generate([5, 6], SamplingParams(max_tokens=40, stop_token_ids=[probe[k]], **greedy),
                             session_ids=["s"])
            s = eng.scheduler.sessions["s"]
            parked = (len(s.block_table), s.num_computed, eng.bm.num_blocks - eng.bm.num_free)
            c = llm.generate([7], SamplingParams(max_tokens=5, **greedy), session_ids=["s"])
            runs.append((a.token_ids, b.token_ids, parked, c.token_ids, eng.bm.num_blocks - eng.bm.num_free,
                         eng.steps_ahead > 0))
            assert eng._inflight is None
    assert b.token_ids == probe[:k + 1]
    assert runs[0][2] == (-(-(start + k) // 16), start + k, -(-(start + k) // 16))
    assert runs[0][:-1] == runs[1][:-1] and runs[1][-1]


def test_async_steps_with_tensor_parallel(tiny, monkeypatch):
    """tp=2 over gloo: for a step launched ahead, rank 0 broadcasts the sampled ids on the device and
    rank 1 runs the same step from them; the tokens equal the synchronous tp=2 run's."""
    monkeypatch.setenv("LMDEPOT_GRAPHS_ON_CPU", "1")
    _, ws2 = tiny("qwen2", tp=2)
    prompts = _prompts(3)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (6, 11, 9)]
    got = {}
    for on in (False, True):
        with LLM(ws2, tp=2, async_steps=on, **KW) as llm:
            got[on] = ([o.token_ids for o in llm.generate(prompts, params)], llm.engine.steps_ahead)
    assert got[True][0] == got[False][0]
    assert got[False][1] == 0 and got[True][1] >= 4
