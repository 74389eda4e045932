"""The tensor-parallel all-reduce fused into the next residual add + RMSNorm: one kernel per call.

Each rank holds a float32 partial (B, H) of a row-parallel linear. Program `row` of every rank:
1. copies its row of the partial into its own slot of a symmetric-memory buffer (mapped by every
   peer), and tells every peer so (a flag in the peer's signal pad, written with release semantics
   at system scope: the copy is visible to the peer before the flag is);
2. waits until every peer has said the same (acquire at system scope);
3. reads the peers' rows straight from their slots over NVLink (peer-to-peer loads, no multicast) and
   sums all ranks in rank order 0, 1, ..., in float32: every rank gets bit-identical sums;
4. finishes like kernels/rms_norm.py does for a float32 x: rounds the sum to the residual's dtype,
   adds the residual (one rounding), writes the new residual and the normed output.

Flags: cell `row * WORLD + src` of rank d's pad says "src's row is in its slot for d's next call".
The sender swaps it 0 -> 1 (spinning while it is still 1: d has not yet consumed the previous call's
flag), the receiver swaps it 1 -> 0. A pad is therefore all zero between calls and nothing is reset
from the host, which keeps the kernel valid under CUDA-graph replay.

Slot reuse (why a peer cannot overwrite what we still read) is the caller's part: consecutive calls
alternate between two slots, see AllReduce.add_rms_norm in runtime/allreduce.py.

A pushed variant (each rank storing its rows into its peers' slots, call counters as flags) was
faster in isolation (5.0 vs 6.1 us a call on 2 x H200), saved no step time, and failed its 2-GPU test
(session 11): it is gone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def reference(partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(sum + residual) * weight, sum + residual), the float32 sum taken in rank order: what
    every rank's kernel returns."""
    from lmdepot.runtime.kernels import rms_norm

    total = partials[0].float()
    for p in partials[1:]:
        total = total + p.float()
    return rms_norm.reference(total.to(residual.dtype), residual, weight, eps)   # the sum rounded once


@triton.jit
def _kernel(x_ptr, slot_ptrs, pad_ptrs, r_ptr, w_ptr, y_ptr, h_ptr, H, eps,
            RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    mine = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0)
    # slots start 16-byte aligned (AllReduce._setup_fused): the same vector loads as for x
    own_slot = tl.multiple_of(tl.load(slot_ptrs + RANK).to(tl.pointer_type(tl.float32)), 16)
    tl.store(own_slot + row * H + offs, mine, mask=mask)
    # every thread's part of the row is stored before the flag goes out (the release below is issued
    # by one thread and covers what the block did before this barrier)
    tl.debug_barrier()
    own_pad = tl.load(pad_ptrs + RANK).to(tl.pointer_type(tl.int32)) + row * WORLD
    for src in tl.static_range(WORLD):
        if src != RANK:
            flag = tl.load(pad_ptrs + src).to(tl.pointer_type(tl.int32)) + row * WORLD + RANK
            while tl.atomic_cas(flag, 0, 1, sem="release", scope="sys") != 0:
                pass
    for src in tl.static_range(WORLD):
        if src != RANK:
            while tl.atomic_cas(own_pad + src, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()   # no thread reads a peer's row before the flags were seen
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):   # fixed order: the same float32 sum on every rank
        if src == RANK:
            part = mine
        else:
            peer = tl.multiple_of(tl.load(slot_ptrs + src).to(tl.pointer_type(tl.float32)), 16)
            part = tl.load(peer + row * H + offs, mask=mask, other=0.0, volatile=True)
        if src == 0:
            acc = part
        else:
            acc = acc + part
    # from here on as kernels/rms_norm.py with a float32 x and a residual
    dt = r_ptr.dtype.element_ty
    r = tl.load(r_ptr + row * H + offs, mask=mask, other=0.0)
    h = (acc.to(dt).to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(h_ptr + row * H + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
    normed = (hf * inv).to(dt)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(dt)
    tl.store(y_ptr + row * H + offs, w * normed, mask=mask)


def all_reduce_rms_norm(x: torch.Tensor, slot_ptrs: torch.Tensor, pad_ptrs: torch.Tensor, rank: int,
                        residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """Returns (norm(sum + residual) * weight, sum + residual) for this rank's float32 partial x (B, H),
    contiguous. slot_ptrs: int64 (world,) addresses of every rank's slot (float32, at least B * H);
    pad_ptrs: int64 (world,) addresses of every rank's signal pad (int32, at least B * world cells, all
    zero between calls). Every rank must call it with the same shapes at the same point."""
    B, H = x.shape
    world = slot_ptrs.numel()
    y = out if out is not None else torch.empty_like(residual)
    h = residual_out if residual_out is not None else torch.empty_like(residual)
    _kernel[(B,)](x, slot_ptrs, pad_ptrs, residual, weight, y, h, H, eps,
                  RANK=rank, WORLD=world, BLOCK=triton.next_power_of_2(H))
    return y, h
