"""The tensor-parallel sum of the model's row-parallel outputs, on the fastest path the machine has.

A decode step of a 7B model all-reduces 64 small tensors (batch x hidden, a few KiB to 2 MiB).
NCCL's ring needs several round trips per call, a fixed cost of about 10 us each on NVLink, which at
batch 1 is a sizeable share of a ~2 ms step. A one-shot all-reduce over symmetric memory (every rank
maps every other rank's buffer and reads the peers' halves directly, PyTorch's
`symm_mem.one_shot_all_reduce_copy_out`) needs one barrier instead. It uses peer-to-peer loads, not
NVLink multicast, which stays off.

Most of those sums are followed by the next residual add + RMSNorm; `add_rms_norm` does both in one
kernel (kernels/allreduce_rms_norm.py: copy the partial into a symmetric slot, flag the peers, wait
for theirs, sum, add, norm), which saves the all-reduce kernel's launch and its separate barrier.

LMDEPOT_ALLREDUCE picks the path:
- `auto` (default): one-shot for tensors up to LMDEPOT_ALLREDUCE_MAX_BYTES, NCCL above; NCCL
  everywhere when symmetric memory cannot be set up;
- `fused`: the fused all-reduce + norm where it applies (CUDA, partials up to
  LMDEPOT_ALLREDUCE_FUSED_BYTES), else as auto; a failed symmetric-memory setup is an error. Opt-in
  until it is measured inside the engine: on 2 x H200 the kernel passed its GPU test and took 6.1 us
  per call against 8.8 us for one-shot + norm (docs/benchmarks.md), but no engine ran it on GPUs yet;
- `symm`: no fused norm (one-shot + the separate norm kernel), a failed setup is an error;
- `nccl`: always NCCL.
Another value is taken as `auto`, with a note.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist


_ONE_SHOT_DTYPES = (torch.float32, torch.bfloat16)
_MODES = ("auto", "fused", "symm", "nccl")
_MAX_FUSED_ROWS = 128   # one program per row, all resident at once: a waiting program never blocks a peer's


def _env_bytes(name: str, default: int) -> int:
    size = os.environ.get(name, "")
    return int(size) if size.isdigit() else default


class AllReduce:
    """Sum over the default process group, in place. The symmetric buffers are set up on the first
    CUDA call, which every rank makes at the same point of the same forward (a warm-up step, before
    any CUDA graph capture)."""

    def __init__(self):
        self.mode = os.environ.get("LMDEPOT_ALLREDUCE", "auto")
        if self.mode not in _MODES:
            print(f"[lmdepot] note: LMDEPOT_ALLREDUCE={self.mode!r} is not {', '.join(_MODES)}; using auto",
                  file=sys.stderr)
            self.mode = "auto"
        self.max_bytes = _env_bytes("LMDEPOT_ALLREDUCE_MAX_BYTES", 64 << 10)
        # a multiple of 256: the second slot starts as aligned as the first (the kernel's vector loads)
        self.slot_bytes = -(-_env_bytes("LMDEPOT_ALLREDUCE_FUSED_BYTES", 1 << 20) // 256) * 256
        self.buffer: torch.Tensor | None = None
        self.group_name: str | None = None
        self.tried = False
        # fused all-reduce + norm (set up with the rest when the mode allows it)
        self.fused_buffer: torch.Tensor | None = None
        self.slot_ptrs: list[torch.Tensor] = []   # per slot: int64 (world,) addresses of every rank's slot
        self.pad_ptrs: torch.Tensor | None = None  # int64 (world,) addresses of every rank's signal pad
        self.pad_cells = 0
        self.rank = 0
        self.next_slot = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.mode != "nccl" and not self.tried:
            self._setup(x.device)
        self.next_slot = 0   # a full collective separates the fused calls before it from those after
        nbytes = x.numel() * x.element_size()
        # PyTorch's one-shot kernel takes float32 and bfloat16 (not float16: NCCL sums those)
        if self.buffer is not None and nbytes <= self.max_bytes and x.is_contiguous() and x.dtype in _ONE_SHOT_DTYPES:
            flat = x.view(-1)
            # a prefix of the buffer seen as bytes, then as x's dtype: its storage offset stays 0
            staged = self.buffer[:nbytes].view(x.dtype)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, flat, "sum", self.group_name, flat)
            return x
        dist.all_reduce(x)
        return x

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """(norm(sum + residual) * weight, sum + residual) for this rank's float32 partial x (B, H) in one
        kernel, or None where the fused kernel does not apply (the caller sums and norms separately).
        Whether it applies depends only on what every rank has alike (setup outcome, shapes, dtypes),
        so all ranks take the same path."""
        if x.is_cuda and self.mode != "nccl" and not self.tried:
            self._setup(x.device)
        if self.fused_buffer is None or x.dim() != 2 or x.dtype != torch.float32:
            return None
        rows, world = x.shape[0], len(self.pad_ptrs)
        if not (0 < rows <= _MAX_FUSED_ROWS and x.numel() * 4 <= self.slot_bytes and rows * world <= self.pad_cells):
            return None
        if not (x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape):
            return None
        from lmdepot.runtime.kernels.allreduce_rms_norm import all_reduce_rms_norm

        # Why a peer never overwrites a slot we still read: consecutive fused calls alternate between
        # two slots, and a peer's call k+2 (same slot as call k) only starts after its call k+1, which
        # cannot finish before this rank has flagged call k+1, which it does only after its call k
        # (same stream) finished reading. A full collective (__call__) cannot finish on any rank before
        # every rank finished what it queued before it, so the alternation may restart at slot 0 after
        # one. Every forward begins with one (the embedding sum) and the fused calls within a forward
        # run in the order Python issued them (a CUDA graph replays its captured sequence), so eager
        # steps and graph replays of any bucket can follow each other in any order.
        slot = self.next_slot
        self.next_slot ^= 1
        return all_reduce_rms_norm(x, self.slot_ptrs[slot], self.pad_ptrs, self.rank, residual, weight, eps)

    def _setup(self, device: torch.device) -> None:
        self.tried = True
        try:
            import torch.distributed._symmetric_memory as symm

            group = dist.group.WORLD
            self.group_name = group.group_name
            if hasattr(symm, "enable_symm_mem_for_group"):   # needed before torch 2.10, deprecated since
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    symm.enable_symm_mem_for_group(self.group_name)
            buffer = symm.empty(self.max_bytes, dtype=torch.uint8, device=device)
            symm.rendezvous(buffer, group)
            self.buffer = buffer
            if self.mode == "fused":   # a failure is an error (below)
                self._setup_fused(symm, group, device)
        except Exception as exc:  # noqa: BLE001 - any failure leaves NCCL in charge
            self.buffer = self.fused_buffer = None
            if self.mode in ("symm", "fused"):
                raise RuntimeError(f"symmetric-memory all-reduce unavailable: {exc}") from exc
            _note("one-shot all-reduce unavailable", exc, "using NCCL")
        # every rank takes the same path, or a sum would wait forever for a peer on the other one
        ok = torch.tensor([int(self.buffer is not None) + int(self.fused_buffer is not None)], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        level = int(ok.item())
        if level < 1:
            self.buffer = None
        if level < 2:
            self.fused_buffer = None

    def _setup_fused(self, symm, group, device: torch.device) -> None:
        """Two slots of slot_bytes in one symmetric buffer, and its signal pad, zeroed here; the
        agreement all-reduce that follows in _setup keeps every peer from flagging it before."""
        buffer = symm.empty(2 * self.slot_bytes, dtype=torch.uint8, device=device)
        hdl = symm.rendezvous(buffer, group)
        world, self.rank = hdl.world_size, hdl.rank
        bases = [hdl.get_remote_tensor(r, (2 * self.slot_bytes,), torch.uint8).data_ptr() for r in range(world)]
        self.slot_ptrs = [torch.tensor([b + s * self.slot_bytes for b in bases], dtype=torch.int64, device=device)
                          for s in range(2)]
        self.pad_cells = symm.get_signal_pad_size() // 4
        pads = [hdl.get_signal_pad(r, [self.pad_cells], dtype=torch.int32) for r in range(world)]
        pads[self.rank].zero_()
        self.pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=device)
        self.fused_buffer = buffer


def _note(what: str, exc: Exception, fallback: str) -> None:
    first = str(exc).splitlines()[0] if str(exc) else ""
    print(f"[lmdepot] note (rank {dist.get_rank()}): {what} ({type(exc).__name__}: {first}); {fallback}",
          file=sys.stderr)
