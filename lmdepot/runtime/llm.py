"""User-facing APIs: offline `LLM(...).generate(prompts)` and streaming `AsyncLLM.generate(...)`."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from lmdepot.runtime.config import EngineConfig
from lmdepot.runtime.engine import Engine, StepOutput
from lmdepot.runtime.sequence import SamplingParams


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict] = field(default_factory=list)


def encode_prompt(tokenizer, prompt, chat_template: bool) -> list[int]:
    """str or messages -> token ids (through the chat template when asked); a list of ids passes through."""
    if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
        return list(prompt)
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt)


class LLM:
    def __init__(self, model, **engine_kwargs):
        self.engine = Engine(model, EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_chat_template: bool = False, session_ids: list | None = None) -> list[Completion]:
        """All prompts are submitted at once and batched continuously; results keep the input order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = encode_prompt(self.tokenizer, prompt, use_chat_template)
            sid = session_ids[i] if session_ids else None
            seqs.append(self.engine.add_request(ids, p or SamplingParams(), session_id=sid))
        while self.engine.has_unfinished():
            self.engine.step()
        out = [Completion(s.token_ids[s.num_history:s.num_prompt], s.output_ids, s.text, s.finish_reason,
                          s.logprobs) for s in seqs]
        return out[0] if single else out

    def end_session(self, session_id) -> None:
        self.engine.end_session(session_id)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Stream:
    """One sequence's outputs on its event loop. The engine thread hands over a whole step's outputs in
    one callback (`_push_all`); the reader takes everything queued at once, so a reader that fell behind
    catches up in one wakeup instead of one per token."""

    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def push(self, item) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> list:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


def _push_all(pairs) -> None:
    for stream, item in pairs:
        stream.push(item)


class AsyncLLM:
    """Runs the engine loop in a background thread; generate() streams StepOutputs as they come.

    Each engine step's outputs reach an event loop in one `call_soon_threadsafe` (one self-pipe write),
    not one per token: every such write is a syscall that hands the GIL to the event loop thread, and
    the engine thread then waits for it back - at 256 sequences that was 256 hand-overs per step.
    Leaving the `async for` early (break, cancellation) aborts the request and frees its blocks.
    """

    def __init__(self, model, **engine_kwargs):
        self.engine = Engine(model, EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._cv = threading.Condition()
        self._inbox: list = []
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, _Stream]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lmdepot-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.engine.has_unfinished() and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                inbox, self._inbox = self._inbox, []
            try:
                for action in inbox:
                    action()
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
            except BaseException as exc:  # a dead engine must not leave its callers waiting forever
                self._send([(loop, stream, exc) for loop, stream in self._queues.values()])
                self._queues.clear()
                self._closed = True
                return

    def _deliver(self, outs: list[StepOutput]) -> None:
        pending = []
        for out in outs:
            target = self._queues.get(out.seq_id)
            if target is not None:
                pending.append((target[0], target[1], out))
                if out.finished:
                    del self._queues[out.seq_id]
        self._send(pending)

    @staticmethod
    def _send(pending) -> None:
        """One callback per event loop (the server has one) for all of pending's (loop, stream, item)."""
        by_loop: dict = {}
        for loop, stream, item in pending:
            by_loop.setdefault(loop, []).append((stream, item))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_push_all, pairs)

    def _submit(self, action) -> None:
        with self._cv:
            self._inbox.append(action)
            self._cv.notify()

    async def generate(self, prompt, params: SamplingParams | None = None, session_id=None,
                       use_chat_template: bool = False):
        """StepOutputs of one request, one at a time."""
        async for outs in self.generate_batches(prompt, params, session_id, use_chat_template):
            for out in outs:
                yield out

    async def generate_batches(self, prompt, params: SamplingParams | None = None, session_id=None,
                               use_chat_template: bool = False):
        """Lists of StepOutputs: all that arrived for this request since the caller last asked."""
        ids = encode_prompt(self.tokenizer, prompt, use_chat_template) if isinstance(prompt, str) else prompt
        loop = asyncio.get_running_loop()
        stream = _Stream()
        added: asyncio.Future = loop.create_future()

        def add():
            try:
                seq = self.engine.add_request(ids, params or SamplingParams(), session_id=session_id)
                self._queues[seq.id] = (loop, stream)
                loop.call_soon_threadsafe(added.set_result, seq.id)
            except Exception as exc:  # surfaced in the caller's task, not the engine thread
                loop.call_soon_threadsafe(added.set_exception, exc)

        self._submit(add)
        seq_id = await added
        finished = False
        try:
            while not finished:
                outs = await stream.take()
                for k, out in enumerate(outs):
                    if isinstance(out, BaseException):
                        finished = True
                        if k:
                            yield outs[:k]
                        raise out
                    finished = out.finished
                yield outs
        finally:
            if not finished:
                self._submit(lambda: (self._queues.pop(seq_id, None), self.engine.abort(seq_id)))

    def end_session(self, session_id) -> None:
        self._submit(lambda: self.engine.end_session(session_id))

    @property
    def alive(self) -> bool:
        """False once the engine loop has stopped (closed, or died on an error): new requests would wait forever."""
        return self._thread.is_alive() and not self._closed

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        self.engine.close()
