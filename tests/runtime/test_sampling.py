"""Sampling knobs, stop conditions, logprobs and the streaming API."""

import asyncio

import pytest
import torch

from lmdepot.runtime.llm import AsyncLLM, LLM
from lmdepot.runtime.sampling import apply_penalties, filter_logits
from lmdepot.runtime.sequence import SamplingParams, Sequence

PROMPT = list(range(20, 52))


@pytest.fixture(scope="module")
def llm(tiny):
    _, ws = tiny("llama")
    llm = LLM(ws, dtype="fp32", num_kv_blocks=64, cache_block_seq_len=16, quiet=True)
    yield llm
    llm.close()


def test_filters_keep_exactly_the_allowed_tokens():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits.clone(), SamplingParams(**kw))).nonzero().flatten().tolist()
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.5) == [0]            # the first token alone reaches 0.5
    assert kept(top_p=0.8) == [0, 1, 2]      # 0.5 + 0.25 < 0.8, so the third is still needed
    assert kept(min_p=0.35) == [0, 1]        # keeps p >= 0.35 * 0.5 = 0.175
    assert kept(min_p=0.2) == [0, 1, 2]      # keeps p >= 0.1
    assert kept(min_p=0.6) == [0]


def test_penalties_follow_hf_and_openai_semantics():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(160, generator=torch.Generator().manual_seed(0))
    seq = Sequence([5, 6, 7], SamplingParams())
    seq.token_ids += [7, 9, 9]   # three output tokens
    p = SamplingParams(repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seq.token_ids]), logits[None].clone())[0]
    assert torch.equal(apply_penalties(logits.clone(), seq, p), ref)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), seq, p)
    expect = logits.clone()
    expect[7] -= 0.5 + 0.25          # once in the output (the prompt's 7 does not count)
    expect[9] -= 0.5 + 2 * 0.25
    assert torch.allclose(out, expect)


def test_seed_makes_sampling_reproducible_in_any_batch(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPT, p).token_ids
    batched = llm.generate([list(range(3, 40)), PROMPT, [9, 8, 7]],
                           [SamplingParams(max_tokens=5, temperature=1.0, seed=1), p, SamplingParams(max_tokens=30)])
    assert batched[1].token_ids == alone
    other = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=99,
                                                ignore_eos=True)).token_ids
    assert other != alone


def test_degenerate_filters_equal_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)).token_ids
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        p = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True, **kw)
        assert llm.generate(PROMPT, p).token_ids == greedy, kw


def test_logprobs_with_top_alternatives(llm, tiny):
    hf, _ = tiny("llama")
    out = llm.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True))
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPT + out.token_ids])).logits[0].log_softmax(-1)
    for i, entry in enumerate(out.logprobs):
        row = ref[len(PROMPT) - 1 + i]
        assert entry["token"] == out.token_ids[i]
        assert abs(entry["logprob"] - float(row[entry["token"]])) < 1e-4
        top = list(entry["top"].items())
        assert [t for t, _ in top] == torch.topk(row, 4).indices.tolist()
        assert top[0][0] == entry["token"]   # greedy picks the most likely token


def test_stop_conditions(llm):
    base = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    # a stop token id ends the output on that token
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok]))
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    # a stop string cuts the text right before it
    words = base.text.split()
    stop = " ".join(words[5:7])
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))
    assert out.text == base.text[:base.text.index(stop)] and out.finish_reason == "stop"
    # session_len bounds prompt + output
    small = LLM(llm.engine.runner.workspace, dtype="fp32", num_kv_blocks=8, session_len=len(PROMPT) + 5, quiet=True)
    try:
        out = small.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert out.token_ids == base.token_ids[:5] and out.finish_reason == "length"
    finally:
        small.close()


def test_eos_ends_generation(smol_llm):
    out = smol_llm.generate("What is the capital of France?", SamplingParams(max_tokens=64, temperature=0),
                            use_chat_template=True)
    assert out.finish_reason == "stop" and out.token_ids[-1] in smol_llm.engine.eos_ids
    assert "Paris" in out.text and "<|im_end|>" not in out.text


def test_async_generate_streams_and_cancels(tiny):
    _, ws = tiny("llama")
    offline = LLM(ws, dtype="fp32", num_kv_blocks=32, cache_block_seq_len=16, quiet=True)
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o for o in offline.generate([PROMPT, PROMPT[:7]], p)]
    offline.close()
    allm = AsyncLLM(ws, dtype="fp32", num_kv_blocks=32, cache_block_seq_len=16, quiet=True)

    async def collect(prompt, stop_after=None):
        toks, text = [], ""
        async for out in allm.generate(prompt, p):
            toks.append(out.token_id)
            text += out.text
            if stop_after and len(toks) == stop_after:
                break
        return toks, text

    async def main():
        both = await asyncio.gather(collect(PROMPT), collect(PROMPT[:7]), collect(list(range(60, 90)), 3))
        after = await collect(PROMPT[:7])   # runs after the cancellation was processed
        return both, after

    try:
        (a, b, cancelled), after = asyncio.run(main())
        assert (a[0], a[1]) == (expected[0].token_ids, expected[0].text)
        assert (b[0], b[1]) == (expected[1].token_ids, expected[1].text)
        assert len(cancelled[0]) == 3 and after[0] == expected[1].token_ids
        assert allm.engine.bm.num_free == allm.engine.bm.num_blocks and not allm.engine.seqs
    finally:
        allm.close()


def test_streamed_deltas_add_up_to_the_stopped_text(llm):
    base = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stop = " ".join(base.text.split()[6:8])
    engine = llm.engine
    seq = engine.add_request(PROMPT, SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))
    streamed = ""
    while not seq.finished:
        streamed += "".join(o.text for o in engine.step() if o.seq_id == seq.id)
    assert streamed == seq.text == base.text[:base.text.index(stop)]


# --- the batched sampler (runtime/sampler.py) against the per-row reference above -------------------
from lmdepot.runtime import sampler, sampling  # noqa: E402

MIXED = [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.6), dict(min_p=0.2),
         dict(temperature=0.5, top_k=40, top_p=0.9, min_p=0.05), dict(), dict(top_k=1000, top_p=1.0)]


def _seqs(params, vocab=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i, p in enumerate(params):
        seq = Sequence(torch.randint(0, vocab, (10 + i,), generator=gen).tolist(), p)
        seq.token_ids += torch.randint(0, vocab, (i,), generator=gen).tolist()   # i output tokens
        seqs.append(seq)
    return seqs


def test_batched_penalties_equal_the_reference():
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(), SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5),
              SamplingParams(presence_penalty=1.0)]
    seqs = _seqs(params)
    logits = torch.randn(len(seqs), 160, generator=torch.Generator().manual_seed(1))
    got = sampler.apply_penalties(logits, seqs)
    for i, (seq, p) in enumerate(zip(seqs, params)):
        assert torch.equal(got[i], sampling.apply_penalties(logits[i].clone(), seq, p)), i
    plain = logits[:2]
    assert sampler.apply_penalties(plain, _seqs([SamplingParams()] * 2)) is plain   # nothing to do: no copy


def test_batched_filters_equal_the_reference():
    logits = torch.randn(len(MIXED), 160, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(**kw) for kw in MIXED]
    got = sampler.filter_logits(logits, [p.temperature for p in params], [p.top_k for p in params],
                                [p.top_p for p in params], [p.min_p for p in params])
    for i, p in enumerate(params):
        ref = sampling.filter_logits(logits[i].clone(), p)
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(ref)), MIXED[i]
        assert torch.equal(got[i][torch.isfinite(ref)], ref[torch.isfinite(ref)])
    # and the toy vocabulary of test_filters_keep_exactly_the_allowed_tokens, all knobs in one batch
    toy = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])).repeat(4, 1)
    kept = sampler.filter_logits(toy, [1.0] * 4, [2, 0, 0, 0], [1.0, 0.5, 0.8, 1.0], [0.0, 0.0, 0.0, 0.35])
    assert [torch.isfinite(r).nonzero().flatten().tolist() for r in kept] == [[0, 1], [0], [0, 1, 2], [0, 1]]


def test_batched_greedy_logprobs_and_hooks_equal_the_reference():
    seen = []

    def ban_argmax(output_ids, row):   # a logits_processor: sees a CPU row and the output so far
        seen.append(list(output_ids))
        return row.masked_fill(row == row.max(), float("-inf"))

    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0, repetition_penalty=1.5),
              SamplingParams(top_k=1, logprobs=0, frequency_penalty=0.7),
              SamplingParams(temperature=0, logits_processor=ban_argmax, accept_token=seen.append, logprobs=2)]
    seqs = _seqs(params)
    logits = torch.randn(len(seqs), 160, generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_lp = sampling.sample(logits.clone(), seqs)
    del seen[:]
    tokens, lp = sampler.sample(logits.clone(), seqs)
    assert tokens == ref_tokens and seen == [seqs[3].output_ids, tokens[3]]
    assert lp[1] is None
    for a, b in zip(lp, ref_lp):
        if a is not None:
            assert a["token"] == b["token"] and a["top"].keys() == b["top"].keys()
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-6)


@pytest.mark.parametrize("draw", ["multinomial", "race"])
def test_seeded_rows_do_not_depend_on_the_batch(monkeypatch, draw):
    monkeypatch.setattr(sampler, "draw", getattr(sampler, draw))   # "race" is what runs on a GPU
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    gen = torch.Generator().manual_seed(4)
    steps = [torch.randn(3, 160, generator=gen) for _ in range(6)]
    alone, batched = _seqs([p]), _seqs([SamplingParams(temperature=1.0), p, SamplingParams(seed=7)])
    a = [sampler.sample(s[1:2], alone)[0][0] for s in steps]
    b = [sampler.sample(s, batched)[0][1] for s in steps]
    assert a == b and len(set(a)) > 1
    again = _seqs([p])
    assert [sampler.sample(s[1:2], again)[0][0] for s in steps] == a


def test_seeded_cpu_sampling_equals_the_reference():
    """On the CPU the batched sampler draws with multinomial like the reference: same seeds, same tokens."""
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.2, seed=2),
              SamplingParams(temperature=0.7, presence_penalty=0.3, seed=3)]
    gen = torch.Generator().manual_seed(5)
    ref, bat = _seqs(params), _seqs(params)
    for _ in range(8):
        logits = torch.randn(len(params), 160, generator=gen) * 2
        want, got = sampling.sample(logits.clone(), ref)[0], sampler.sample(logits.clone(), bat)[0]
        assert got == want
        for seqs, toks in ((ref, want), (bat, got)):
            for seq, t in zip(seqs, toks):
                seq.token_ids.append(t)


@pytest.mark.parametrize("draw", ["multinomial", "race"])
def test_draws_follow_the_filtered_distribution(draw):
    """Both draws sample the filtered distribution: frequencies over 40000 rows at once."""
    draw = getattr(sampler, draw)
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    p = SamplingParams(temperature=0.8, top_k=5, top_p=0.95)
    probs = sampling.filter_logits(logits.clone(), p).softmax(-1)
    n = 40000
    seqs = [Sequence([1], p) for _ in range(2)]
    rows = sampler.filter_logits(logits.repeat(n, 1), [p.temperature] * n, [p.top_k] * n, [p.top_p] * n,
                                 [p.min_p] * n).softmax(-1)
    freq = torch.bincount(draw(rows, seqs * (n // 2)), minlength=6).float() / n
    assert freq[probs == 0].sum() == 0
    assert torch.allclose(freq, probs, atol=0.01), (freq, probs)
    # seeded rows: the same frequencies from a per-row generator
    seeded = [Sequence([1], SamplingParams(seed=s)) for s in range(2000)]
    freq = torch.bincount(draw(rows[:2000], seeded), minlength=6).float() / 2000
    assert torch.allclose(freq, probs, atol=0.04), (freq, probs)


def test_plain_greedy_batches_take_the_argmax_shortcut():
    """All rows greedy with nothing else asked: one argmax, the reference's tokens, no logprobs; any one
    knob on any row sends the batch through the full path."""
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0, ignore_eos=True)]
    seqs = _seqs(params)
    logits = torch.randn(len(seqs), 160, generator=torch.Generator().manual_seed(4))
    assert all(map(sampler._plain, params))
    assert sampler.sample(logits.clone(), seqs) == (sampling.sample(logits.clone(), seqs)[0], [None] * 3)
    knobs = [dict(temperature=1.0), dict(repetition_penalty=1.1), dict(presence_penalty=0.1),
             dict(frequency_penalty=0.1), dict(logprobs=0), dict(logits_processor=lambda ids, row: row),
             dict(accept_token=lambda tok: None)]
    for kw in knobs:
        assert not sampler._plain(SamplingParams(**{"temperature": 0, **kw})), kw
