"""The OpenAI routes as real clients see them: the official `openai` client, raw HTTP and SSE."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.helpers import sse_events

openai = pytest.importorskip("openai")


def test_seeds_client_script_runs_unchanged(smol_server):
    # LMDeploy's README client, with only the address changed to the test server's free port.
    from openai import OpenAI

    client = OpenAI(api_key="YOUR_API_KEY", base_url=f"{smol_server.url}/v1")
    model_name = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Give me three tips to stay healthy."}],
        temperature=0.8, top_p=0.8, max_tokens=40)
    assert model_name == "smollm2-135m"
    assert response.choices[0].message.content.strip()
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens > 0


def test_chat_stream_with_usage_and_logprobs(smol_server):
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True,
            "top_logprobs": 2}
    with httpx.stream("POST", f"{smol_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, done = sse_events(r.iter_lines())
    assert done
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    lps = [c["logprobs"]["content"][0] for e in events for c in e["choices"] if c.get("logprobs")]
    assert lps and all(len(x["top_logprobs"]) == 2 and x["logprob"] <= 0 for x in lps)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] in (["stop"], ["length"])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(lps)
    # greedy: the same text as the non-streamed reply
    plain = httpx.post(f"{smol_server.url}/v1/chat/completions", json=body | {"stream": False}, timeout=60).json()
    assert plain["choices"][0]["message"]["content"] == text


def test_completions_sampling_fields(smol_server):
    from openai import OpenAI

    client = OpenAI(api_key="k", base_url=f"{smol_server.url}/v1")
    kw = dict(model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0.9, top_p=0.9,
              seed=7, presence_penalty=0.5, frequency_penalty=0.5, n=2, logprobs=2,
              extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert len(a.choices) == 2 and all(c.finish_reason == "length" for c in a.choices)
    assert len(a.choices[0].logprobs.tokens) == 8 and len(a.choices[0].logprobs.top_logprobs[0]) == 2
    stopped = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                        stop=[" 6"])
    assert " 6" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=5, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 5


def test_models_health_openapi(smol_server):
    models = httpx.get(f"{smol_server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "smollm2-135m"
    assert httpx.get(f"{smol_server.url}/health").json() == {"status": "ok"}
    paths = httpx.get(f"{smol_server.url}/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/chat/interactive"} <= set(paths)


def test_interactive_session_keeps_history(smol_server):
    url = f"{smol_server.url}/v1/chat/interactive"
    first = httpx.post(url, json={"prompt": "My name is Ada.", "session_id": 4242, "interactive_mode": True,
                                  "request_output_len": 8, "temperature": 0}, timeout=60).json()
    assert first["history_tokens"] == 0 and first["tokens"] > 0
    with httpx.stream("POST", url, json={"prompt": "What is my name?", "session_id": 4242, "interactive_mode": True,
                                         "request_output_len": 8, "temperature": 0, "stream": True}, timeout=60) as r:
        import json

        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert lines[-1]["finish_reason"] in ("stop", "length")
    assert lines[-1]["history_tokens"] == first["input_tokens"] + first["tokens"]
    # non-interactive: a fresh conversation
    fresh = httpx.post(url, json={"prompt": "Hi", "session_id": 4242, "request_output_len": 4}, timeout=60).json()
    assert fresh["history_tokens"] == 0


def test_metrics_exposition(smol_server):
    httpx.post(f"{smol_server.url}/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "max_tokens": 3},
               timeout=60)
    text = httpx.get(f"{smol_server.url}/metrics").text
    for name in ("lmdepot_requests_total", "lmdepot_num_requests_running", "lmdepot_num_requests_waiting",
                 "lmdepot_kv_cache_usage_ratio", "lmdepot_time_to_first_token_seconds_bucket",
                 "lmdepot_inter_token_latency_seconds_bucket", "lmdepot_prompt_tokens_total",
                 "lmdepot_generation_tokens_total"):
        assert name in text, name
    assert 'route="/v1/completions",status="200"' in text


def test_chat_n_choices_stream_and_special_tokens(smol_server):
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 5,
            "n": 2, "seed": 11, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{smol_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        events, done = sse_events(r.iter_lines())
    assert done
    finished = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"])
    assert finished == [0, 1]
    raw = httpx.post(f"{smol_server.url}/v1/chat/completions", timeout=60, json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40,
        "temperature": 0, "ignore_eos": True, "skip_special_tokens": False}).json()
    assert "<|im_end|>" in raw["choices"][0]["message"]["content"]   # kept when asked


def test_interactive_cancel_stops_the_turn(smol_server):
    import json

    url = f"{smol_server.url}/v1/chat/interactive"
    body = {"prompt": "Tell a long story.", "session_id": 777, "interactive_mode": True, "stream": True,
            "request_output_len": 400, "ignore_eos": True}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        assert httpx.post(url, json={"prompt": "", "session_id": 777, "cancel": True}).status_code == 200
        rest = [json.loads(x) for x in lines if x]
    assert rest[-1]["finish_reason"] == "abort" and rest[-1]["tokens"] < 400
