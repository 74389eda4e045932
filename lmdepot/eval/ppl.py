"""Perplexity through the runtime's paged KV path.

The text is cut into back-to-back windows of `seqlen` tokens (no BOS, like the calibration
windows). Each window is prefilled in chunks of `chunk` tokens into the engine's KV blocks, so
every chunk after the first attends to keys and values read back from the cache: with a quantized
cache (quant_policy 8/4) that is exactly the error being measured. (Quantized caches are read back
dequantized even for the chunk's own tokens, see ops/reference.paged_attention_quant.)

Perplexity = exp(mean over windows and positions of -log p(token | previous tokens of its
window)); each window predicts its seqlen - 1 later tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from lmdepot.errors import LmdepotError
from lmdepot.eval import PYDOC_EVAL


class EvalError(LmdepotError):
    pass


def eval_text(spec: str) -> str:
    """`pydoc-eval` (the held-out part of the embedded Python docs) or a text file."""
    from pathlib import Path

    from lmdepot.convert.calib_data import PYDOC, evaluation_text

    if spec == PYDOC_EVAL:
        return evaluation_text(PYDOC)
    path = Path(spec)
    if not path.is_file():
        raise EvalError(f"--text {spec}: no such file (or use 'pydoc-eval')")
    return path.read_text(encoding="utf-8")


def windows(ids: list[int], seqlen: int, samples: int | None) -> torch.Tensor:
    """(n, seqlen) int64 consecutive windows; all that fit unless `samples` caps them."""
    if seqlen < 2:
        raise EvalError(f"--seqlen {seqlen}: must be at least 2")
    n = len(ids) // seqlen
    if samples is not None:
        if samples > n:
            raise EvalError(f"the text holds {len(ids)} tokens: {n} windows of {seqlen}, {samples} asked")
        n = samples
    if n == 0:
        raise EvalError(f"the text holds {len(ids)} tokens, fewer than --seqlen {seqlen}")
    return torch.tensor(ids[:n * seqlen], dtype=torch.int64).view(n, seqlen)


@dataclass
class PplResult:
    ppl: float
    nll_sum: float
    tokens: int          # predicted tokens
    windows: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.windows * (self.tokens // self.windows + 1) / self.seconds


def window_nll(runner, window: torch.Tensor, chunk: int) -> float:
    """Sum of -log p over one window's predicted tokens, prefilled chunk by chunk into blocks 0.."""
    n = window.shape[0]
    bs = runner.block_size
    blocks = -(-n // bs)
    if blocks > runner.num_blocks:
        raise EvalError(f"--seqlen {n} needs {blocks} KV blocks of {bs} tokens; the cache has {runner.num_blocks}")
    table = list(range(blocks))
    total = 0.0
    for start in range(0, n - 1, chunk):   # the last token predicts nothing
        end = min(start + chunk, n - 1)
        meta = {"tokens": window[start:end].tolist(), "positions": list(range(start, end)),
                "slots": [table[p // bs] * bs + p % bs for p in range(start, end)],
                "seqs": [(end - start, end, table[:-(-end // bs)])],
                "logit_rows": list(range(end - start))}
        logits = runner.run(meta)
        logp = torch.log_softmax(logits.double(), dim=-1)
        total -= logp.gather(1, window[start + 1:end + 1, None]).sum().item()
    return total


def perplexity(runner, ids: torch.Tensor, chunk: int = 256) -> PplResult:
    if chunk < 1:
        raise EvalError(f"--chunk {chunk}: must be positive")
    t0 = time.perf_counter()
    nll = sum(window_nll(runner, w, chunk) for w in ids)
    count = ids.shape[0] * (ids.shape[1] - 1)
    return PplResult(math.exp(nll / count), nll, count, ids.shape[0], time.perf_counter() - t0)


def evaluate(model: str, text: str = PYDOC_EVAL, seqlen: int = 1024, samples: int | None = None,
             chunk: int = 256, **engine_kwargs):
    """(PplResult, engine) for a workspace dir or registry ref; the caller closes the engine."""
    from lmdepot.runtime.engine import Engine
    from lmdepot.runtime.config import EngineConfig

    engine_kwargs.setdefault("quiet", True)
    engine_kwargs.setdefault("enable_prefix_caching", False)
    engine_kwargs.setdefault("max_batch_size", 1)
    engine = Engine(model, EngineConfig(**engine_kwargs))
    try:
        ids = engine.tokenizer(eval_text(text), add_special_tokens=False)["input_ids"]
        return perplexity(engine.runner, windows(ids, seqlen, samples), chunk), engine
    except BaseException:
        engine.close()
        raise
