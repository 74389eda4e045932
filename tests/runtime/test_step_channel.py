"""The shared-memory step channel between rank 0 and the ranks it spawned (runtime/step_channel.py)."""

import multiprocessing as mp

import pytest

from lmdepot.runtime import step_channel
from lmdepot.runtime.step_channel import SLOT_BYTES, SLOTS, StepChannel

pytestmark = pytest.mark.skipif(not step_channel.available(), reason="x86-64 only (else gloo carries the steps)")


def _reader(name, readers, reader, n, out):
    ch = StepChannel.attach(name, readers, reader)
    got = [ch.recv() for _ in range(n)]
    ch.close(unlink=False)
    out.put((reader, got))


def test_every_reader_gets_every_message_in_order_through_a_small_ring():
    msgs = [{"step": i, "tokens": list(range(i))} for i in range(3 * SLOTS + 1)]   # the ring wraps around
    msgs.insert(5, {"big": b"x" * (SLOT_BYTES + 1)})   # too large for a slot: marked, sent another way
    ch = StepChannel.create(readers=2)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(ch.name, 2, r, len(msgs), out)) for r in range(2)]
    for p in procs:
        p.start()
    sent = [ch.send(m, timeout_s=60) for m in msgs]
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    ch.close(unlink=True)
    assert sent == [m.get("big") is None for m in msgs]
    want = [(None, True) if "big" in m else (m, False) for m in msgs]
    assert results[0] == want and results[1] == want
