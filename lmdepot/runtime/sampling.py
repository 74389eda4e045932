"""Logits -> next tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling, logprobs.

Rows are processed one by one: every sequence has its own knobs and its own generator, so a seeded
request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from lmdepot.runtime.sequence import SamplingParams, Sequence


def apply_penalties(logits: torch.Tensor, seq: Sequence, p: SamplingParams) -> torch.Tensor:
    if p.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64)
        score = logits[ids]
        logits[ids] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output:
        out = torch.tensor(seq.output_ids, dtype=torch.int64)
        counts = torch.bincount(out, minlength=logits.shape[0])[:logits.shape[0]].float()
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False  # explicitly: a top_p below float32's smallest value rounds to 0 and would drop it
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None]]:
    """logits: (len(seqs), vocab) float32. Returns tokens and, where asked, {token: logprob} entries."""
    tokens, logprobs = [], []
    for row, seq in zip(logits, seqs):
        p = seq.params
        raw = row
        row = apply_penalties(row.clone(), seq, p)
        if p.logits_processor is not None:
            row = p.logits_processor(seq.output_ids, row)
        if p.greedy:
            tok = int(torch.argmax(row))
        else:
            probs = filter_logits(row, p).softmax(-1)
            tok = int(torch.multinomial(probs, 1, generator=seq.generator))
        tokens.append(tok)
        if p.accept_token is not None:
            p.accept_token(tok)
        if p.logprobs is not None:
            # Logprobs describe the model's distribution, before penalties and temperature.
            lp = raw.log_softmax(-1)
            top = torch.topk(lp, p.logprobs) if p.logprobs > 0 else None
            entry = {"token": tok, "logprob": float(lp[tok]),
                     "top": {} if top is None else {int(i): float(v) for v, i in zip(top.values, top.indices)}}
            logprobs.append(entry)
        else:
            logprobs.append(None)
    return tokens, logprobs
