"""The fused all-reduce + residual add + RMSNorm (kernels/allreduce_rms_norm.py) across 2 real GPUs
(NCCL + symmetric memory): against the float32 rank-order sum through the add_rms_norm kernel, eagerly
(ranks deliberately out of step, to race the slot reuse) and inside a replayed CUDA graph.

Run by pytest (skipped below 2 GPUs), which starts this file as a script that spawns the ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EPS = 1e-5
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fused_all_reduce_norm_on_two_gpus():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMDEPOT_ALLREDUCE": "fused", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NCCL_NVLS_ENABLE": "0"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok:") == 2, proc.stdout


# --- the ranks ---------------------------------------------------------------------------------------
def inputs(seed, world, B, H, dtype):
    """Every rank's partial, the residual and the weight, identical on every rank (same seed)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(B, H, generator=gen) * 2).cuda() for _ in range(world)]
    return parts, torch.randn(B, H, generator=gen).to("cuda", dtype), torch.randn(H, generator=gen).to("cuda", dtype)


def expected(parts, residual, w):
    from lmdepot.runtime.kernels import rms_norm

    total = parts[0].clone()
    for p in parts[1:]:
        total += p   # rank order, float32
    return rms_norm.rms_norm(total, residual, w, EPS)


def check(got, want, what):
    """h (the sum + residual: no reduction inside) bit-exact; y too, or within one ulp where the norm's
    row sum was reduced in another thread order than the add_rms_norm kernel's."""
    (y, h), (y_ref, h_ref) = got, want
    assert torch.equal(h, h_ref), f"{what}: residual differs, max {(h.float() - h_ref.float()).abs().max()}"
    if not torch.equal(y, y_ref):
        rel = 2.0 ** -7 if y.dtype == torch.bfloat16 else 2.0 ** -10
        torch.testing.assert_close(y, y_ref, rtol=rel, atol=1e-6, msg=what)
        frac = (y != y_ref).float().mean().item()
        assert frac < 0.01, f"{what}: {frac:.2%} of the outputs differ"
        print(f"note: {what}: {frac:.3%} of y one ulp off", flush=True)


def same_on_every_rank(t, what):
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), f"{what}: ranks differ"


def eager(rank, world):
    from lmdepot.runtime import tp

    seed = 0
    for dtype in (torch.bfloat16, torch.float16):
        for B, H in ((1, 4096), (3, 200), (16, 4096), (64, 4096), (7, 5120)):
            calls = [inputs(seed + i, world, B, H, dtype) for i in range(12)]
            seed += 12
            mine = [parts[rank].clone() for parts, _, _ in calls]
            ones = torch.ones(8, device="cuda")
            torch.cuda.synchronize()
            got = []
            for i, (_, res, w) in enumerate(calls):   # queued back to back, no host sync in between
                if i % world == rank:
                    torch.cuda._sleep(200_000)   # this rank late for call i: the others run ahead
                if i == 6:
                    tp.all_reduce(ones)   # a full collective in between
                got.append(tp.all_reduce_add_rms_norm(mine[i], res, w, EPS))
            for i, (g, (parts, res, w)) in enumerate(zip(got, calls)):
                check(g, expected(parts, res, w), f"eager {dtype} B={B} H={H} call {i}")
                same_on_every_rank(g[0], f"eager {dtype} B={B} H={H} call {i}")
    assert tp._sum.fused_buffer is not None
    # too many rows for a slot: the fallback (all-reduce, then add_rms_norm), same results
    parts, res, w = inputs(999, world, 300, 4096, torch.bfloat16)
    assert tp._sum.add_rms_norm(parts[rank].clone(), res, w, EPS) is None
    check(tp.all_reduce_add_rms_norm(parts[rank].clone(), res, w, EPS), expected(parts, res, w), "fallback B=300")


def graph(rank, world):
    """Five fused calls between two one-shot all-reduces, captured once, replayed with new inputs each
    time: (collective) slots 0, 1, (collective), 0, 1, 0 - the last reuses the slot of the call two
    before. Like a model forward, the graph begins with a collective (the embedding sum there)."""
    from lmdepot.runtime import tp

    B, H, dtype = 4, 4096, torch.bfloat16
    parts0, res0, w = inputs(100, world, B, H, dtype)
    mine = [parts0[rank].clone() for _ in range(5)]
    res = res0.clone()
    other = torch.zeros(B, H, device="cuda")

    def body():
        tp.all_reduce(other)
        y1, h1 = tp.all_reduce_add_rms_norm(mine[0], res, w, EPS)
        y2, h2 = tp.all_reduce_add_rms_norm(mine[1], h1, w, EPS)
        tp.all_reduce(other)
        y3, h3 = tp.all_reduce_add_rms_norm(mine[2], res, w, EPS)
        y4, h4 = tp.all_reduce_add_rms_norm(mine[3], h3, w, EPS)
        y5, h5 = tp.all_reduce_add_rms_norm(mine[4], h4, w, EPS)
        return [(y1, h1), (y2, h2), (y3, h3), (y4, h4), (y5, h5)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()   # warm-up outside the graph (Triton compiles)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = body()
    for it in range(6):
        calls = [inputs(1000 + 10 * it + k, world, B, H, dtype) for k in range(5)]
        for k, (parts, _, _) in enumerate(calls):
            mine[k].copy_(parts[rank])
        res.copy_(calls[0][1])
        if it % world == rank:
            torch.cuda._sleep(200_000)
        g.replay()
        torch.cuda.synchronize()
        h_prev = {0: res, 2: res}
        for k, (parts, _, _) in enumerate(calls):
            r = h_prev.get(k, outs[k - 1][1])
            check(outs[k], expected(parts, r, w), f"graph replay {it} call {k}")
            same_on_every_rank(outs[k][0], f"graph replay {it} call {k}")


def worker(rank, world, port):
    import threading

    import torch.distributed as dist

    # a kernel waiting for a peer's flag spins for ever: end the process (and so the kernel) instead
    watchdog = threading.Timer(300, lambda: (print(f"rank {rank}: stuck, exiting", flush=True), os._exit(3)))
    watchdog.daemon = True
    watchdog.start()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            device_id=torch.device("cuda", rank))
    eager(rank, world)
    graph(rank, world)
    torch.cuda.synchronize()
    dist.barrier()
    print(f"ok: rank {rank}", flush=True)
    sys.stdout.flush()
    os._exit(0)   # no NCCL teardown (see tp.serve_as_worker)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    from lmdepot.runtime.tp import free_port

    mp.spawn(worker, args=(2, free_port()), nprocs=2)
