"""Continuous batching: which sequences compute how many tokens this step.

Every step, running sequences go first (one token for decodes, a chunk for unfinished prefills),
then waiting ones are admitted while slots, blocks and the step's token budget last. When blocks run
out, idle sessions are evicted (LRU), then the most recently admitted running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from lmdepot.runtime.block_manager import BlockManager
from lmdepot.runtime.errors import RequestError
from lmdepot.runtime.sequence import Sequence, Status


@dataclass
class Session:
    """KV kept between turns of one conversation. Evicting it frees the blocks; tokens remain."""

    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0


class Scheduler:
    def __init__(self, bm: BlockManager, max_batch_size: int, max_num_batched_tokens: int):
        self.bm = bm
        self.max_batch_size = max_batch_size
        self.token_budget = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sessions: OrderedDict = OrderedDict()   # idle sessions, least recently used first
        self.active_sessions: set = set()
        self.num_preemptions = 0
        self.num_session_evictions = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # --- sessions ------------------------------------------------------------------------------
    def open_session(self, session_id) -> Session:
        """Take a session out of the idle pool for a new turn (it cannot be evicted while in use)."""
        if session_id in self.active_sessions:
            raise RequestError(f"session {session_id!r} already has a request in flight")
        self.active_sessions.add(session_id)
        return self.sessions.pop(session_id, None) or Session()

    def park_session(self, seq: Sequence) -> None:
        self.active_sessions.discard(seq.session_id)
        self.sessions[seq.session_id] = Session(seq.token_ids, seq.block_table, seq.num_computed)
        seq.block_table = []

    def end_session(self, session_id) -> bool:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            self.bm.release(s.block_table)
        return s is not None

    def _evict_session(self) -> bool:
        for sid, s in self.sessions.items():
            if s.block_table:
                self.bm.release(s.block_table)
                s.block_table, s.num_computed = [], 0
                self.sessions.move_to_end(sid)
                self.num_session_evictions += 1
                return True
        return False

    # --- scheduling ----------------------------------------------------------------------------
    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """(this step's (sequence, new tokens) pairs, sequences that can never fit and must end)."""
        budget, batch, doomed = self.token_budget, [], []
        bm, bs = self.bm, self.bm.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            need = -(-(seq.num_computed + n) // bs) - len(seq.block_table)
            if need <= 0 or need <= len(bm.free):   # the common case (a decode with room): no eviction
                if need > 0:
                    bm.grow(seq, n)
                batch.append((seq, n))
                budget -= n
                i += 1
                continue
            while self.bm.num_free < self.bm.blocks_needed(seq, n):
                if self._evict_session():
                    continue
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    break  # alone and still no room: the cache cannot hold this sequence
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # preempted itself; self.running shifted under i
            if self.bm.num_free < self.bm.blocks_needed(seq, n):
                self.running.remove(seq)
                doomed.append(seq)
                continue
            self.bm.grow(seq, n)
            batch.append((seq, n))
            budget -= n
            i += 1
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            self.bm.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            while self.bm.num_free < self.bm.blocks_needed(seq, n) and self._evict_session():
                pass
            if self.bm.num_free < self.bm.blocks_needed(seq, n) and not self.running and not batch:
                for other in self.waiting:  # a queued session turn may sit on its history's blocks
                    if other is not seq and other.block_table:
                        self.bm.free_seq(other)
            if self.bm.num_free < self.bm.blocks_needed(seq, n):
                if not self.running and not batch:
                    self.waiting.popleft()
                    self.bm.free_seq(seq)
                    doomed.append(seq)
                    continue
                self.bm.free_seq(seq)  # a waiting sequence must not sit on blocks others need
                break
            self.waiting.popleft()
            self.bm.grow(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch, doomed

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        if seq.session_id is not None:
            self.park_session(seq)
        else:
            self.bm.free_seq(seq)
