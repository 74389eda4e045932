"""Tool calling and structured output: the seeds' function-calling lab through the official client."""

from __future__ import annotations

import json

import httpx
import pytest

from lmdepot.serve.tools import detect_parser, parse_tool_calls, render_chat

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

ARGS = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers a and b.",
                                           "parameters": ARGS}},
         {"type": "function", "function": {"name": "mul", "description": "Multiply two integers a and b.",
                                           "parameters": ARGS}}]
FUNCS = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b}


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(api_key="k", base_url=f"{smol_server.url}/v1")


def test_function_calling_lab(client):
    messages = [{"role": "user", "content": "Compute (3 + 5) with the tools."}]
    # 1. a tool call whose arguments parse and match the schema
    first = client.chat.completions.create(model="smollm2-135m", messages=messages, tools=TOOLS,
                                           tool_choice="required", temperature=0, max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name in FUNCS and call.id and call.type == "function"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, ARGS)
    # 2. the tool result goes back through the chat template
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": str(FUNCS[call.function.name](**args))})
    # 3. the model answers
    final = client.chat.completions.create(model="smollm2-135m", messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=48)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length", "tool_calls")
    assert answer.message.content or answer.message.tool_calls


def test_named_tool_choice_streams_tool_calls(client):
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is 6 times 7?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "mul"}}, temperature=0, max_tokens=64, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "mul" and calls[0].index == 0
    jsonschema.validate(json.loads(calls[0].function.arguments), ARGS)


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                        "maxItems": 3}},
              "required": ["name", "age", "tags"]}
    r = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=0.7,
        seed=3, max_tokens=120, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", content
    jsonschema.validate(json.loads(content), schema)
    obj = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Return a JSON object describing a cat."}],
        temperature=0, max_tokens=120, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_invalid_json_schema_is_a_400(smol_server):
    r = httpx.post(f"{smol_server.url}/v1/chat/completions", timeout=30, json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nonsense"}}}})
    assert r.status_code == 400 and "schema" in r.json()["error"]["message"]


@pytest.mark.parametrize("parser,text,content,name,args", [
    ("hermes", 'Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', "Sure.", "add",
     {"a": 1, "b": 2}),
    ("qwen", '<tool_call>\n{"name": "mul", "arguments": {"a": 3, "b": 4}}\n</tool_call>', None, "mul",
     {"a": 3, "b": 4}),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 5, "b": 6}}', None, "add", {"a": 5, "b": 6}),
    ("internlm2", 'Let me add.<|action_start|><|plugin|>\n{"name": "add", "parameters": {"a": 7, "b": 8}}'
                  '<|action_end|>', "Let me add.", "add", {"a": 7, "b": 8}),
])
def test_parsers(parser, text, content, name, args):
    got_content, calls = parse_tool_calls(parser, text)
    assert got_content == content
    assert calls[0]["function"]["name"] == name and json.loads(calls[0]["function"]["arguments"]) == args


def test_plain_text_is_not_a_call():
    for parser in ("hermes", "llama3", "internlm2"):
        assert parse_tool_calls(parser, "The answer is 8.") == ("The answer is 8.", [])


def test_parser_detection():
    assert detect_parser("...<|action_start|><|plugin|>...") == "internlm2"
    assert detect_parser("{{ '<|python_tag|>' }} ipython") == "llama3"
    assert detect_parser("<tool_call>") == "hermes"
    assert detect_parser(None) == "hermes"


def test_tool_messages_go_through_the_template(smollm2_ws):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_ws[1] / "tokenizer"))
    messages = [{"role": "user", "content": "add 2 and 3"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    text = tok.decode(render_chat(tok, messages, TOOLS))
    assert '"name": "add"' in text and "<tool_call>" in text          # tools described, the call kept
    assert "<|im_start|>tool\n5<|im_end|>" in text                     # the result, as a tool turn
    assert text.endswith("<|im_start|>assistant\n")
