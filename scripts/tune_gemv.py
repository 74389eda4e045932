"""Tune the dense decode GEMV (kernels/gemv.py) on the GPU; print the best config per (shape, M) beside
cuBLAS (F.linear, the runtime's dense path) and the % of the measured copy bandwidth.

python scripts/tune_gemv.py [M ...] [--tp N]   (device run, ~2 min on an H200; feeds heuristic_config by hand)

--tp N: one rank's shapes at N-way tensor parallelism (qkv, gate/up and the vocab-parallel lm_head split
along N, o and down along K): the shapes a tp=2 decode step's GEMVs run at (session 8's profile: 81% of
copy bandwidth at tp=2 against 86% at tp=1).

bf16 is swept (coordinate descent from the heuristic: one parameter at a time over its list, keeping
the best, which keeps the run to ~20 configs per case instead of the full product); fp16 moves the
same bytes, so it is only timed with bf16's best config. Roofline % = bytes moved (W + x + y) / copy
bandwidth / time; the copy bandwidth (read + write of a 1 GiB tensor) is measured in the same run.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from lmdepot.bench.kernels import copy_bandwidth
from lmdepot.bench.shapes import SHAPES, linear_shapes
from lmdepot.runtime.kernels.gemv import gemv, heuristic_config, reference

GRID = {"block_k": [128, 256, 512], "block_n": [8, 16, 32, 64], "num_warps": [4, 8], "split_k": [1, 2, 4, 8, 16],
        "num_stages": [2, 3, 4], "use_dot": [False, True]}


def _us(fn, rep=20) -> float:
    return do_bench_cudagraph(fn, rep=rep) * 1e3


def _fits(cfg: dict, M: int) -> bool:
    """tl.dot needs 16-wide tiles; the FMA path's fp32 accumulator must stay <= 128 registers a thread."""
    if cfg["use_dot"]:
        return cfg["block_n"] >= 16
    return triton.next_power_of_2(M) * cfg["block_n"] * cfg["block_k"] // (32 * cfg["num_warps"]) <= 128


def tune(x, w, ref) -> tuple[float, dict]:
    M, K = x.shape
    best_cfg = heuristic_config(M, w.shape[0], K)
    best = _us(lambda: gemv(x, w, config=best_cfg))
    for key, values in GRID.items():
        for value in values:
            cfg = best_cfg | {key: value}
            if cfg == best_cfg or not _fits(cfg, M):
                continue
            fn = lambda: gemv(x, w, config=cfg)  # noqa: E731
            try:
                if not torch.allclose(fn().float(), ref, rtol=2e-2, atol=2e-2):
                    print("MISMATCH", tuple(w.shape), M, cfg, flush=True)
                    continue
                us = _us(fn, rep=10)
            except Exception as exc:  # noqa: BLE001 - a config may run out of resources; skip it
                print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                continue
            if us < best:
                best, best_cfg = us, cfg
    return best, best_cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ms", nargs="*", type=int, default=[1, 2, 4], help="rows (M) to tune for")
    ap.add_argument("--tp", type=int, default=1, help="one rank's shapes at this tensor-parallel degree")
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES), help="the model whose linears to tune")
    args = ap.parse_args()
    bw = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s (1 GiB copy, read + write)\n")
    print(f"{'shape (KxN)':22} {'M':>2} {'dtype':5} {'cuBLAS us':>9} {'%bw':>5} {'heur us':>8} {'best us':>8} "
          f"{'%bw':>5} {'speedup':>7}  best config")
    for K, N, name in linear_shapes(args.shape, args.tp):
        name = f"{name}/tp{args.tp}" if args.tp > 1 else name
        w16 = (torch.randn(N, K, device="cuda") * 0.02)
        for M in args.ms:
            best_cfg = None
            for dtype in (torch.bfloat16, torch.float16):
                w = w16.to(dtype)
                x = torch.randn(M, K, device="cuda").to(dtype)
                ref = reference(x, w).float()
                nbytes = (N * K + M * K + M * N) * 2
                t_cublas = _us(lambda: F.linear(x, w))
                t_heur = _us(lambda: gemv(x, w))
                if best_cfg is None:
                    t_best, best_cfg = tune(x, w, ref)
                else:
                    t_best = _us(lambda: gemv(x, w, config=best_cfg))
                pct = lambda us: 100 * nbytes / bw / (us * 1e-6)  # noqa: E731
                print(f"{f'{K}x{N} {name}':22} {M:2} {str(dtype)[6:]:5} {t_cublas:9.1f} {pct(t_cublas):5.0f} "
                      f"{t_heur:8.1f} {t_best:8.1f} {pct(t_best):5.0f} {t_cublas / t_best:6.2f}x  {best_cfg}",
                      flush=True)


if __name__ == "__main__":
    main()
