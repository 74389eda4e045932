"""OpenAI (and LMDeploy) request/response shapes.

Requests accept unknown fields (`extra="allow"`) because real clients send fields we do not use;
rejecting them would make a client notice it is not talking to OpenAI.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Loose):
    include_usage: bool = False


class JsonSchema(_Loose):
    name: str = "schema"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchema | None = None


class FunctionDef(_Loose):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Loose):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Loose):
    name: str


class ToolChoiceNamed(_Loose):
    type: Literal["function"] = "function"
    function: NamedFunction


class _Sampling(_Loose):
    """Sampling fields shared by both completion routes, with LMDeploy's extras."""

    model: str
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)   # what torch generators take
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: str | None = None
    # LMDeploy extras
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100)   # beyond, logits overflow to inf
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    session_id: int | None = None


class ChatMessage(_Loose):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceNamed | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    response_format: ResponseFormat | None = None


class InteractiveRequest(_Loose):
    """LMDeploy's stateful `/v1/chat/interactive`: the server keeps the conversation per session_id."""

    prompt: str | list[dict[str, Any]]
    session_id: int = -1
    interactive_mode: bool = False   # True keeps the session after this turn; False starts afresh
    stream: bool = False
    stop: str | list[str] | None = None
    request_output_len: int | None = Field(default=None, ge=1)
    top_p: float = Field(default=0.8, gt=0, le=1)
    top_k: int = Field(default=40, ge=0)
    temperature: float = Field(default=0.8, ge=0, le=2)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=100)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cancel: bool = False
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str = "invalid_request_error", code: str | int | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code},
            "object": "error", "message": message}
