"""Tensor-parallel plumbing: process group setup, the two collectives the model needs, worker loop.

Rank 0 runs the engine; other ranks run `worker_loop`, receiving each step's batch metadata by
broadcast and executing the same forward, so their weights and KV never leave their process.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dim (vocab-parallel logits)."""
    n = world_size()
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_object(obj=None):
    """Rank 0 sends obj, every rank returns it."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank_: int, size: int, port: int, device: str = "cpu") -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    # A rank that dies while loading must not leave the others waiting for half an hour.
    dist.init_process_group(backend, rank=rank_, world_size=size, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=timedelta(seconds=int(os.environ.get("LMDEPOT_TP_TIMEOUT", "120"))))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def worker_main(rank_: int, size: int, port: int, source: str, engine_cfg, errors=None) -> None:
    """Entry point of ranks 1..N-1 (spawned processes). Load errors go back to rank 0 through `errors`."""
    from lmdepot.errors import LmdepotError
    from lmdepot.runtime.runner import ModelRunner

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    init(rank_, size, port, engine_cfg.device)
    try:
        engine_cfg.quiet = True
        try:
            runner = ModelRunner(source, engine_cfg, rank_)
        except LmdepotError as exc:
            if errors is not None:
                errors.put(f"rank {rank_}: {exc}")
            raise SystemExit(2) from None
        except BaseException as exc:
            if errors is not None:
                errors.put(f"rank {rank_} failed to load: {type(exc).__name__}: {exc}")
            raise
        while True:
            meta = broadcast_object()
            if meta is None:
                break
            runner.execute(meta)
    finally:
        shutdown()
