"""Scratch buffers of kernels. Tests set POISON so that any element a kernel forgets to write is NaN."""

from __future__ import annotations

import torch

POISON = False


def scratch(shape, device, dtype) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
