"""Tensor-parallel plumbing: process group setup, the collectives the model needs, worker loop.

Rank 0 runs the engine; other ranks run `worker_loop`, receiving each step's batch metadata by
broadcast and executing the same forward, so their weights and KV never leave their process.

Two ways to start the ranks:
- spawned: rank 0 starts ranks 1..N-1 on this machine (`Engine._spawn_workers`), TCP rendezvous on
  127.0.0.1;
- launched: every rank is started from outside (torchrun, or by hand on each node) with RANK,
  WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK for the GPU) in its environment; the
  group forms through init_method env://, and each rank pulls its own files itself.

Step metadata travels over a gloo group of its own whose timeout is "practically never": a worker
waits there for the next step for as long as the server is idle, while the forward's collectives
keep the short LMDEPOT_TP_TIMEOUT.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

_control = None   # gloo group for step metadata and load status (see the module docstring)


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
    """Rank 0 sends obj, every rank returns it (over the control group: no device sync, no idle timeout)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order (control group)."""
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("LMDEPOT_TP_TIMEOUT", "120")))


# A worker may wait this long for the next step of an idle server (gloo needs a finite value).
IDLE_TIMEOUT = timedelta(days=3650)


def _join(rank_: int, size: int, device: str, init_method: str) -> None:
    global _control
    backend = "nccl" if device.startswith("cuda") else "gloo"
    # A rank that dies while loading must not leave the others waiting for half an hour.
    dist.init_process_group(backend, rank=rank_, world_size=size, init_method=init_method, timeout=timeout())
    _control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def init(rank_: int, size: int, port: int, device: str = "cpu") -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    _join(rank_, size, device, f"tcp://127.0.0.1:{port}")


def shutdown() -> None:
    global _control
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


# --- launched from outside (torchrun-style env://) ---------------------------------------------------
@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master: str


def launched() -> Launch | None:
    """The torchrun-style environment of this process, or None (a plain single-process start).

    WORLD_SIZE unset or 1 means a plain start: then rank 0 spawns its own workers if the workspace
    has tp > 1.
    """
    from lmdepot.runtime.errors import RuntimeLoadError

    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or "1") <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise RuntimeLoadError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but {', '.join(missing)} is not;"
                               " a multi-node launch needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    try:
        r, n = int(env["RANK"]), int(env["WORLD_SIZE"])
        # torchrun sets LOCAL_RANK; by hand, ranks numbered node by node map onto this node's GPUs
        local = int(env["LOCAL_RANK"]) if env.get("LOCAL_RANK") else r % max(torch.cuda.device_count(), 1)
    except ValueError:
        raise RuntimeLoadError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not 0 <= r < n:
        raise RuntimeLoadError(f"RANK={r} is not in 0..{n - 1} (WORLD_SIZE={n})")
    return Launch(r, n, local, f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}")


def join_launched(launch: Launch, device: str) -> None:
    """Join the group of a torchrun-style launch; a rank that cannot reach the others fails in one line."""
    from lmdepot.runtime.errors import RuntimeLoadError

    try:
        _join(launch.rank, launch.world_size, device, "env://")
    except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError are RuntimeErrors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeLoadError(f"rank {launch.rank}: could not join the {launch.world_size} ranks at {launch.master}"
                               f" within LMDEPOT_TP_TIMEOUT={timeout().total_seconds():g} s ({first})") from None


def agree(error: str | None) -> None:
    """Every rank passes its load status; if any rank failed, every rank raises the first failure."""
    from lmdepot.runtime.errors import RuntimeLoadError

    failed = [e for e in all_gather_object(error) if e]
    if failed:
        raise RuntimeLoadError(failed[0])


# --- ranks 1..N-1 ---------------------------------------------------------------------------------
def worker_loop(runner) -> None:
    while True:
        meta = broadcast_object()
        if meta is None:
            break
        runner.execute(meta)


def worker_main(rank_: int, size: int, port: int, source: str, engine_cfg, errors=None) -> None:
    """Entry point of spawned ranks 1..N-1. Load errors go back to rank 0 through `errors`."""
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
        worker_loop(runner)
    finally:
        shutdown()
