"""Batched sampling where the logits are (the GPU, or the CPU): all rows at once, one host copy a step.

Same semantics as the per-row reference in sampling.py (the tests compare the two): penalties,
then a request's logits_processor, then greedy argmax or temperature / top-k / top-p / min-p and a
draw; logprobs from the raw logits. Per-row knobs become (n,) tensors, so mixed batches need no
per-row kernels except one noise draw per seeded row.

On a GPU the draw is the exponential race, argmax(probs / E) with E ~ Exp(1) per token, which picks
token i with probability probs[i] like torch.multinomial, but without its device-to-host sync. A
seeded row draws E from its own generator (on the logits' device), so its tokens do not depend on
what else shares the batch; they differ from the reference's multinomial draws, the distribution
does not. On the CPU the draw is torch.multinomial, as in the reference.

Rows with a logits_processor (python callbacks, e.g. grammars) go through the host: their row is
copied to the CPU and back, a sync that only such requests pay.
"""

from __future__ import annotations

import torch

from lmdepot.runtime.sequence import Sequence


def _tensor(values, dtype, device) -> torch.Tensor:
    """Small per-row tensors; from pinned memory on CUDA the copy is queued, not waited for."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _counts(id_lists: list[list[int]], vocab: int, device) -> torch.Tensor:
    """(n, vocab) float32: how often each token id occurs in each row's list."""
    width = max(1, max(len(ids) for ids in id_lists))
    ids = torch.full((len(id_lists), width), vocab, dtype=torch.int64)   # column `vocab`: padding, dropped
    for i, row in enumerate(id_lists):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
    ids = _tensor(ids, torch.int64, device).clamp_max(vocab)   # ids past the vocab (never sampled) too
    counts = torch.zeros(len(id_lists), vocab + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (HF: over the whole context, each token once), presence and frequency
    penalties (OpenAI: over the output). Returns a new tensor when any row has one."""
    params = [s.params for s in seqs]
    vocab, dev = logits.shape[1], logits.device
    if any(p.repetition_penalty != 1.0 for p in params):
        rp = _tensor([p.repetition_penalty for p in params], torch.float32, dev)[:, None]
        seen = _counts([s.token_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(seqs, params)],
                       vocab, dev) > 0
        logits = torch.where(seen, torch.where(logits < 0, logits * rp, logits / rp), logits)
    if any((p.presence_penalty or p.frequency_penalty) and s.num_output for s, p in zip(seqs, params)):
        counts = _counts([s.output_ids if p.presence_penalty or p.frequency_penalty else []
                          for s, p in zip(seqs, params)], vocab, dev)
        freq = _tensor([p.frequency_penalty for p in params], torch.float32, dev)[:, None]
        pres = _tensor([p.presence_penalty for p in params], torch.float32, dev)[:, None]
        logits = logits - (freq * counts + pres * (counts > 0).float())
    return logits


def filter_logits(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                  min_p: list[float]) -> torch.Tensor:
    """Temperature-scaled logits with everything outside each row's top-k / top-p / min-p at -inf."""
    dev, vocab = logits.device, logits.shape[1]
    logits = logits / _tensor(temperature, torch.float32, dev)[:, None]
    active = [0 < k < vocab for k in top_k]
    if any(active):
        # each row's k-th largest value (rows without top-k read column 0 and are not masked)
        kth = logits.topk(max(k for k, on in zip(top_k, active) if on), dim=-1).values
        kth = kth.gather(1, _tensor([k - 1 if on else 0 for k, on in zip(top_k, active)], torch.int64, dev)[:, None])
        logits = logits.masked_fill(_tensor(active, torch.bool, dev)[:, None] & (logits < kth), float("-inf"))
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = (probs.cumsum(-1) - probs) >= _tensor(top_p, torch.float32, dev)[:, None]
        drop &= _tensor([p < 1.0 for p in top_p], torch.bool, dev)[:, None]   # rounding must not cut top_p=1 rows
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    if any(p > 0.0 for p in min_p):
        probs = logits.softmax(-1)
        floor = _tensor(min_p, torch.float32, dev)[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row with probability probs[row]. On a GPU the exponential race (no sync); on the
    CPU, where a sync costs nothing, torch.multinomial, cheaper there and drawing exactly what the
    reference draws for a seeded row."""
    return (race if probs.is_cuda else multinomial)(probs, seqs)


def race(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """argmax(probs / E), E ~ Exp(1) per token; seeded rows draw E from their own generator."""
    noise = torch.empty_like(probs)
    if any(s.generator is None for s in seqs):
        noise.exponential_()
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[i].exponential_(generator=seq.generator)
    # A zero draw would turn a zero probability into 0/0 = nan, which argmax would pick.
    return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(-1)


def multinomial(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    out = torch.empty(len(seqs), dtype=torch.int64, device=probs.device)
    free = [i for i, s in enumerate(seqs) if s.generator is None]
    if free:
        out[free] = torch.multinomial(probs[free], 1)[:, 0]
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=seq.generator)[0]
    return out


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not tensors or tensors[0].device.type != "cuda":
        return tensors
    out = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()   # the step's only wait for the GPU
    return out


def _plain(p) -> bool:
    """Greedy with no penalty, hook or logprobs: the token is the row's argmax and nothing else is due."""
    return ((p.temperature <= 0 or p.top_k == 1) and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty and p.logits_processor is None and p.accept_token is None
            and p.logprobs is None)


def _pick(logits: torch.Tensor, seqs: list[Sequence], params) -> torch.Tensor:
    """(n,) int64 tokens on the logits' device: argmax, or a draw for the non-greedy rows."""
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        sub = [params[i] for i in sampled]
        idx = _tensor(sampled, torch.int64, logits.device)
        probs = filter_logits(logits[idx], [p.temperature for p in sub], [p.top_k for p in sub],
                              [p.top_p for p in sub], [p.min_p for p in sub]).softmax(-1)
        tokens = tokens.index_copy(0, idx, draw(probs, [seqs[i] for i in sampled]))
    return tokens


def device_only(p) -> bool:
    """A row whose token needs no host state of the step: no penalty (they count the host's token
    history), no python hook, no logprobs. Such rows can be sampled before the previous step's tokens
    reached the host (the engine's asynchronous decode steps)."""
    return (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and p.logits_processor is None and p.accept_token is None and p.logprobs is None)


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The tokens of rows that are all `device_only`, left on the device (no sync): the same tokens
    `sample` returns for them (same argmax, same draws from the same generators)."""
    return _pick(logits, seqs, [s.params for s in seqs])


class HostCopy:
    """A device tensor's copy on the host, queued behind the work that produces it; `wait()` blocks
    until that copy is done, not until the whole stream is idle (later steps may already be queued)."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))
        else:
            self.host = t

    def wait(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None]]:
    """logits: (len(seqs), vocab) float32 on any device. Returns tokens and, where asked,
    {token, logprob, top} entries, like sampling.sample."""
    raw, params = logits, [s.params for s in seqs]
    if all(map(_plain, params)):   # the common batch (greedy, nothing else): one argmax, one copy back
        return _to_host([logits.argmax(-1)])[0].tolist(), [None] * len(seqs)
    logits = apply_penalties(logits, seqs)
    hooked = [i for i, p in enumerate(params) if p.logits_processor is not None]
    if hooked:
        logits = logits.clone() if logits is raw else logits
        for i in hooked:   # host path: the callback sees a CPU row, as with the reference
            row = params[i].logits_processor(seqs[i].output_ids, logits[i].cpu())
            logits[i] = row.to(logits.device)
    tokens = _pick(logits, seqs, params)
    asked = [i for i, p in enumerate(params) if p.logprobs is not None]
    out = [tokens]
    if asked:
        idx = _tensor(asked, torch.int64, logits.device)
        lp = raw[idx].log_softmax(-1)
        out.append(lp.gather(1, tokens[idx][:, None])[:, 0])
        k = max(params[i].logprobs for i in asked)
        if k > 0:
            top = lp.topk(k, dim=-1)
            out += [top.values, top.indices]
    host = _to_host(out)
    toks = host[0].tolist()
    for i, p in enumerate(params):
        if p.accept_token is not None:
            p.accept_token(toks[i])
    logprobs: list[dict | None] = [None] * len(seqs)
    for j, i in enumerate(asked):
        n = params[i].logprobs
        top = {} if n == 0 else {int(t): float(v) for v, t in zip(host[2][j, :n], host[3][j, :n])}
        logprobs[i] = {"token": toks[i], "logprob": float(host[1][j]), "top": top}
    return toks, logprobs
