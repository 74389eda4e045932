"""The host-side shortcuts of a step (scripts/profile_host_step.py measures them) against their simple versions."""

import random

import numpy as np
import pytest

from lmdepot.runtime.context import block_table_array


def _block_table_loop(tables, width=None, fill=0):
    """The one-row-at-a-time version block_table_array replaced."""
    width = width or max(1, max((len(t) for t in tables), default=0))
    out = np.full((len(tables), width), fill, dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out


def test_block_table_array_equals_the_row_loop():
    rng = random.Random(0)
    tables = [[rng.randrange(5000) for _ in range(rng.randrange(0, 14))] for _ in range(300)]
    for case in (tables, tables[:1], [[], [7]], [[]], []):
        for width, fill in ((None, 0), (16, 0), (20, 9)):
            got, want = block_table_array(case, width, fill), _block_table_loop(case, width, fill)
            assert got.dtype == want.dtype == np.int32 and np.array_equal(got, want), (case[:2], width, fill)
    with pytest.raises(ValueError, match="does not fit width 2"):
        block_table_array([[1, 2, 3]], 2)


def _random_ids(tok, n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(len(tok)) for _ in range(rng.randrange(0, 7))] for _ in range(n)]


def test_text_decoder_equals_tokenizer_decode_on_smol(smol_llm, tmp_path):
    """The backend shortcut decodes exactly as tokenizer.decode(skip_special_tokens=True) (byte-level BPE,
    special tokens, split UTF-8), and a tokenizer whose decode cleans up spaces keeps its own decode."""
    import functools

    from transformers import AutoTokenizer

    from lmdepot.runtime.engine import text_decoder
    from tests.tiny_models import make_tokenizer

    smol = smol_llm.engine.tokenizer
    fast = text_decoder(smol)
    assert isinstance(fast, functools.partial)   # the shortcut is what the engine runs for this tokenizer
    ids = smol.encode("naïve café — 日本語 🙂 `code(x)`\n\tdone.", add_special_tokens=False)
    cases = _random_ids(smol, 500, 0) + [ids, ids[::-1], ids[:3], ids[1:4], [smol.convert_tokens_to_ids("<|im_end|>")]]
    for case in cases:
        assert fast(case) == smol.decode(case, skip_special_tokens=True), case

    make_tokenizer(tmp_path, 50)
    words = AutoTokenizer.from_pretrained(tmp_path, clean_up_tokenization_spaces=True)
    slow = text_decoder(words)
    assert not isinstance(slow, functools.partial)
    for case in _random_ids(words, 50, 1):
        assert slow(case) == words.decode(case, skip_special_tokens=True)


def test_profile_host_step_script_reports_every_phase(capsys):
    """scripts/profile_host_step.py runs the bench loop and prints each phase and the host total."""
    from scripts.profile_host_step import PHASES, main

    assert main(["--n", "2", "--prompt", "8-16", "--output", "6"]) == 0
    out = capsys.readouterr().out
    assert "decode steps with all 2 sequences: 4;" in out, out
    for name in (*PHASES, "wall", "HOST", "HOST-argmax"):
        assert f"\n  {name} " in out, name
    import torch

    from lmdepot.runtime import engine, sampler
    assert engine.sample is sampler.sample and "argmax" not in torch.Tensor.__dict__   # its timers are undone
