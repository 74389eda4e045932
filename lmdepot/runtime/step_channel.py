"""Rank 0's step metadata to the other ranks of one machine through shared memory.

Every engine step, rank 0 tells the other ranks what to run (runner.py). Over the gloo group that is
two TCP collectives plus pickling on both sides: about 1 ms per step on the CPU test machine, as
much as a whole decode step of a 7B model at tp=2 on H200s. Ranks spawned by rank 0 share its
machine, so the message goes through a ring of shared-memory slots instead: rank 0 pickles into a
slot and publishes it by writing the slot's sequence number last; readers spin on that number, copy
the bytes out and acknowledge. A message larger than a slot is marked as such and sent over gloo.

The ordering argument (payload stored before the sequence number is seen) holds on x86-64, whose
stores become visible in program order; other machines keep gloo (`available()`). Set
LMDEPOT_STEP_CHANNEL=gloo to use gloo everywhere.
"""

from __future__ import annotations

import os
import pickle
import platform
import time
from multiprocessing import shared_memory

import numpy as np

SLOTS = 4
SLOT_BYTES = 1 << 20          # a decode step of 256 sequences pickles to a few tens of KiB
_HEAD = 64                    # per slot: int64 sequence number, int64 length (-1: sent over gloo)
BIG = -1


def available() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and os.environ.get("LMDEPOT_STEP_CHANNEL", "shm") != "gloo"


def _wait(ready, alive, what: str, timeout_s: float | None) -> None:
    """Spin while steps come back to back, then back off so that an idle server costs no core."""
    start = time.perf_counter()
    spins = 0
    while not ready():
        spins += 1
        if spins < 20000:
            continue
        waited = time.perf_counter() - start
        if timeout_s is not None and waited > timeout_s:
            raise RuntimeError(f"step channel: no {what} within {timeout_s:g} s")
        if not alive():
            raise RuntimeError(f"step channel: the peer went away while waiting for {what}")
        time.sleep(0 if waited < 0.05 else (1e-4 if waited < 1.0 else 1e-3))


class StepChannel:
    """One writer (rank 0), `readers` readers (ranks 1..N-1), SLOTS messages in flight at most."""

    def __init__(self, shm: shared_memory.SharedMemory, readers: int, reader: int | None):
        self.shm, self.readers, self.reader = shm, readers, reader
        buf = shm.buf
        self.acks = np.ndarray((readers,), dtype=np.int64, buffer=buf, offset=0)   # last seq each reader took
        base = 8 * readers
        base += -base % _HEAD
        self.heads = [np.ndarray((2,), dtype=np.int64, buffer=buf, offset=base + i * (_HEAD + SLOT_BYTES))
                      for i in range(SLOTS)]
        self.payloads = [buf[base + i * (_HEAD + SLOT_BYTES) + _HEAD: base + (i + 1) * (_HEAD + SLOT_BYTES)]
                         for i in range(SLOTS)]
        self.seq = 0
        self.owner_pid = os.getppid() if reader is not None else None

    @classmethod
    def create(cls, readers: int) -> "StepChannel":
        size = 8 * readers + _HEAD + SLOTS * (_HEAD + SLOT_BYTES)
        shm = shared_memory.SharedMemory(create=True, size=size)
        shm.buf[:size] = bytes(size)
        return cls(shm, readers, None)

    @classmethod
    def attach(cls, name: str, readers: int, reader: int) -> "StepChannel":
        # Spawned readers share the writer's resource tracker, so attaching registers the name the
        # writer registered already, and the writer's unlink unregisters it once for both.
        return cls(shared_memory.SharedMemory(name=name), readers, reader)

    @property
    def name(self) -> str:
        return self.shm.name

    def send(self, obj, timeout_s: float) -> bool:
        """Publish obj; False if it is too large for a slot (the caller sends it another way)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        seq = self.seq + 1
        slot = seq % SLOTS
        _wait(lambda: int(self.acks.min()) >= seq - SLOTS, lambda: True, "acknowledgement", timeout_s)
        head = self.heads[slot]
        if len(data) <= SLOT_BYTES:
            self.payloads[slot][:len(data)] = data
            head[1] = len(data)
        else:
            head[1] = BIG
        head[0] = seq   # published: readers see the payload and length before this store
        self.seq = seq
        return head[1] != BIG

    def recv(self) -> tuple[object, bool]:
        """(the next message, False), or (None, True) when it was too large and comes another way."""
        seq = self.seq + 1
        head = self.heads[seq % SLOTS]
        _wait(lambda: int(head[0]) == seq, lambda: os.getppid() == self.owner_pid, "step from rank 0", None)
        n = int(head[1])
        obj = None if n == BIG else pickle.loads(self.payloads[seq % SLOTS][:n])
        self.acks[self.reader] = seq
        self.seq = seq
        return obj, n == BIG

    def close(self, unlink: bool) -> None:
        del self.acks, self.heads, self.payloads   # views of the buffer must go before it closes
        self.shm.close()
        if unlink:
            self.shm.unlink()
