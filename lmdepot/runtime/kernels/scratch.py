"""Scratch buffers of kernels. Tests set POISON so that any element a kernel forgets to write is NaN
(or an integer type's minimum)."""

from __future__ import annotations

import torch

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
