"""Calibration text: the pydoc split is deterministic and disjoint, user files, token windows."""

from __future__ import annotations

import pytest
import torch

from lmdepot.convert.calib_data import (CalibParams, calibration_text, calibration_tokens, evaluation_text,
                                        text_digest)


def test_pydoc_calibration_and_evaluation_parts_are_disjoint_topics():
    from pydoc_data.topics import topics

    calib, held_out = calibration_text("pydoc"), evaluation_text("pydoc")
    texts = [topics[k] for k in sorted(topics)]
    assert calib + "\n\n" + held_out == "\n\n".join(texts)
    splits = [n for n in range(len(texts) + 1) if "\n\n".join(texts[:n]) == calib]
    assert len(splits) == 1 and held_out == "\n\n".join(texts[splits[0]:])  # whole topics on each side
    assert 0.78 < len(calib) / (len(calib) + len(held_out)) < 0.9
    assert calibration_text("pydoc") == calib and text_digest(calib) == text_digest(calibration_text("pydoc"))


def test_jsonl_and_windows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a b"}\n\n"c d e"\n')
    assert calibration_text(str(path)) == "a b\n\nc d e" == evaluation_text(str(path))
    encode = (lambda text: list(range(len(text.split()) * 3)))  # 15 ids
    tokens, digest = calibration_tokens(encode, CalibParams(str(path), 2, 6))
    assert torch.equal(tokens, torch.arange(12).reshape(2, 6)) and digest == text_digest("a b\n\nc d e")
    with pytest.warns(UserWarning, match="using 3 samples of 4 tokens"):
        tokens, _ = calibration_tokens(encode, CalibParams(str(path), "auto", 4))
    assert tokens.shape == (3, 4)
