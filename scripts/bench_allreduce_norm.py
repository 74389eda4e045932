"""Time one tensor-parallel "sum the partials, add the residual, RMSNorm" on 2 GPUs, three ways:
the fused kernel (kernels/allreduce_rms_norm.py), PyTorch's one-shot all-reduce + the add_rms_norm
kernel, NCCL + the add_rms_norm kernel. Each is captured 64 times in a CUDA graph (a 7B decode step
has 64 such calls) and replayed; prints microseconds per call.

    python scripts/bench_allreduce_norm.py            # spawns 2 ranks itself
    torchrun --nproc-per-node 2 scripts/bench_allreduce_norm.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

CALLS, REPLAYS, EPS = 64, 20, 1e-5


def per_call_us(fn) -> float:
    """Capture CALLS calls of fn in a graph, replay it; every rank starts timing together."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()   # compile, set up
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (REPLAYS * CALLS)


def run(rank: int, world: int, hidden: int, batches: list[int]) -> None:
    import threading

    from lmdepot.runtime.allreduce import AllReduce

    # a kernel waiting for a peer's flag spins for ever: end the process (and so the kernel) instead
    watchdog = threading.Timer(300, lambda: (print(f"rank {rank}: stuck, exiting", flush=True), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    from lmdepot.runtime.kernels import rms_norm

    fused, one_shot = AllReduce(), AllReduce()
    fused.mode, one_shot.mode = "fused", "symm"
    one_shot.max_bytes = max(batches) * hidden * 4   # the one-shot path for every size measured here
    rows = []
    for B in batches:
        x = torch.randn(B, hidden, device="cuda")   # summed in place below (grows to inf: same timing)
        res = torch.randn(B, hidden, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)

        def nccl():
            dist.all_reduce(x)
            rms_norm.rms_norm(x, res, w, EPS)

        def symm():
            one_shot(x)
            rms_norm.rms_norm(x, res, w, EPS)

        def fused_call():
            assert fused.add_rms_norm(x, res, w, EPS) is not None, "the fused path did not apply"

        times = {name: per_call_us(fn) for name, fn in (("fused", fused_call), ("one-shot + norm", symm),
                                                        ("nccl + norm", nccl))}
        rows.append((B, times))
    if rank == 0:
        print(f"{world} ranks, hidden {hidden}, bf16 residual, float32 partials; us per call "
              f"(CUDA graph of {CALLS} calls, {REPLAYS} replays), {torch.cuda.get_device_name()}")
        print(f"{'batch':>6} " + " ".join(f"{name:>16}" for name in rows[0][1]))
        for B, times in rows:
            print(f"{B:>6} " + " ".join(f"{t:>16.2f}" for t in times.values()))


def worker(rank: int, world: int, port: int, hidden: int, batches: list[int]) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            device_id=torch.device("cuda", rank))
    run(rank, world, hidden, batches)
    torch.cuda.synchronize()
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)   # no NCCL teardown (see tp.serve_as_worker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batch", default="1,16", help="comma list of batch sizes")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "LOCAL_RANK" in os.environ:   # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        run(rank, world, args.hidden, batches)
        dist.barrier()
        sys.stdout.flush()
        os._exit(0)
    import torch.multiprocessing as mp

    from lmdepot.runtime.tp import free_port

    mp.spawn(worker, args=(2, free_port(), args.hidden, batches), nprocs=2)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
