"""Engine behaviour: batching, chunked prefill, prefix cache, preemption and sessions keep tokens exact."""

import pytest
import torch

from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def mixed_prompts(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 90, (n,), generator=g).tolist()
    return [torch.randint(3, 160, (length,), generator=g).tolist() for length in lengths]


def one_by_one(ws, prompts, params=GREEDY):
    llm = LLM(ws, dtype="fp32", num_kv_blocks=64, cache_block_seq_len=16, max_batch_size=1,
              enable_prefix_caching=False, quiet=True)
    try:
        return [llm.generate(p, params).token_ids for p in prompts]
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_continuous_batching_with_chunked_prefill_matches_sequential(tiny, kind):
    _, ws = tiny(kind)
    prompts = mixed_prompts()
    expected = one_by_one(ws, prompts)
    # 8 slots for 16 requests and a 40-token step budget: requests join as others finish, long
    # prompts are split across steps, and decodes share steps with prefill chunks.
    llm = LLM(ws, dtype="fp32", num_kv_blocks=64, cache_block_seq_len=16, max_batch_size=8,
              max_num_batched_tokens=40, quiet=True)
    try:
        steps = []
        orig = llm.engine.scheduler.schedule

        def spy():
            batch, doomed = orig()
            steps.append([(s.id, n) for s, n in batch])
            return batch, doomed

        llm.engine.scheduler.schedule = spy
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
        assert max(len(b) for b in steps) == 8                       # the batch really was shared
        assert any(n > 1 for b in steps for _, n in b if len(b) > 1)  # prefill chunks beside decodes
        assert all(sum(n for _, n in b) <= 40 for b in steps)
        assert llm.engine.bm.num_free == llm.engine.bm.num_blocks    # every block came back
    finally:
        llm.close()


def test_prefix_cache_hit_gives_same_tokens(tiny):
    _, ws = tiny("llama")
    shared = mixed_prompts(1, seed=3)[0][:50] + list(range(10, 30))  # 70 tokens: 4 full blocks of 16
    prompts = [shared + [7, 8, 9], shared + [11, 12]]
    expected = one_by_one(ws, prompts)
    llm = LLM(ws, dtype="fp32", num_kv_blocks=64, cache_block_seq_len=16, quiet=True)
    try:
        first = llm.generate(prompts[0], GREEDY).token_ids
        hits = llm.engine.bm.hits
        second = llm.generate(prompts[1], GREEDY).token_ids
        assert llm.engine.bm.hits - hits == 4
        assert [first, second] == expected
    finally:
        llm.close()


def test_preemption_by_recompute_gives_same_tokens(tiny):
    _, ws = tiny("llama")
    prompts = mixed_prompts(6, seed=5)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = one_by_one(ws, prompts, params)
    # 14 blocks of 16 tokens cannot hold six sequences of up to ~130 tokens at once
    llm = LLM(ws, dtype="fp32", num_kv_blocks=14, cache_block_seq_len=16, max_batch_size=6, quiet=True)
    try:
        outs = llm.generate(prompts, params)
        assert llm.engine.scheduler.num_preemptions > 0
        assert [o.token_ids for o in outs] == expected
    finally:
        llm.close()


def test_session_second_turn_reuses_kv_and_matches_full_history(tiny):
    _, ws = tiny("llama")
    turn1, turn2 = mixed_prompts(2, seed=7)
    llm = LLM(ws, dtype="fp32", num_kv_blocks=64, cache_block_seq_len=16, enable_prefix_caching=False, quiet=True)
    try:
        a = llm.generate(turn1, GREEDY, session_ids=["s"])
        computed = []
        orig = llm.engine._metadata

        def spy(batch):
            computed.extend(n for _, n in batch)
            return orig(batch)

        llm.engine._metadata = spy
        b = llm.generate(turn2, GREEDY, session_ids=["s"])
        # only the last token of turn 1 and the new turn are computed; the history is not re-prefilled
        assert sum(computed) == 1 + len(turn2) + GREEDY.max_tokens - 1
    finally:
        llm.close()
    fresh = one_by_one(ws, [turn1 + a.token_ids + turn2])[0]
    assert b.token_ids == fresh


def test_evicted_session_is_recomputed_from_its_tokens(tiny):
    _, ws = tiny("llama")
    turn1, turn2, other = mixed_prompts(3, seed=9)
    turn1, other = (turn1 * 60)[:60], (other * 150)[:150]
    llm = LLM(ws, dtype="fp32", num_kv_blocks=12, cache_block_seq_len=16, enable_prefix_caching=False, quiet=True)
    try:
        a = llm.generate(turn1, GREEDY, session_ids=["s"])  # the session keeps 5 blocks
        llm.generate(other, GREEDY)  # needs 11 of the 12 blocks
        assert llm.engine.scheduler.num_session_evictions == 1
        b = llm.generate(turn2, GREEDY, session_ids=["s"])
    finally:
        llm.close()
    assert b.token_ids == one_by_one(ws, [turn1 + a.token_ids + turn2])[0]


def test_smollm2_batch_of_16_chat_prompts_matches_one_at_a_time(smol_llm):
    topics = ["the moon", "bread", "rivers", "chess", "volcanoes", "owls", "jazz", "glass", "tides", "maps",
              "bees", "clocks", "salt", "comets", "bridges", "tea"]
    prompts = [f"Tell me one fact about {t}." + " Please be brief." * (i % 5) for i, t in enumerate(topics)]
    params = SamplingParams(max_tokens=10, temperature=0)
    bm = smol_llm.engine.bm
    bm.prefix_caching = False   # the batched run must prefill for real, not hit the sequential runs' blocks
    try:
        alone = [smol_llm.generate(p, params, use_chat_template=True).token_ids for p in prompts]
        together = smol_llm.generate(prompts, params, use_chat_template=True)
    finally:
        bm.prefix_caching = True
    assert [o.token_ids for o in together] == alone


def test_running_sequences_share_prefix_blocks(tiny):
    _, ws = tiny("llama")
    shared = list(range(3, 53))   # 3 full blocks of 16, plus 2 tokens
    prompts = [shared + [60, 61], shared + [70]]
    expected = one_by_one(ws, prompts)
    llm = LLM(ws, dtype="fp32", num_kv_blocks=32, cache_block_seq_len=16, quiet=True)
    engine = llm.engine
    try:
        a = engine.add_request(prompts[0], GREEDY)
        engine.step()                          # a's prompt is computed and its full blocks published
        b = engine.add_request(prompts[1], GREEDY)
        engine.step()
        assert a.block_table[:3] == b.block_table[:3]
        assert [engine.bm.blocks[i].ref for i in a.block_table[:3]] == [2, 2, 2]
        while engine.has_unfinished():
            engine.step()
        assert [a.output_ids, b.output_ids] == expected
        assert engine.bm.num_free == engine.bm.num_blocks
    finally:
        llm.close()


def test_smollm2_incremental_detokenization_equals_a_full_decode(smol_llm):
    """Streaming text, decoded a few ids at a time, is the full decode of the output ids at every step
    whose full decode is complete UTF-8 (multi-byte characters split over tokens included)."""
    from lmdepot.runtime.sequence import Sequence

    engine = smol_llm.engine
    tok = engine.tokenizer
    text = "naïve café — 日本語のテキスト 🙂🙂 and `code(x) -> None`\n\tdone. Ünïcödé!"
    ids = tok.encode(text, add_special_tokens=False)
    ids = ids + [tok.convert_tokens_to_ids("<|im_end|>")] + ids[::-1]   # a special token, odd merges
    seq = Sequence([1], SamplingParams())
    for n in range(len(ids)):
        seq.token_ids.append(ids[n])
        got = engine._decode(seq, drop_last=False)
        full = tok.decode(ids[:n + 1], skip_special_tokens=True)
        if not full.endswith("\ufffd"):
            assert got == full, n
    seq.token_ids.append(ids[0])   # a stop token: its text is dropped
    assert engine._decode(seq, drop_last=True) == tok.decode(ids, skip_special_tokens=True)
    assert engine._decode(seq, drop_last=True) == tok.decode(ids, skip_special_tokens=True)
