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
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lmdepot.runtime import step_channel
from lmdepot.runtime.allreduce import AllReduce

_control = None   # gloo group for step metadata and load status (see the module docstring)
_sum: AllReduce | None = None   # the row-parallel outputs' all-reduce (allreduce.py)
_same_host = False   # spawned ranks share rank 0's machine: steps go through shared memory
_steps: step_channel.StepChannel | None = None
_CHANNEL = "__lmdepot_step_channel__"


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _summer() -> AllReduce:
    global _sum
    if _sum is None:
        _sum = AllReduce()
    return _sum


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place."""
    if world_size() > 1:
        _summer()(x)
    return x


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """ops.add_rms_norm(all_reduce(x), residual, weight, eps) for a float32 row-parallel partial x: one
    fused kernel where allreduce.py can (CUDA, symmetric memory, small enough), else exactly those two
    steps. Every rank must call it at the same point with the same shapes."""
    from lmdepot.runtime import ops

    if world_size() > 1:
        fused = _summer().add_rms_norm(x, residual, weight, eps)
        if fused is not None:
            return fused
    return ops.add_rms_norm(all_reduce(x), residual, weight, eps)


def all_reduce_fuses_norm() -> bool:
    """Whether all_reduce_add_rms_norm may sum and norm in one kernel (LMDEPOT_ALLREDUCE=fused, several
    ranks): the model then keeps that path rather than fusing the norm into the next linear."""
    return world_size() > 1 and _summer().mode == "fused"


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


def broadcast_tensor(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's t into every rank's t, in place, on the forward's group (NCCL on CUDA: queued on the
    stream, no host sync)."""
    dist.broadcast(t, src=0)
    return t


def send_step(meta) -> None:
    """Rank 0: this step's metadata (None: stop) to the other ranks; through shared memory when they
    share this machine (step_channel.py), else over the gloo group."""
    global _steps
    if _steps is None and _same_host and step_channel.available():
        _steps = step_channel.StepChannel.create(world_size() - 1)
        broadcast_object((_CHANNEL, _steps.name))
    if _steps is None or not _steps.send(meta, timeout().total_seconds()):
        broadcast_object(meta)


def recv_step():
    """Ranks 1..N-1: the next step's metadata from rank 0 (None: stop)."""
    global _steps
    if _steps is None:
        meta = broadcast_object()
        if isinstance(meta, tuple) and meta[:1] == (_CHANNEL,):
            _steps = step_channel.StepChannel.attach(meta[1], world_size() - 1, rank() - 1)
            return recv_step()
        return meta
    meta, big = _steps.recv()
    return broadcast_object() if big else meta


def _close_steps() -> None:
    global _steps
    if _steps is not None:
        _steps.close(unlink=rank() == 0)
        _steps = None


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
    """Spawned ranks: all on this machine, TCP rendezvous on 127.0.0.1."""
    global _same_host
    _same_host = True
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    _join(rank_, size, device, f"tcp://127.0.0.1:{port}")


def shutdown() -> None:
    global _control, _sum, _same_host
    _close_steps()
    _sum, _same_host = None, False
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
        first = _first_line(exc)
        raise RuntimeLoadError(f"rank {launch.rank}: could not join the {launch.world_size} ranks at {launch.master}"
                               f" within LMDEPOT_TP_TIMEOUT={timeout().total_seconds():g} s ({first})") from None


def agree(error: str | None) -> None:
    """Every rank passes its load status; if any rank failed, every rank raises the first failure."""
    from lmdepot.runtime.errors import RuntimeLoadError

    failed = [e for e in all_gather_object(error) if e]
    if failed:
        raise RuntimeLoadError(failed[0])


def join_launched_and_pull(source: str, launch: Launch, ecfg) -> Path:
    """Every rank of a torchrun-style launch: join the group, pull this rank's files, agree that all
    ranks got theirs. Rank 0 returns its workspace; the other ranks run the worker loop and exit."""
    from lmdepot.errors import LmdepotError
    from lmdepot.runtime.errors import RuntimeLoadError
    from lmdepot.runtime.loader import read_config, resolve_workspace

    if ecfg.tp is not None and ecfg.tp != launch.world_size:
        raise RuntimeLoadError(f"--tp {ecfg.tp} differs from WORLD_SIZE={launch.world_size};"
                               f" launch {ecfg.tp} ranks or drop --tp")
    if ecfg.device == "cuda":
        # LOCAL_RANK picks this process's GPU (modulo: a launcher may show each process only its own)
        ecfg.device = f"cuda:{launch.local_rank % max(torch.cuda.device_count(), 1)}"
        torch.cuda.set_device(ecfg.device)
    join_launched(launch, ecfg.device)
    error, workspace = None, None
    try:
        workspace = resolve_workspace(source, launch.rank)
        n = read_config(workspace).tensor_para_size
        if n != launch.world_size:
            error = (f"WORLD_SIZE={launch.world_size} but {source} has tensor_para_size = {n};"
                     f" launch {n} ranks or re-convert with --tp {launch.world_size}")
    except LmdepotError as exc:
        error = f"rank {launch.rank}: {exc}"
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others would wait
        error = f"rank {launch.rank}: {type(exc).__name__}: {exc}"
    try:
        agree(error)
    except BaseException:
        shutdown()
        raise
    ecfg.tp = launch.world_size
    if launch.rank != 0:
        serve_as_worker(workspace, ecfg, launch.rank)
    return workspace


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def serve_as_worker(workspace, ecfg, rank_: int) -> None:
    """Ranks 1..N-1 of a launched group: load, follow rank 0's steps until it closes, exit the process."""
    from lmdepot.errors import LmdepotError
    from lmdepot.runtime.errors import RuntimeLoadError
    from lmdepot.runtime.runner import ModelRunner

    ecfg.quiet = True
    try:
        try:
            runner = ModelRunner(workspace, ecfg, rank_)
        except LmdepotError as exc:
            raise RuntimeLoadError(f"rank {rank_}: {exc}") from None
        except RuntimeError as exc:  # out of device memory, a peer that closed while the cache was sized
            raise RuntimeLoadError(f"rank {rank_}: failed to load: {type(exc).__name__}: {_first_line(exc)}") from None
        print(f"[lmdepot] rank {rank_} of {world_size()} loaded ({runner.weight_bytes / 2**20:.1f} MiB of weights,"
              f" {runner.num_blocks} KV blocks); following rank 0's steps", file=sys.stderr, flush=True)
        try:
            worker_loop(runner)
        except RuntimeError as exc:  # rank 0 went away (gloo reports the closed connection) or a step failed
            raise RuntimeLoadError(f"rank {rank_}: stopped following rank 0 ({_first_line(exc)})") from None
    except BaseException:
        shutdown()
        raise
    # Rank 0 closed the group and is tearing down the rendezvous store it hosts: an NCCL teardown here
    # can wait on that store for ever (seen on 2 H200s), and the process is done anyway.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- ranks 1..N-1 ---------------------------------------------------------------------------------
def worker_loop(runner) -> None:
    while True:
        meta = recv_step()
        if meta is None:
            break
        runner.execute(meta)
    _close_steps()


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
    except BaseException:
        shutdown()
        raise
    sys.stdout.flush()   # as in serve_as_worker: no NCCL teardown against a store rank 0 is closing
    sys.stderr.flush()
    os._exit(0)
