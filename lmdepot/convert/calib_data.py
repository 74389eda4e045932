"""Calibration text: the embedded pydoc default or a user file, split into calibration and evaluation
parts, tokenized into `samples` windows of `seqlen` tokens.

The embedded default is CPython's `pydoc_data.topics` (the text `help('topic')` shows). Its topics
are sorted by name and concatenated; the first topics holding 80 % of the characters are the
calibration part, the rest the evaluation part, so a perplexity measured on `evaluation_text('pydoc')`
never sees a character the quantizer was calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmdepot.errors import ConvertError

if TYPE_CHECKING:
    import torch

PYDOC = "pydoc"
CALIB_FRACTION = 0.8
TOPIC_SEPARATOR = "\n\n"


class CalibrationError(ConvertError):
    """Calibration text or statistics unusable for the requested model or parameters."""


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _pydoc_parts() -> tuple[str, str]:
    texts = _pydoc_topics()
    total = sum(len(t) for t in texts)
    calib, seen = [], 0
    for t in texts:
        if seen >= CALIB_FRACTION * total:
            break
        calib.append(t)
        seen += len(t)
    return TOPIC_SEPARATOR.join(calib), TOPIC_SEPARATOR.join(texts[len(calib):])


def _read_file(spec: str) -> str:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CalibrationError(f"{spec}: calibration dataset is neither 'pydoc' nor an existing .txt/.jsonl file")
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        raise CalibrationError(f"{spec}: calibration file must end in .txt or .jsonl")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{spec}:{n}: invalid JSON ({exc.msg})") from None
        text = row if isinstance(row, str) else row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise CalibrationError(f"{spec}:{n}: each line must be a string or an object with a \"text\" string")
        texts.append(text)
    return TOPIC_SEPARATOR.join(texts)


def calibration_text(spec: str) -> str:
    """The text calibration uses: pydoc's calibration part, or a whole user file."""
    return _pydoc_parts()[0] if spec == PYDOC else _read_file(spec)


def evaluation_text(spec: str) -> str:
    """Held-out text for perplexity: pydoc's evaluation part. A user file is used whole (pass a
    different file for evaluation than for calibration)."""
    return _pydoc_parts()[1] if spec == PYDOC else _read_file(spec)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CalibParams:
    dataset: str = PYDOC
    samples: int | str = 128     # or "auto": as many as the text holds, at most 128
    seqlen: int = 2048

    def describe(self) -> dict:
        return {"dataset": self.dataset if self.dataset == PYDOC else Path(self.dataset).name,
                "samples": self.samples, "seqlen": self.seqlen}


AUTO_MAX_SAMPLES = 128


def parse_samples(value: str) -> int | str:
    if str(value) == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise CalibrationError(f"--calib-samples {value}: expected a positive integer or 'auto'") from None
    if n < 1:
        raise CalibrationError(f"--calib-samples {value}: expected a positive integer or 'auto'")
    return n


def encoder_for(hf_dir: Path):
    """text -> token ids with the checkpoint's own tokenizer.json (what the workspace ships)."""
    path = Path(hf_dir) / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(hf_dir))
    return lambda text: auto(text, add_special_tokens=False)["input_ids"]


def calibration_tokens(encode, params: CalibParams) -> tuple[torch.Tensor, str]:
    """(samples, seqlen) int64 token windows cut back to back from the calibration text, and the
    text's sha256. No BOS is inserted: the windows are plain consecutive text."""
    if params.seqlen < 2:
        raise CalibrationError(f"--calib-seqlen {params.seqlen}: must be at least 2")
    text = calibration_text(params.dataset)
    ids = encode(text)
    have = len(ids) // params.seqlen
    if params.samples == "auto":
        samples = min(have, AUTO_MAX_SAMPLES)
        if samples < 1:
            raise CalibrationError(f"calibration text {params.dataset} has {len(ids)} tokens, fewer than one"
                                   f" window of --calib-seqlen {params.seqlen}")
        if samples < AUTO_MAX_SAMPLES:
            warnings.warn(f"calibration text {params.dataset} holds {len(ids)} tokens: using {samples} samples"
                          f" of {params.seqlen} tokens", stacklevel=2)
    else:
        samples = params.samples
        if samples > have:
            raise CalibrationError(
                f"calibration text {params.dataset} is too short: {samples} samples x {params.seqlen} tokens"
                f" need {samples * params.seqlen} tokens, it has {len(ids)}"
                + (f" (enough for --calib-samples {have}, or pass --calib-samples auto)" if have else
                   " (not one window; use a shorter --calib-seqlen or a longer text)"))
    import torch  # here: the CLI imports this module for its defaults and must start fast

    window = torch.tensor(ids[:samples * params.seqlen], dtype=torch.int64)
    return window.reshape(samples, params.seqlen), text_digest(text)
