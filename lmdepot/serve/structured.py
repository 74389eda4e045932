"""Grammar-constrained decoding with xgrammar: JSON schemas, any JSON object, forced tool calls.

The runtime knows nothing about grammars: each request gets a `Constraint` whose `process` masks the
logits (SamplingParams.logits_processor) and whose `accept` advances the matcher
(SamplingParams.accept_token). Once the grammar is complete only stop tokens stay allowed, so the
model ends the reply itself instead of running to max_tokens.
"""

from __future__ import annotations

import json
import threading

from lmdepot.runtime.errors import RequestError


class Constraint:
    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.failed = False

    def process(self, output_ids, logits):
        if self.failed or self.matcher.is_terminated():
            return logits
        self.matcher.fill_next_token_bitmask(self.bitmask)
        # The hooks run in the engine thread: an exception there would stop every request.
        try:
            self._xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self.bitmask, vocab_size=self.vocab_size)
        except Exception:
            self.failed = True
        return logits

    def accept(self, token_id: int) -> None:
        if self.failed or self.matcher.is_terminated():
            return
        try:
            if not self.matcher.accept_token(token_id):
                self.failed = True
        except Exception:
            self.failed = True

    def hooks(self) -> dict:
        return {"logits_processor": self.process, "accept_token": self.accept}


class Grammars:
    """One compiler per server (it caches compiled grammars); built on first use, it is not cheap."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self._args = (tokenizer, vocab_size, sorted(stop_ids))
        self.vocab_size = vocab_size
        self._compiler = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                tokenizer, vocab_size, stop_ids = self._args
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def compile(self, schema: dict | str):
        """Compact JSON for the schema. Whitespace is not allowed between tokens: small models
        otherwise tend to emit newlines forever inside an object."""
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            compiled = self._get_compiler().compile_json_schema(text, any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the reason
            raise RequestError(f"invalid JSON schema: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return compiled

    def constraint(self, compiled) -> Constraint:
        return Constraint(compiled, self.vocab_size)


def tool_call_schema(tools: list[dict], name: str | None = None) -> dict:
    """A named function: its arguments object. `required`: {"name": ..., "arguments": {...}} of any tool."""
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if name is not None:
        if name not in params:
            raise RequestError(f"tool_choice names function {name!r}, which is not in tools")
        return params[name]
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for n, p in params.items()]}


def validate_schema(schema) -> None:
    """Obvious shape errors as a 400, before the compiler sees them."""
    if not isinstance(schema, (dict, bool)):
        raise RequestError("response_format.json_schema.schema must be a JSON object")
