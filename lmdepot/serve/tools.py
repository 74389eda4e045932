"""Tool calling: prompts that carry tools and tool results, and parsers that find calls in replies.

Parsers read text decoded with special tokens kept, since InternLM2's markers are special tokens.
A chat template that knows nothing of tools (e.g. SmolLM2's) gets the tools described in the
system prompt in Hermes style, and its replies are parsed as Hermes `<tool_call>` JSON.
"""

from __future__ import annotations

import json
import re
import uuid

PARSERS = ("hermes", "qwen", "llama3", "internlm2")

HERMES_PROMPT = (
    "You can call functions. Their signatures are inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call one, reply with <tool_call>{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "</tool_call>.")


def detect_parser(chat_template: str | None) -> str:
    t = chat_template or ""
    if "<|action_start|>" in t or "<|plugin|>" in t:
        return "internlm2"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "hermes"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {})
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def _loads(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict]]:
    """(content left for the user, tool calls). No calls found: the text is all content."""
    if parser in ("hermes", "qwen"):
        calls, first = [], None
        for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
            obj = _loads(m.group(1))
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters"))))
                first = m.start() if first is None else first
        return (text if not calls else text[:first].strip() or None), calls
    if parser == "internlm2":
        m = re.search(r"<\|action_start\|>\s*<\|plugin\|>\s*(.*?)\s*(?:<\|action_end\|>|$)", text, re.S)
        obj = _loads(m.group(1)) if m else None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("parameters", obj.get("arguments"))
            return text[:m.start()].strip() or None, [_call(obj["name"], args)]
        return text, []
    if parser == "llama3":
        body = text.replace("<|python_tag|>", "").strip()
        calls = []
        for part in body.split(";"):
            obj = _loads(part.strip())
            if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
                return text, []
            calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments"))))
        return None, calls
    raise ValueError(f"unknown tool call parser {parser!r}")


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _args_obj(arguments):
    if isinstance(arguments, str):
        obj = _loads(arguments)
        return obj if isinstance(obj, dict) else {"value": arguments}
    return arguments or {}


def to_template_messages(messages: list[dict], tools: list[dict] | None, template_knows_tools: bool) -> list[dict]:
    """OpenAI messages -> what HF chat templates expect (string content, argument objects)."""
    out = []
    for m in messages:
        role, msg = m["role"], {"role": m["role"], "content": _text(m.get("content"))}
        if role == "developer":
            msg["role"] = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"type": "function", "function": {"name": c["function"]["name"],
                                                       "arguments": _args_obj(c["function"].get("arguments"))}}
                     for c in m["tool_calls"] if isinstance(c, dict) and isinstance(c.get("function"), dict)]
            if template_knows_tools:
                msg["tool_calls"] = calls
            else:
                msg["content"] += "".join(
                    "<tool_call>" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                    + "</tool_call>" for c in calls)
        if role in ("tool", "function"):
            msg["role"] = "tool"
            if m.get("tool_call_id"):
                msg["tool_call_id"] = m["tool_call_id"]
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    if tools and not template_knows_tools:
        desc = HERMES_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + desc}
        else:
            out.insert(0, {"role": "system", "content": desc})
    return out


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    template = tokenizer.chat_template or ""
    knows_tools = "tools" in template
    msgs = to_template_messages(messages, tools, knows_tools)
    kwargs = {"tools": tools} if tools and knows_tools else {}
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
