"""The engine loop on rank 0: requests in, one scheduled forward per step, tokens out."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from dataclasses import dataclass, replace
from pathlib import Path

from lmdepot.errors import LmdepotError
from lmdepot.formats import layout
from lmdepot.runtime import tp
from lmdepot.runtime.block_manager import BlockManager
from lmdepot.runtime.config import EngineConfig
from lmdepot.runtime.errors import CacheFullError, RequestError, RuntimeLoadError
from lmdepot.runtime.loader import read_config, resolve_workspace
from lmdepot.runtime.runner import ModelRunner
from lmdepot.runtime.sampler import HostCopy, device_only, sample, sample_on_device
from lmdepot.runtime.scheduler import Scheduler
from lmdepot.runtime.sequence import SamplingParams, Sequence, Status


@dataclass
class StepOutput:
    seq_id: int
    token_id: int | None
    text: str                   # newly final text since the previous output of this sequence
    finished: bool
    finish_reason: str | None = None
    logprob: dict | None = None


class InFlight:
    """A decode step launched on the device whose sampled tokens the host has not read yet."""

    __slots__ = ("seqs", "tokens", "copy")

    def __init__(self, seqs: list[Sequence], tokens):
        self.seqs, self.tokens = seqs, tokens   # tokens: (n,) on the device, the next step's input ids
        self.copy = HostCopy(tokens)            # queued now, waited for after the next step is launched


def load_tokenizer(workspace: Path):
    from transformers import AutoTokenizer

    tok_dir = Path(workspace) / layout.TOKENIZER_DIR
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as exc:  # transformers raises many types for a broken tokenizer dir
        raise RuntimeLoadError(f"{tok_dir}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None


def text_decoder(tokenizer):
    """ids -> tokenizer.decode(ids, skip_special_tokens=True). For a fast tokenizer whose decode adds
    nothing to its Rust backend's (no clean-up of spaces, no subclass override), the backend is called
    directly: HF's python wrapper costs several times the decode of the few ids a step decodes, and
    the engine decodes twice per sequence per step."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedTokenizerFast = None
    backend = getattr(tokenizer, "_tokenizer", None)
    cls = type(tokenizer)
    if (PreTrainedTokenizerFast is not None and isinstance(tokenizer, PreTrainedTokenizerFast)
            and cls.decode is PreTrainedTokenizerFast.decode and cls._decode is PreTrainedTokenizerFast._decode
            and not getattr(tokenizer, "clean_up_tokenization_spaces", True) and hasattr(backend, "decode")):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _eos_ids(workspace: Path, end_id: int) -> set[int]:
    ids = {end_id}
    gen = Path(workspace) / layout.TOKENIZER_DIR / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


class Engine:
    def __init__(self, source, ecfg: EngineConfig | None = None):
        self.ecfg = ecfg = replace(ecfg or EngineConfig())
        self.workers, self.runner, self._group = [], None, False
        launch = tp.launched()
        if launch is not None:  # torchrun-style: ranks != 0 serve as workers inside this call, then exit
            workspace = tp.join_launched_and_pull(str(source), launch, ecfg)
            self._group = True
        else:
            workspace = resolve_workspace(source, 0)   # rank 0's files only; workers resolve their own rank
            # Checked before spawning anything: a wrong --tp must fail fast, in one line.
            ecfg.tp = read_config(workspace, ecfg.tp).tensor_para_size
            if ecfg.tp > 1:
                self._spawn_workers(str(source))
        try:
            self.runner = ModelRunner(workspace, ecfg, 0)
        except BaseException as exc:
            failed = self._stop_workers(error=True)
            if failed and not isinstance(exc, LmdepotError):
                raise RuntimeLoadError(failed) from None
            if launch is not None and not isinstance(exc, (LmdepotError, KeyboardInterrupt)):
                raise RuntimeLoadError(f"rank 0: lost the other ranks while loading ({type(exc).__name__}:"
                                       f" {str(exc).strip().splitlines()[0] if str(exc).strip() else ''});"
                                       " their own logs name the cause") from None
            raise
        try:
            cfg = self.cfg = self.runner.cfg
            self.tokenizer = load_tokenizer(self.runner.workspace)
            self._detok = text_decoder(self.tokenizer)
            self._token_text: dict[int, str] = {}   # one id's decode (at most the vocabulary's size)
            self.session_len = ecfg.session_len or cfg.session_len
            self.eos_ids = _eos_ids(self.runner.workspace, cfg.end_id)
            self.bm = BlockManager(self.runner.num_blocks, self.runner.block_size, ecfg.enable_prefix_caching)
            self.scheduler = Scheduler(self.bm, ecfg.max_batch_size or cfg.max_batch_size,
                                       ecfg.max_num_batched_tokens)
        except BaseException:
            self.close()  # workers would otherwise wait for a step that never comes
            raise
        self.seqs: dict[int, Sequence] = {}
        self._inflight: InFlight | None = None   # asynchronous decode steps (docs/runtime.md)
        self.steps_ahead = 0                        # decode steps launched before the previous one's readback

    # --- tensor-parallel workers ----------------------------------------------------------------
    def _spawn_workers(self, source: str) -> None:
        port = tp.free_port()
        mp = multiprocessing.get_context("spawn")
        self._errors = mp.SimpleQueue()
        for r in range(1, self.ecfg.tp):
            p = mp.Process(target=tp.worker_main, args=(r, self.ecfg.tp, port, source, self.ecfg, self._errors),
                           daemon=True)
            p.start()
            self.workers.append(p)
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.ecfg.tp))
        tp.init(0, self.ecfg.tp, port, self.ecfg.device)
        self._group = True

    def _stop_workers(self, error: bool = False) -> str | None:
        """Join the workers; with error=True, return the first failed rank's message, if any."""
        for p in self.workers:
            p.join(timeout=5 if error else 30)
            if p.is_alive():
                p.terminate()
        message = None
        if self.workers and not self._errors.empty():
            message = self._errors.get()
        self.workers, self._group = [], False
        tp.shutdown()
        return message

    def close(self) -> None:
        if getattr(self, "runner", None) is not None:
            self.runner.close()
            self.runner = None
        if self.workers or self._group:
            self._stop_workers()

    # --- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, session_id=None) -> Sequence:
        params = params or SamplingParams()
        if not prompt_ids and session_id is None:
            raise RequestError("empty prompt")
        history = self.scheduler.open_session(session_id) if session_id is not None else None
        tokens = (history.token_ids if history else []) + list(prompt_ids)
        try:
            if len(tokens) >= self.session_len:
                what = "prompt" if not history or not history.token_ids else "conversation (history + new turn)"
                raise RequestError(f"{what} of {len(tokens)} tokens does not fit session_len = {self.session_len}"
                                   " (it must leave room for at least one new token); shorten it or raise"
                                   " --session-len")
            if self.bm.blocks_for(len(tokens) + 1) > self.bm.num_blocks:
                raise RequestError(f"prompt of {len(tokens)} tokens exceeds the KV cache"
                                   f" ({self.bm.num_blocks * self.bm.block_size} tokens)")
        except RequestError:
            if history is not None:
                self.scheduler.active_sessions.discard(session_id)
                self.scheduler.sessions[session_id] = history
            raise
        seq = Sequence(tokens, params, session_id, num_history=len(history.token_ids) if history else 0,
                       device=self.runner.device)
        if history is not None:
            seq.block_table, seq.num_computed = history.block_table, history.num_computed
        self.seqs[seq.id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None and not seq.finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def end_session(self, session_id) -> None:
        self.scheduler.end_session(session_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step ----------------------------------------------------------------------------------
    def _metadata(self, batch: list[tuple[Sequence, int]]) -> tuple[dict, list[Sequence]]:
        bs = self.bm.block_size
        tokens, positions, slots, seqs, rows = [], [], [], [], []
        meta = {"tokens": tokens, "positions": positions, "slots": slots, "seqs": seqs, "logit_rows": rows}
        sampled = []
        for seq, n in batch:
            start, table, ids = seq.num_computed, seq.block_table, seq.token_ids
            ctx = start + n
            if n == 1:   # a decode: one token, no lists built for it
                tokens.append(ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                tokens += ids[start:ctx]
                positions += range(start, ctx)
                slots += [table[p // bs] * bs + p % bs for p in range(start, ctx)]
            seqs.append((n, ctx, table[:-(-ctx // bs)]))
            if ctx == len(ids):  # prefill (or decode) complete: its last row predicts the next token
                rows.append(len(tokens) - 1)
                sampled.append(seq)
        return meta, sampled

    def step(self) -> list[StepOutput]:
        if self._inflight is not None:
            return self._overlap()
        batch, doomed = self.scheduler.schedule()
        outputs = []
        for seq in doomed:
            seq.finish_reason = "length"  # the whole KV cache cannot hold this sequence any longer
            self.scheduler.finish(seq)
            outputs.append(StepOutput(seq.id, None, "", True, "length"))
        if not batch:
            if not outputs and self.has_unfinished():  # would spin forever; never expected
                raise CacheFullError("the scheduler could not place any waiting request in the KV cache")
            return outputs
        meta, sampled = self._metadata(batch)
        logits = self.runner.run(meta, host=False)   # sampled on the device: one small copy back
        bs, commit = self.bm.block_size, self.bm.commit
        for seq, n in batch:
            seq.num_computed += n
            if seq.num_computed // bs > len(seq.block_hashes):   # a block filled: publish its hash
                commit(seq)
        if sampled and self._overlappable(meta, sampled):
            self._inflight = InFlight(sampled, sample_on_device(logits, sampled))
            return outputs + self._overlap()
        if sampled:
            tokens, logprobs = sample(logits, sampled)
            for seq, tok, lp in zip(sampled, tokens, logprobs):
                outputs.append(self._append(seq, tok, lp))
        return outputs

    # --- asynchronous decode steps -------------------------------------------------------------------
    def _overlappable(self, meta: dict, sampled: list[Sequence]) -> bool:
        """A pure decode step on the static-buffer (CUDA graph) path whose rows sample on the device
        alone: the next step may be launched before its tokens are read back."""
        return (self.ecfg.async_steps and self.runner.can_run_ahead() and len(sampled) == len(meta["tokens"])
                and self.runner.graphs.fits(meta, self.cfg) and all(device_only(s.params) for s in sampled))

    def _overlap(self) -> list[StepOutput]:
        """Launch the step after the in-flight one (when the batch goes on unchanged), then read back
        and process the in-flight step's tokens while the device computes the next."""
        cur, self._inflight = self._inflight, None
        nxt = self._launch_ahead(cur)
        outputs = []
        for seq, tok in zip(cur.seqs, cur.copy.wait()):
            if seq.status is Status.RUNNING:   # finished or aborted meanwhile: its lookahead token is dropped
                outputs.append(self._append(seq, tok, None))
        if nxt is not None:
            bs, alive = self.bm.block_size, False
            for seq in nxt.seqs:
                if seq.status is Status.RUNNING:   # the lookahead step computed its token cur's KV
                    seq.num_computed += 1
                    if seq.num_computed // bs > len(seq.block_hashes):
                        self.bm.commit(seq)   # now that cur's token is in token_ids
                    alive = True
                elif seq.session_id is not None:
                    self._trim_session(seq.session_id)
            self._inflight = nxt if alive else None
        return outputs

    def _launch_ahead(self, cur: InFlight) -> InFlight | None:
        """The next decode step of the same batch, every sequence assumed to go on; its input ids are
        cur's sampled tokens, copied on the device. None (the synchronous path) when the batch will
        change: a request waits, a sequence left, one surely ends with cur's token (max_tokens,
        session_len), blocks are short (preemption is the scheduler's), or the step leaves the graph path."""
        seqs, sch, bm = cur.seqs, self.scheduler, self.bm
        if sch.waiting or len(sch.running) != len(seqs) or any(a is not b for a, b in zip(sch.running, seqs)):
            return None
        need = 0
        for seq in seqs:
            n = seq.num_computed   # == len(token_ids): cur's token goes to index n, the lookahead computes it
            if n + 1 - seq.num_prompt >= seq.params.max_tokens or n + 1 >= self.session_len:
                return None
            need += bm.blocks_needed(seq, 1)
        if need > bm.num_free:
            return None
        bs = bm.block_size
        positions, slots, specs = [], [], []
        for seq in seqs:
            if need:
                bm.grow(seq, 1)   # the block the lookahead's KV goes to, when it crosses a boundary
            pos, table = seq.num_computed, seq.block_table
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            specs.append((1, pos + 1, table[:pos // bs + 1]))
        meta = {"tokens": [0] * len(seqs), "positions": positions, "slots": slots, "seqs": specs,
                "logit_rows": list(range(len(seqs)))}
        if not self.runner.graphs.fits(meta, self.cfg):   # e.g. past a sliding window (grown blocks stay: due anyway)
            return None
        logits = self.runner.run_decode(meta, cur.tokens)
        self.steps_ahead += 1
        return InFlight(list(seqs), sample_on_device(logits, seqs))

    def _trim_session(self, session_id) -> None:
        """A session that ended under a lookahead step keeps the blocks the synchronous path would:
        the lookahead's extra block (its KV is not counted) goes back."""
        s = self.scheduler.sessions.get(session_id)
        if s is not None:
            keep = self.bm.blocks_for(s.num_computed)
            if len(s.block_table) > keep:
                self.bm.release(s.block_table[keep:])
                del s.block_table[keep:]

    def _append(self, seq: Sequence, tok: int, lp: dict | None) -> StepOutput:
        ids = seq.token_ids
        ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        p = seq.params
        reason = None
        stop_tok = tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids)
        if stop_tok:
            reason = "stop"
        elif len(ids) - seq.num_prompt >= p.max_tokens or len(ids) >= self.session_len:
            reason = "length"
        text = self._decode(seq, drop_last=stop_tok)
        hold = 0
        if p.stop:
            for s in p.stop:
                idx = text.find(s, max(0, seq.text_offset - len(s) + 1))
                if idx >= 0:
                    text, reason = text[:idx], "stop"
                    break
            if reason is None:  # keep back a tail that may still grow into a stop string
                hold = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if reason is None and text.endswith("\ufffd"):
            hold = max(hold, 1)  # an incomplete UTF-8 character: wait for its next bytes
        final = text[:len(text) - hold] if hold and not reason else text
        offset = seq.text_offset
        delta = final[offset:] if len(final) > offset else ""
        if len(final) > offset:
            seq.text_offset = len(final)
        seq.text = final
        if reason:
            seq.finish_reason = reason
            self.scheduler.finish(seq)
            self.seqs.pop(seq.id, None)
        return StepOutput(seq.id, tok, delta, reason is not None, reason, lp)

    def _decode(self, seq: Sequence, drop_last: bool) -> str:
        """The text of the output ids so far, decoding only the last few tokens each step (the cost of
        a full decode grows with the output and, at hundreds of sequences a step, rivals the GPU's).

        Text is settled up to `read` ids; a step decodes from `prefix` (a few ids back, so that a
        tokenizer that treats a leading space or a merge by context sees the same context as a full
        decode) and keeps what is new. Text ending in an incomplete UTF-8 character is not settled.
        Ids are sliced out of token_ids by offset: no copy of the whole output per step."""
        ids, base = seq.token_ids, seq.num_prompt
        end = len(ids) - 1 if drop_last else len(ids)
        prefix, read, settled = seq.detok
        decode = self._detok
        if read - prefix == 1:   # the usual window: one settled id, whose text is a pure function of it
            tok = ids[base + prefix]
            before = self._token_text.get(tok)
            if before is None:
                before = self._token_text[tok] = decode([tok])
        else:
            before = decode(ids[base + prefix:base + read]) if read > prefix else ""
        now = decode(ids[base + prefix:end])
        if base + read > end or not now.startswith(before):   # settled past ids, or context changed it: redo
            settled, now, before = "", decode(ids[base:end]), ""
            prefix = read = 0
        new = now[len(before):]
        text = settled + new if new else settled
        if new and not new.endswith("\ufffd"):
            seq.detok = [read, end - base, text]
        return text
