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


def dequantized_layer(ws, i: int):
    """A workspace's int4 layer i, every rank dequantized (each with its own row count) and merged
    back into HF-oriented (out, in) float32 tensors (see lmdepot.convert.tp.merge_layer)."""
    import torch

    from lmdepot.convert.tp import merge_layer
    from lmdepot.formats import layout
    from lmdepot.formats.config import WorkspaceConfig
    from lmdepot.formats.int4 import dequantize_int4
    from lmdepot.formats.tensors import load_tensors

    cfg = WorkspaceConfig.read(ws / layout.CONFIG_FILE)
    tp = cfg.tensor_para_size
    rows = {layout.W_QKV: cfg.hidden_units, layout.W_O: cfg.q_size // tp, layout.W_GATE: cfg.hidden_units,
            layout.W_UP: cfg.hidden_units, layout.W_DOWN: cfg.inter_size // tp}
    ranks = []
    for r in range(tp):
        t = load_tensors(ws / layout.layer_file(i, r))
        plain = {k: v.float() for k, v in t.items() if not k.endswith(("qweight", "scales", "zeros"))}
        for name, n in rows.items():
            plain[f"{name}.weight"] = dequantize_int4(t[f"{name}.qweight"], t[f"{name}.scales"], t[f"{name}.zeros"], n)
        ranks.append(plain)
    merged = merge_layer(ranks, cfg)
    return {k: v.to(torch.float32) for k, v in merged.items()}
