"""Streams that fall behind the engine: several tokens in one SSE chunk, the same text and counts.

The app runs in-process (httpx's ASGI transport) on a tiny random model; `_Stream.take` is slowed down
so that each read finds several tokens queued, as a busy event loop at batch 256 does."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lmdepot.runtime import llm as llm_mod
from lmdepot.serve.openai_routes import _TextChunk, _sse

MAX_TOKENS = 16


def test_text_chunk_is_the_json_dumps_line():
    def chunk(choices, usage=None):  # id, created and model that contain the placeholders' characters
        return _sse({"id": "x987654321", "object": "text_completion", "created": 1987654321,
                     "model": 'm"\x00lmdepot-text\x00é', "choices": choices, "usage": usage})

    make = lambda i, t: [{"index": i, "text": t, "logprobs": None, "finish_reason": None}]  # noqa: E731
    fast = _TextChunk(chunk, make)
    for index, text in [(0, ""), (3, 'héllo "q" \\ \n\u2028 ✓ \x01'), (12, "987654321"), (1, "\x00lmdepot-text\x00")]:
        assert fast(index, text) == chunk(make(index, text))


@pytest.fixture(scope="module")
def app_llm(tiny_ws):
    from lmdepot.runtime.llm import AsyncLLM
    from lmdepot.serve.app import ServeConfig, create_app

    llm = AsyncLLM(tiny_ws, max_batch_size=8, session_len=128)
    yield create_app(llm, ServeConfig(model_name="tiny")), llm
    llm.close()


@pytest.fixture
def slow_reader(monkeypatch):
    take = llm_mod._Stream.take

    async def slow(self):
        await asyncio.sleep(0.2)   # the engine makes several tokens meanwhile
        return await take(self)

    monkeypatch.setattr(llm_mod._Stream, "take", slow)


def _post(app, path: str, body: dict):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post(path, json=body, timeout=120)
            return r.status_code, r.text

    return asyncio.run(go())


def _events(text: str) -> list[dict]:
    lines = [x[6:] for x in text.split("\n\n") if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _gen_tokens(app) -> float:
    text = app.state.serve.metrics.render(0).decode()
    return float(next(x.split()[-1] for x in text.splitlines() if x.startswith("lmdepot_generation_tokens_total")))


def test_completion_stream_merges_tokens_when_behind(app_llm, slow_reader):
    app, _ = app_llm
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    status, plain = _post(app, "/v1/completions", body)
    assert status == 200
    before = _gen_tokens(app)
    status, text = _post(app, "/v1/completions", body | {"stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = _events(text)
    choices = [c for e in events for c in e["choices"]]
    assert "".join(c["text"] for c in choices) == json.loads(plain)["choices"][0]["text"]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
    assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert len(choices) <= MAX_TOKENS // 4, len(choices)   # several tokens in one chunk
    assert _gen_tokens(app) - before == MAX_TOKENS

    # with logprobs each token keeps its own chunk, however far behind the reader is
    status, text = _post(app, "/v1/completions", body | {"stream": True, "logprobs": 1})
    lps = [c["logprobs"] for e in _events(text) for c in e["choices"] if c["logprobs"]]
    assert status == 200 and len(lps) == MAX_TOKENS and all(len(x["tokens"]) == 1 for x in lps)


def test_chat_stream_merges_tokens_when_behind(app_llm, slow_reader):
    app, _ = app_llm
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "n": 2}
    status, plain = _post(app, "/v1/chat/completions", body)
    assert status == 200
    want = [c["message"]["content"] for c in json.loads(plain)["choices"]]
    status, text = _post(app, "/v1/chat/completions", body | {"stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = _events(text)
    choices = [c for e in events for c in e["choices"]]
    got = ["".join(c["delta"].get("content") or "" for c in choices if c["index"] == i) for i in range(2)]
    assert got == want
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == [0, 1]
    assert events[-1]["usage"]["completion_tokens"] == 2 * MAX_TOKENS
    assert len([c for c in choices if c["delta"].get("content")]) <= MAX_TOKENS // 2
