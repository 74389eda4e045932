"""Scratch buffers of kernels. Tests set POISON so that any element a kernel forgets to write is NaN
(or an integer type's minimum)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

POISON = False


def scratch(shape, device, dtype) -> torch.Tensor:
    if POISON:   # NaN, or the most negative value for integer buffers
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def k_split(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K elements per split, a whole number of BLOCK_K tiles; the actual number of splits) for the
    kernels whose K splits meet in the kernel (w4a16, w8a8, gemv). The last split may be shorter
    (ragged) when the tiles do not divide evenly."""
    tiles_k = -(-K // block_k)
    per_split = -(-tiles_k // max(1, min(split_k, tiles_k))) * block_k
    return per_split, -(-K // per_split)


@triton.jit
def split_sum(acc, part, pid_k, M, N, mask, lock, SPLITS: tl.constexpr):
    """K splits of one output tile meeting in the kernel (gemv, w8a8, w4a16_gemm): store this split's
    partial `acc` at `part` (the tile's pointers into split 0 of a (SPLITS, M, N) buffer), count it in
    on the tile's semaphore `lock`, and return (whether this split came last, then the partials' sum in
    split order: the same sums whichever split comes last). The last one stores the result and then
    resets `lock` to zero (for the next launch and CUDA graph replays)."""
    tl.store(part + pid_k * M * N, acc, mask=mask)
    tl.debug_barrier()   # every thread's partial is written before the tile is counted in
    last = tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1
    total = tl.zeros_like(acc)
    if last:
        for split in range(SPLITS):   # .cg: read past L1, other SMs wrote them
            total += tl.load(part + split * M * N, mask=mask, other=0, cache_modifier=".cg")
    return last, total


_SEMAPHORES: dict[torch.device, torch.Tensor] = {}


def semaphores(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters for kernels whose K splits meet in the kernel (w4a16, w8a8, gemv): each launch
    leaves them at zero, so one array serves every launch on the device. Grown, never shrunk, and
    allocated before any CUDA graph capture by the warm-up run."""
    device = torch.device(device)
    sems = _SEMAPHORES.get(device)
    if sems is None or sems.numel() < n:
        # 64 Ki counters (256 KiB) from the start: a grown array is a new address, which a CUDA graph
        # captured before the growth would not see
        sems = _SEMAPHORES[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return sems
