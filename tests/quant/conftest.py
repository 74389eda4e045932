"""Quantization test helpers: a word-level calibration text the tiny models' tokenizers understand."""

from __future__ import annotations

import random

import pytest


def word_text(words: int, vocab: int = 240, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(words))


@pytest.fixture
def calib_txt(tmp_path):
    """Factory: a .txt calibration file of `words` tokens for the tiny models."""
    def make(words: int = 600, name: str = "calib.txt"):
        path = tmp_path / name
        path.write_text(word_text(words))
        return path
    return make
