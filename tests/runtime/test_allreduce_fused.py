"""AllReduce.add_rms_norm's choices (runtime/allreduce.py) with the fused kernel replaced by a recorder:
which slot each call gets, and which calls fall back. (The kernel itself: tests/kernels/
test_allreduce_rms_norm.py; on 2 GPUs: test_gpu_allreduce_norm.py.)"""

import pytest
import torch
import torch.distributed as dist

from lmdepot.runtime import allreduce
from lmdepot.runtime.kernels import allreduce_rms_norm


@pytest.fixture
def fused(monkeypatch):
    """An AllReduce whose symmetric-memory setup 'succeeded' for 2 ranks, slot addresses 100 and 200;
    returns (it, the slots its kernel launches got)."""
    launched = []

    def record(x, slot_ptrs, pad_ptrs, rank, residual, weight, eps):
        launched.append(int(slot_ptrs[0]))
        return "y", "h"

    monkeypatch.setattr(allreduce_rms_norm, "all_reduce_rms_norm", record)
    monkeypatch.setenv("LMDEPOT_ALLREDUCE_FUSED_BYTES", str(16 * 64 * 4))
    ar = allreduce.AllReduce()
    ar.tried = True
    ar.fused_buffer = torch.empty(1)
    ar.slot_ptrs = [torch.tensor([100, 101]), torch.tensor([200, 201])]
    ar.pad_ptrs = torch.tensor([7, 8])
    ar.pad_cells = 64
    return ar, launched


def call(ar, rows=4, H=64, dtype=torch.float32, contiguous=True):
    x = torch.zeros(rows, H, dtype=dtype) if contiguous else torch.zeros(H, rows, dtype=dtype).t()
    return ar.add_rms_norm(x, torch.zeros(rows, H, dtype=torch.float16), torch.ones(H, dtype=torch.float16), 1e-5)


def test_consecutive_calls_alternate_slots_and_a_collective_restarts_at_the_first(fused):
    ar, launched = fused
    assert [call(ar) for _ in range(3)] == [("y", "h")] * 3
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        ar(torch.ones(3))   # any full collective (NCCL here: no one-shot buffer)
    finally:
        dist.destroy_process_group()
    call(ar)
    call(ar)
    assert launched == [100, 200, 100, 100, 200]


@pytest.mark.parametrize("case", [dict(rows=17),                  # 17 x 64 float32 > the 4 KiB slot
                                  dict(rows=33, H=2),             # 33 rows x 2 ranks > 64 flag cells
                                  dict(dtype=torch.bfloat16),     # partials are float32
                                  dict(contiguous=False)])
def test_what_does_not_fit_falls_back_without_using_a_slot(fused, case):
    ar, launched = fused
    assert call(ar, **case) is None
    assert launched == [] and ar.next_slot == 0


def test_no_fused_setup_falls_back(fused):
    ar, launched = fused
    ar.fused_buffer = None
    assert call(ar) is None and launched == []


# --- two real processes, the interpreter's kernel on a shared mapping -------------------------------
def test_two_processes_on_a_shared_mapping_sum_and_leave_the_flags_clear(tmp_path):
    """Symmetric memory stand-in: one file mapped by both ranks (each sees every rank's slots and
    signal pad at its own addresses). The ranks run the real kernel (interpreted) through
    AllReduce.add_rms_norm, out of step, with a gloo collective in between."""
    import os
    import subprocess
    import sys

    from lmdepot.runtime.tp import free_port

    path = tmp_path / "symm"
    path.write_bytes(bytes(2 * PER_RANK))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(path), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        results = [(p.wait(timeout=120), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rc, out in results:
        assert rc == 0 and "ok" in out, out[-3000:]


SLOT_BYTES, CELLS = 16 * 200 * 4, 64
PER_RANK = 2 * SLOT_BYTES + CELLS * 4   # slot 0, slot 1, signal pad


def _rank_main(rank: int, path: str, port: str) -> None:
    import time

    from lmdepot.runtime.kernels import rms_norm

    world = 2
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    region = torch.from_file(path, shared=True, size=world * PER_RANK, dtype=torch.uint8)
    base = region.data_ptr()
    ar = allreduce.AllReduce()
    ar.mode = "fused"
    ar.tried, ar.fused_buffer, ar.rank, ar.slot_bytes, ar.pad_cells = True, region, rank, SLOT_BYTES, CELLS
    ar.slot_ptrs = [torch.tensor([base + r * PER_RANK + s * SLOT_BYTES for r in range(world)]) for s in range(2)]
    ar.pad_ptrs = torch.tensor([base + r * PER_RANK + 2 * SLOT_BYTES for r in range(world)])
    cases = [(1, 96, torch.float16), (3, 200, torch.float16), (16, 200, torch.float32), (2, 96, torch.float32),
             (5, 200, torch.float16), (1, 96, torch.float32)]
    for i, (B, H, dtype) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)   # the same on both ranks
        parts = [torch.randn(B, H, generator=gen) * 2 for _ in range(world)]
        res, w = torch.randn(B, H, generator=gen).to(dtype), torch.randn(H, generator=gen).to(dtype)
        if i % world == rank:
            time.sleep(0.3)   # this rank late: the other waits on its flags
        if i == 3:
            ar(torch.ones(4))   # a collective in between (gloo)
        got = ar.add_rms_norm(parts[rank].clone(), res, w, 1e-5)
        want = rms_norm.rms_norm(parts[0] + parts[1], res, w, 1e-5)
        assert got is not None and all(torch.equal(a, b) for a, b in zip(got, want)), i
    dist.barrier()
    pads = [region[r * PER_RANK + 2 * SLOT_BYTES:(r + 1) * PER_RANK].view(torch.int32) for r in range(world)]
    assert not any(p.any() for p in pads)   # every flag sent has been consumed: all pads zero again
    dist.destroy_process_group()
    print("ok", flush=True)


if __name__ == "__main__":
    import sys

    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
