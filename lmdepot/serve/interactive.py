"""LMDeploy's stateful `/v1/chat/interactive`: the engine keeps each session's KV between turns.

Only the new turn's tokens are sent to the engine; its session already holds the earlier turns.
A later turn is rendered as the chat template's text for the whole conversation minus its text
for the conversation so far, so the template's system preamble is not repeated.
"""

from __future__ import annotations

import asyncio
import json
import random

from fastapi import APIRouter, HTTPException, Request

from lmdepot.runtime.sequence import SamplingParams
from lmdepot.serve import generation as g
from lmdepot.serve.protocol import InteractiveRequest

router = APIRouter()


def _turn_ids(tokenizer, prompt, first_turn: bool) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if first_turn:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    before = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    base = tokenizer.apply_chat_template(before, tokenize=False)
    full = tokenizer.apply_chat_template(before + messages, add_generation_prompt=True, tokenize=False)
    if not full.startswith(base):  # a template that rewrites earlier turns: send the turn as rendered alone
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(full[len(base):].lstrip("\n"), add_special_tokens=False)


@router.post("/v1/chat/interactive")
async def chat_interactive(req: InteractiveRequest, request: Request):
    state = request.app.state.serve
    sid = req.session_id if req.session_id != -1 else random.randint(1, 2**31 - 1)
    known = state.sessions.setdefault(sid, {"turns": 0, "cancel": None})
    if req.cancel:
        if known["cancel"] is not None:
            known["cancel"].set()
        return {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "abort",
                "session_id": sid}
    key = ("interactive", sid)
    if not req.interactive_mode:
        state.llm.end_session(key)   # LMDeploy: a non-interactive request starts the session afresh
        known["turns"] = 0
    history = state.llm.engine.scheduler.sessions.get(key) if req.interactive_mode else None
    history_tokens = len(history.token_ids) if history is not None else 0
    try:
        ids = _turn_ids(state.tokenizer, req.prompt, known["turns"] == 0)
    except Exception as exc:
        raise HTTPException(400, f"the chat template cannot render this prompt: {exc}") from None
    room = state.session_len - history_tokens - len(ids)
    if room < 1:
        raise HTTPException(400, f"the session has {history_tokens} tokens and the new turn {len(ids)}: no room"
                                 f" left in session_len = {state.session_len}; end the session"
                                 " (interactive_mode=false) to start over")
    max_tokens = min(req.request_output_len or room, room)
    params = SamplingParams(max_tokens=max_tokens, temperature=g.temperature(req.temperature), top_p=req.top_p,
                            top_k=req.top_k, repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos,
                            stop=g.stop_list(req.stop), seed=req.seed)
    cancel = known["cancel"] = asyncio.Event()
    stream = g.stream_one(state, ids, params, session_id=key, cancel=cancel)
    state.acquire()
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        state.release()
        raise
    known["turns"] += 1
    res = g.Result()

    def record(out):
        res.text += out.text
        res.token_ids += [out.token_id] if out.token_id is not None else []
        if out.finished:
            res.finish_reason = out.finish_reason

    def line(text: str) -> dict:
        return {"text": text, "tokens": len(res.token_ids), "input_tokens": len(ids),
                "history_tokens": history_tokens, "finish_reason": res.finish_reason, "session_id": sid}

    release, ended = g.closer(state, stream), False

    async def done():  # idempotent: the body's finally and the response's on_close both call it
        nonlocal ended
        if ended:
            return
        ended = True
        await release()
        if known["cancel"] is cancel:
            known["cancel"] = None
        if not req.interactive_mode:  # history is kept only in interactive mode
            state.llm.end_session(key)
            known["turns"] = 0

    async def outputs():
        yield first
        async for out in stream:
            yield out

    if not req.stream:
        try:
            async for out in outputs():
                record(out)
        finally:
            await done()
        res.finish_reason = res.finish_reason or "abort"
        return line(res.text)

    async def body():
        try:
            async for out in outputs():
                record(out)
                if out.text or out.finished:
                    yield json.dumps(line(out.text)) + "\n"
            if res.finish_reason is None:  # cancelled
                res.finish_reason = "abort"
                yield json.dumps(line("")) + "\n"
        finally:
            await done()

    return g.ClosingStream(body(), done, media_type="application/x-ndjson")
