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


class AsyncLLM:
    """Runs the engine loop in a background thread; generate() streams StepOutputs as they come.

    Leaving the `async for` early (break, cancellation) aborts the request and frees its blocks.
    """

    def __init__(self, model, **engine_kwargs):
        self.engine = Engine(model, EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._cv = threading.Condition()
        self._inbox: list = []
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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
                    for out in self.engine.step():
                        self._deliver(out)
            except BaseException as exc:  # a dead engine must not leave its callers waiting forever
                for loop, queue in self._queues.values():
                    loop.call_soon_threadsafe(queue.put_nowait, exc)
                self._queues.clear()
                self._closed = True
                return

    def _deliver(self, out: StepOutput) -> None:
        target = self._queues.get(out.seq_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, out)
            if out.finished:
                self._queues.pop(out.seq_id, None)

    def _submit(self, action) -> None:
        with self._cv:
            self._inbox.append(action)
            self._cv.notify()

    async def generate(self, prompt, params: SamplingParams | None = None, session_id=None,
                       use_chat_template: bool = False):
        ids = encode_prompt(self.tokenizer, prompt, use_chat_template) if isinstance(prompt, str) else prompt
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        added: asyncio.Future = loop.create_future()

        def add():
            try:
                seq = self.engine.add_request(ids, params or SamplingParams(), session_id=session_id)
                self._queues[seq.id] = (loop, queue)
                loop.call_soon_threadsafe(added.set_result, seq.id)
            except Exception as exc:  # surfaced in the caller's task, not the engine thread
                loop.call_soon_threadsafe(added.set_exception, exc)

        self._submit(add)
        seq_id = await added
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
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
