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
