"""The fused all-reduce + residual add + RMSNorm kernel in one process: the peers' symmetric slots are
ordinary tensors and their flags are pre-set in this rank's signal pad, as if they had signalled.
(The real two-GPU run is tests/runtime/test_gpu_allreduce_norm.py.)"""

import pytest
import torch

from lmdepot.runtime.kernels import allreduce_rms_norm as arn
from lmdepot.runtime.kernels import rms_norm as rn
from tests.kernels.conftest import DEVICE, DTYPES, poisoned


def peers(partials, rank, rows_cap):
    """Slots holding every peer's partial (this rank's poisoned: the kernel copies it there) and signal
    pads (int32, rows_cap x world cells) in which every peer has flagged this rank's rows."""
    world = len(partials)
    B, H = partials[0].shape
    slots = [p.clone() if r != rank else poisoned((B, H), torch.float32) for r, p in enumerate(partials)]
    pads = [torch.zeros(rows_cap, world, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    for src in range(world):
        if src != rank:
            pads[rank][:B, src] = 1
    as_ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=DEVICE)  # noqa: E731
    return slots, pads, as_ptrs(slots), as_ptrs(pads)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32] + [torch.float32])
@pytest.mark.parametrize("world, rank", [(2, 0), (2, 1), (4, 2)])
@pytest.mark.parametrize("B, H", [(1, 96), (3, 200), (16, 96)])
def test_fused_equals_a_rank_order_sum_then_add_rms_norm(dtype, world, rank, B, H):
    gen = torch.Generator().manual_seed(B * 1000 + H + world * 10 + rank)
    partials = [(torch.randn(B, H, generator=gen) * 2).to(DEVICE) for _ in range(world)]
    residual = torch.randn(B, H, generator=gen).to(DEVICE, dtype)
    w = torch.randn(H, generator=gen).to(DEVICE, dtype)
    rows_cap = B + 2   # cells past this call's rows must stay untouched
    slots, pads, slot_ptrs, pad_ptrs = peers(partials, rank, rows_cap)

    y, h = arn.all_reduce_rms_norm(partials[rank], slot_ptrs, pad_ptrs, rank, residual, w, 1e-5,
                                   out=poisoned((B, H), dtype), residual_out=poisoned((B, H), dtype))

    ref_y, ref_h = arn.reference(partials, residual, w, 1e-5)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, ref_y, rtol=tol, atol=tol)
    # bit-identical to today's path: the float32 sum (in rank order) through the add_rms_norm kernel
    total = partials[0].clone()
    for p in partials[1:]:
        total += p
    y2, h2 = rn.rms_norm(total, residual, w, 1e-5)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    assert torch.equal(slots[rank], partials[rank])   # this rank's partial is in its slot for the peers
    # the flags the peers set here are consumed (all zero for the next call) and this rank's flag is
    # set, once per row, in every peer's pad, for the peer's call to consume
    assert not pads[rank].any()
    for r in range(world):
        if r != rank:
            expected = torch.zeros(rows_cap, world, dtype=torch.int32, device=DEVICE)
            expected[:B, rank] = 1
            assert torch.equal(pads[r], expected), r


def test_ranks_are_summed_in_rank_order_in_float32():
    """1e8 + 1 rounds back to 1e8 in float32: the order 0, 1, 2, 3 gives ((1e8 + 1) - 1e8) + 1 = 1 on
    every rank, where e.g. starting with this rank's partial gives 2 on rank 2 and 0 on rank 3."""
    H, world = 96, 4
    values = [1e8, 1.0, -1e8, 1.0]
    partials = [torch.full((1, H), v, device=DEVICE) for v in values]
    for rank in range(world):
        slots, pads, slot_ptrs, pad_ptrs = peers(partials, rank, 1)   # kept alive: read by the kernel
        residual = torch.zeros(1, H, device=DEVICE)
        w = torch.ones(H, device=DEVICE)
        _, h = arn.all_reduce_rms_norm(partials[rank], slot_ptrs, pad_ptrs, rank, residual, w, 1e-5)
        assert torch.equal(h, torch.ones(1, H, device=DEVICE)), rank
