"""From a validated request to engine runs: sampling params, length checks, timed token streams."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from lmdepot.runtime.sequence import SamplingParams
from lmdepot.serve.metrics import RequestTimer


@dataclass
class Result:
    """One choice as it accumulates."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


def max_new_tokens(state, prompt_len: int, requested: int | None) -> int:
    """Refuse what cannot fit instead of replying with nothing and finish_reason=length."""
    room = state.session_len - prompt_len
    if requested is None:
        if room < 1:
            raise HTTPException(400, f"the prompt has {prompt_len} tokens, which leaves no room for a reply in"
                                     f" session_len = {state.session_len}")
        return room
    if prompt_len + requested > state.session_len:
        raise HTTPException(400, f"the prompt has {prompt_len} tokens and max_tokens is {requested}: together"
                                 f" {prompt_len + requested}, over session_len = {state.session_len}."
                                 " Shorten the prompt or lower max_tokens.")
    return requested


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def temperature(t: float) -> float:
    """Below 1e-5, logits / t overflows to inf and sampling fails: such a temperature means greedy."""
    return 0.0 if t < 1e-5 else t


def sampling_params(req, max_tokens: int, logprobs: int | None, index: int = 0, hooks: dict | None = None):
    # n > 1 must not return n copies; the modulo keeps seed + index within what torch generators take
    seed = (req.seed + index) % 2**63 if req.seed is not None else None
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature(req.temperature), top_k=req.top_k, top_p=req.top_p,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=seed, stop=stop_list(req.stop),
        ignore_eos=req.ignore_eos, logprobs=logprobs, **(hooks or {}))


async def stream_batches(state, ids: list[int], params: SamplingParams, session_id=None, cancel=None):
    """Engine outputs for one sequence, as lists of all that arrived since the last one, with metrics;
    leaving early aborts the sequence in the engine. A route that fell behind the engine gets several
    tokens at once and can send them in one chunk (one socket write instead of several)."""
    if not state.llm.alive:
        raise HTTPException(503, "the engine has stopped; restart the server")
    m = state.metrics
    timer = RequestTimer(m)
    m.prompt_tokens.inc(len(ids))
    reason = "abort"
    gen = state.llm.generate_batches(ids, params, session_id=session_id)
    try:
        async with contextlib.aclosing(gen):
            async for outs in gen:
                timer.tokens(sum(out.token_id is not None for out in outs))
                last = outs[-1]
                if last.finished:
                    reason = last.finish_reason or "stop"
                yield outs
                if cancel is not None and cancel.is_set():
                    break
    finally:
        m.finished.labels(reason).inc()


async def stream_one(state, ids: list[int], params: SamplingParams, session_id=None, cancel=None):
    """stream_batches, one output at a time."""
    async with contextlib.aclosing(stream_batches(state, ids, params, session_id, cancel)) as batches:
        async for outs in batches:
            for out in outs:
                yield out


async def merge(streams):
    """Interleave several async streams as (index, item), in arrival order."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as s:
            async for item in s:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, s):
        try:
            async with contextlib.aclosing(s):
                async for item in s:
                    await queue.put((i, item))
        except BaseException as exc:  # re-raised in the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_unless_gone(request, items, on_item) -> None:
    """Feed (index, list of outputs) items to on_item one output at a time; stop (and so abort the engine request) if the client disconnects.
    A non-streamed reply has no send that could fail, so the disconnect is polled between tokens."""
    async for i, outs in items:
        for out in outs:
            on_item(i, out)
        if not outs[-1].finished and await request.is_disconnected():
            raise HTTPException(499, "client closed the request")


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries: list[dict]) -> dict:
    def one(tok, lp):
        s = token_text(tokenizer, tok)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [one(e["token"], e["logprob"]) | {
        "top_logprobs": [one(t, v) for t, v in e["top"].items()]} for e in entries]}


def completion_logprobs(tokenizer, entries: list[dict], offset: int = 0) -> dict:
    tokens = [token_text(tokenizer, e["token"]) for e in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in e["top"].items()} for e in entries],
            "text_offset": offsets}


def closer(state, gen):
    """Idempotent cleanup of one admitted request: end its engine streams, give back its queue slot."""
    done = False

    async def close():
        nonlocal done
        if not done:
            done = True
            try:
                await gen.aclose()
            finally:
                state.release()

    return close


class ClosingStream(StreamingResponse):
    """A streaming response that always runs `on_close`. The body generator's own `finally` is not
    enough: when the client is gone before the first byte, the generator is never started, and an
    unstarted generator runs no `finally` - the request would hold its queue slot and keep generating."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
