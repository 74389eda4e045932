"""`/v1/chat/completions` and `/v1/completions`, streaming (SSE) and not."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, HTTPException, Request

from lmdepot.serve import generation as g
from lmdepot.serve.protocol import ChatCompletionRequest, CompletionRequest, new_id, now
from lmdepot.serve.structured import tool_call_schema, validate_schema
from lmdepot.serve.tools import _call, parse_tool_calls, render_chat

router = APIRouter()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _TextChunk:
    """`chunk(choices(index, text))` for a chunk whose only varying parts are a choice's index and text,
    made by splicing those two into the line rendered once with placeholders: the same bytes as
    json.dumps of the dict at a fraction of the cost, and most chunks of a streamed reply are these.
    The placeholders are searched from the end: only the choice (and a null usage) follow the id,
    created time and model name, which could contain the same characters."""

    _INDEX, _TEXT = 987654321, "\x00lmdepot-text\x00"

    def __init__(self, chunk, choices):
        line = chunk(choices(self._INDEX, self._TEXT))
        head, c = line.rsplit(_json_str(self._TEXT), 1)
        a, b = head.rsplit(str(self._INDEX), 1)
        self.parts = a, b, c

    def __call__(self, index: int, text: str) -> str:
        a, b, c = self.parts
        return f"{a}{index}{b}{_json_str(text)}{c}"


_json_str = json.JSONEncoder(ensure_ascii=False).encode   # str -> its JSON literal


class _Plan:
    """What a chat request turns into: prompt ids, a grammar (or none), and how to read the reply."""

    def __init__(self, ids, mode, fn_name=None, compiled=None):
        self.ids, self.mode, self.fn_name, self.compiled = ids, mode, fn_name, compiled


async def _compile(state, schema):
    validate_schema(schema)
    return await asyncio.to_thread(state.grammars.compile, schema)


async def _plan_chat(state, req: ChatCompletionRequest) -> _Plan:
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools or []]
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise HTTPException(400, "tool_choice is set but no tools are given")
    mode, fn_name = (choice, None) if isinstance(choice, str) else ("named", choice.function.name)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        ids = render_chat(state.tokenizer, messages, tools if mode != "none" else None)
    except Exception as exc:  # jinja raises for messages a template refuses (e.g. role order)
        raise HTTPException(400, f"the chat template cannot render these messages: {exc}") from None
    compiled = None
    if mode in ("required", "named"):
        compiled = await _compile(state, tool_call_schema(tools, fn_name))
    elif req.response_format is not None and req.response_format.type != "text":
        rf = req.response_format
        if rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise HTTPException(400, "response_format json_schema needs json_schema.schema")
            compiled = await _compile(state, rf.json_schema.schema_)
        else:
            compiled = await _compile(state, {"type": "object"})
    return _Plan(ids, mode, fn_name, compiled)


def _finish_chat(state, plan: _Plan, res: g.Result, skip_special: bool) -> tuple[dict, str | None]:
    """The assistant message and the finish reason of one choice."""
    reason, text = res.finish_reason, res.text
    ids = res.token_ids
    if ids and reason == "stop" and ids[-1] in state.llm.engine.eos_ids:
        ids = ids[:-1]  # the stop token ends the reply; it is not part of it
    raw = state.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
    msg = {"role": "assistant", "content": text if skip_special else raw}
    try:
        if plan.mode == "named":
            json.loads(text)
            return {"role": "assistant", "content": None, "tool_calls": [_call(plan.fn_name, text)]}, reason
        if plan.mode == "required":
            obj = json.loads(text)
            return {"role": "assistant", "content": None,
                    "tool_calls": [_call(obj["name"], obj["arguments"])]}, "tool_calls"
    except (ValueError, KeyError, TypeError):
        return msg, reason  # cut off by max_tokens: not a call, hand back what there is
    if plan.mode == "auto":
        content, calls = parse_tool_calls(state.parser, raw)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return msg, reason


def _streams(state, req, ids_list, max_tokens_list, logprobs, plan_compiled=None):
    streams = []
    for ids, mt in zip(ids_list, max_tokens_list):
        for j in range(req.n):
            hooks = state.grammars.constraint(plan_compiled).hooks() if plan_compiled is not None else None
            streams.append(g.stream_batches(state, ids, g.sampling_params(req, mt, logprobs, j, hooks)))
    return streams


async def _start(state, streams):
    """Admission plus the first outputs, so that engine refusals become a 400 before any byte is sent.
    The merged stream yields (choice index, list of outputs that arrived together)."""
    state.acquire()
    gen = g.merge(streams)
    try:
        first = await anext(gen)
    except BaseException:
        await gen.aclose()
        state.release()
        raise
    return gen, first


async def _items(gen, first):
    yield first
    async for item in gen:
        yield item


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = request.app.state.serve
    state.check_model(req.model)
    plan = await _plan_chat(state, req)
    max_tokens = g.max_new_tokens(state, len(plan.ids), req.max_completion_tokens or req.max_tokens)
    k = (req.top_logprobs or 0) if req.logprobs else None
    gen, first = await _start(state, _streams(state, req, [plan.ids], [max_tokens], k, plan.compiled))
    rid, created, results = new_id("chatcmpl"), now(), [g.Result() for _ in range(req.n)]
    tok = state.tokenizer

    def collect(i, out):
        r = results[i]
        r.text += out.text
        if out.token_id is not None:
            r.token_ids.append(out.token_id)
        if out.logprob is not None:
            r.logprobs.append(out.logprob)
        if out.finished:
            r.finish_reason = out.finish_reason
        return r

    def total_usage():
        return g.usage(len(plan.ids), sum(len(r.token_ids) for r in results))

    if not req.stream:
        try:
            await g.collect_unless_gone(request, _items(gen, first), collect)
        finally:
            await gen.aclose()
            state.release()
        choices = []
        for i, r in enumerate(results):
            msg, reason = _finish_chat(state, plan, r, req.skip_special_tokens)
            choices.append({"index": i, "message": msg, "finish_reason": reason,
                            "logprobs": g.chat_logprobs(tok, r.logprobs) if k is not None else None})
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": total_usage()}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    # Tool calls are only known once the reply is complete: such replies are sent in one delta.
    buffered = plan.mode != "none"

    def chunk(choices, usage=None):
        c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
             "choices": choices}
        if include_usage:
            c["usage"] = usage
        return _sse(c)

    # The text-only chunk is most of a stream: formatted from a template instead of json.dumps of a dict.
    fast_chunk = _TextChunk(chunk, lambda i, t: [{"index": i, "delta": {"content": t}, "finish_reason": None}])

    async def events():
        for i in range(req.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for i, outs in _items(gen, first):
            for out in outs:
                r = collect(i, out)
            if not buffered:
                if k is not None:  # one chunk per token: each carries its own logprobs
                    for out in outs:
                        if out.text or out.logprob is not None:
                            c = {"index": i, "delta": {"content": out.text}, "finish_reason": None}
                            if out.logprob is not None:
                                c["logprobs"] = g.chat_logprobs(tok, [out.logprob])
                            yield chunk([c])
                else:
                    text = "".join(out.text for out in outs) if len(outs) > 1 else outs[0].text
                    if text:
                        yield fast_chunk(i, text)
            out = outs[-1]
            if out.finished:
                msg, reason = _finish_chat(state, plan, r, req.skip_special_tokens)
                if buffered:
                    delta = {k2: v for k2, v in msg.items() if k2 != "role" and v is not None}
                    if "tool_calls" in delta:
                        delta["tool_calls"] = [dict(c, index=n) for n, c in enumerate(delta["tool_calls"])]
                    yield chunk([{"index": i, "delta": delta, "finish_reason": None}])
                yield chunk([{"index": i, "delta": {}, "finish_reason": reason}])
        if include_usage:
            yield chunk([], total_usage())

    return _sse_response(state, gen, events())


def _sse_response(state, gen, events):
    """An SSE stream of `events` that always ends with [DONE], reports an engine failure as an error
    event instead of cutting off, and releases the request however the client leaves."""

    async def body():
        try:
            async for event in events:
                yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine failed mid-stream: tell the client instead of cutting off
            yield _sse({"error": {"message": str(exc), "type": "server_error", "code": 500}})
        finally:
            await close()
        yield "data: [DONE]\n\n"

    close = g.closer(state, gen)
    return g.ClosingStream(body(), close, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _completion_prompts(state, prompt) -> list[list[int]]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = state.llm.engine.cfg.vocab_size
        if any(t < 0 or t >= vocab for t in prompt):
            raise HTTPException(400, f"prompt token ids must be in [0, {vocab})")
        return [list(prompt)]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    ids = [state.tokenizer.encode(p) for p in prompts]
    if any(not x for x in ids):
        raise HTTPException(400, "prompt must not be empty")
    return ids


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    state = request.app.state.serve
    state.check_model(req.model)
    prompts = _completion_prompts(state, req.prompt)
    max_tokens = [g.max_new_tokens(state, len(p), req.max_tokens if req.max_tokens is not None else 16)
                  for p in prompts]
    compiled = None
    rf = req.response_format
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.schema_ if rf.type == "json_schema" and rf.json_schema else None
        if rf.type == "json_schema" and schema is None:
            raise HTTPException(400, "response_format json_schema needs json_schema.schema")
        compiled = await _compile(state, schema if schema is not None else {"type": "object"})
    gen, first = await _start(state, _streams(state, req, prompts, max_tokens, req.logprobs, compiled))
    rid, created, tok = new_id("cmpl"), now(), state.tokenizer
    results = [g.Result() for _ in range(len(prompts) * req.n)]
    echo = [tok.decode(prompts[i // req.n]) if req.echo else "" for i in range(len(results))]

    def usage():
        return g.usage(sum(len(p) for p in prompts), sum(len(r.token_ids) for r in results))

    if not req.stream:
        def collect(i, out):
            r = results[i]
            r.text += out.text
            r.token_ids += [out.token_id] if out.token_id is not None else []
            r.logprobs += [out.logprob] if out.logprob is not None else []
            r.finish_reason = out.finish_reason if out.finished else None

        try:
            await g.collect_unless_gone(request, _items(gen, first), collect)
        finally:
            await gen.aclose()
            state.release()
        choices = [{"index": i, "text": echo[i] + r.text, "finish_reason": r.finish_reason,
                    "logprobs": g.completion_logprobs(tok, r.logprobs, len(echo[i]))
                    if req.logprobs is not None else None} for i, r in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage()}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices, use=None):
        c = {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": choices}
        if include_usage:
            c["usage"] = use
        return _sse(c)

    fast_chunk = _TextChunk(chunk, lambda i, t: [{"index": i, "text": t, "logprobs": None, "finish_reason": None}])

    async def events():
        for i, e in enumerate(echo):
            if e:
                yield chunk([{"index": i, "text": e, "finish_reason": None, "logprobs": None}])
        async for i, outs in _items(gen, first):
            ids = results[i].token_ids
            for out in outs:
                if out.token_id is not None:
                    ids.append(out.token_id)
            if req.logprobs is not None:  # one chunk per token: each carries its own logprobs
                for out in outs:
                    if out.text or out.finished:
                        lp = g.completion_logprobs(tok, [out.logprob]) if out.logprob is not None else None
                        yield chunk([{"index": i, "text": out.text, "logprobs": lp,
                                      "finish_reason": out.finish_reason if out.finished else None}])
                continue
            last = outs[-1]
            text = "".join(out.text for out in outs) if len(outs) > 1 else last.text
            if last.finished:
                yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": last.finish_reason}])
            elif text:
                yield fast_chunk(i, text)
        if include_usage:
            yield chunk([], usage())

    return _sse_response(state, gen, events())
