"""Sweep W4A16 launch configs on the GPU and print the best per (shape, M) next to the heuristic's.

python scripts/tune_w4a16.py [M ...] [--only plain|kmajor|kmajor_gemm] [--shape llama2-7b] [--tp N] [--json F]
(device run; prints a table and, for one row, the kmajor bests as w4a16_gemv.TUNED entries to paste, or
to F for `profile_decode.py --w4a16-tuned F` in the same call)

The shapes are one rank's int4 linears of `--shape` at `--tp` (bench/shapes.linear_shapes: qkv, o,
gate/up, down; lm_head stays fp16), the launches a decode step makes.

plain: kernels/w4a16.py on the workspace layout (full grid for M <= 4, which also sweeps its x_tile
and no_masks options). kmajor (M <= 4 only): kernels/w4a16_gemv.py on the repacked layout, a
coordinate descent from its heuristic (one parameter at a time over its list, twice), since every
config costs a compile. kmajor_gemm (M >= 5, e.g. `16 64 256 --only kmajor_gemm`; the engine takes
it for 5-127 rows, dequantize + cuBLAS from 128):
kernels/w4a16_gemm.py on the same layout, the same descent over KMAJOR_GEMM_GRID. Every config is
checked against the float32 reference before it is timed; the copy bandwidth measured in the same run
gives the roofline % of the int4 bytes (weights, scales, zeros).
"""

import argparse
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from lmdepot.bench.kernels import copy_bandwidth
from lmdepot.bench.shapes import SHAPES, linear_shapes
from lmdepot.formats.int4 import quantize_int4_rtn, unpack_int4
from lmdepot.runtime.kernels import w4a16_gemm, w4a16_gemv
from lmdepot.runtime.kernels.w4a16 import heuristic_config, reference, w4a16_linear

KMAJOR_GRID = {"block_n": [16, 32, 64], "num_warps": [1, 2], "num_stages": [1, 2, 3, 4],
               "split_k": [4, 6, 7, 8, 12, 16, 24], "maxnreg": [None, 96, 128], "vec": [2, 4],
               "prefetch": [False, True]}
KMAJOR_GEMM_GRID = {"block_m": [16, 32, 64, 128], "block_n": [64, 128, 256], "num_warps": [4, 8],
                    "num_stages": [2, 3, 4], "split_k": [1, 2, 3, 4, 6, 8]}


def _us(fn, rep=20) -> float:
    return do_bench_cudagraph(fn, rep=rep) * 1e3


def _checked_us(fn, ref, what) -> float | None:
    try:
        if not torch.allclose(fn().float(), ref, rtol=3e-2, atol=0.1):
            print("MISMATCH", what, flush=True)
            return None
        return _us(fn)
    except Exception as exc:  # noqa: BLE001 - a config may run out of resources; skip it
        print(f"  skip {what}: {type(exc).__name__}", flush=True)
        return None


def tune_plain(K, N, M, x, q, ref):
    base = _us(lambda: w4a16_linear(x, q["qweight"], q["scales"], q["zeros"]), rep=50)
    best = (base, heuristic_config(M, N, K, 128))
    by_mode = {}
    if M <= 4:
        grid = dict(x_tile=[False, True], no_masks=[False, True], block_n=[64, 128], block_k=[128],
                    num_warps=[1, 2], split_k=[16, 32], num_stages=[2, 3])
    else:
        grid = dict(block_m=[16, 32, 64] if M >= 32 else [16], block_n=[32, 64, 128, 256], block_k=[64, 128],
                    num_warps=[4, 8], split_k=[1, 4, 16], num_stages=[2, 3, 4])
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(grid, values))
        fn = lambda: w4a16_linear(x, q["qweight"], q["scales"], q["zeros"], config=cfg)  # noqa: E731
        us = _checked_us(fn, ref, (K, N, M, cfg))
        if us is None:
            continue
        if us < best[0]:
            best = (us, cfg)
        mode = (cfg.get("x_tile"), cfg.get("no_masks"))
        if us < by_mode.get(mode, (1e9,))[0]:
            by_mode[mode] = (us, cfg)
    for (x_tile, no_masks), (us, cfg) in by_mode.items():
        print(f"  best with x_tile={x_tile} no_masks={no_masks}: {us:.1f} us {cfg}")
    return base, best


def tune_kmajor(K, N, M, x, q, ref, gemm=False):
    """Coordinate descent from the heuristic config of the K-major GEMV (or, gemm=True, GEMM)."""
    packed = w4a16_gemv.repack(q["qweight"], q["scales"], q["zeros"])
    assert torch.equal(w4a16_gemv.unpack(packed), unpack_int4(q["qweight"])), "repack lost codes"
    kernel, grid = (w4a16_gemm, KMAJOR_GEMM_GRID) if gemm else (w4a16_gemv, KMAJOR_GRID)
    launch = w4a16_gemm.gemm if gemm else w4a16_gemv.gemv
    name = "kmajor_gemm" if gemm else "kmajor"
    cfg = kernel.heuristic_config(M, N, K, 128)
    base = _checked_us(lambda: launch(x, packed), ref, (K, N, M, f"{name} heuristic"))
    best = (base if base is not None else 1e9, cfg)
    for _ in range(2):
        for key, values in grid.items():
            for value in values:
                cfg = best[1] | {key: value}
                if cfg == best[1]:
                    continue
                fn = lambda: launch(x, packed, config=cfg)  # noqa: E731, B023 - called at once
                us = _checked_us(fn, ref, (K, N, M, name, cfg))
                if us is not None and us < best[0]:
                    best = (us, cfg)
    return base, best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("ms", nargs="*", type=int, default=[1, 16, 256])
    parser.add_argument("--only", choices=["plain", "kmajor", "kmajor_gemm"])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES), help="the model whose linears to tune")
    parser.add_argument("--tp", type=int, default=1, help="one rank's shapes at this tensor-parallel degree")
    parser.add_argument("--json", help="write the kmajor M=1 bests here, for profile_decode.py --w4a16-tuned")
    args = parser.parse_args()
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    tuned = {}
    shapes = [(K, N) for K, N, name in linear_shapes(args.shape, args.tp) if name != "lm_head"]
    for (K, N), M in itertools.product(shapes, args.ms):
        q = {k: v.cuda() for k, v in quantize_int4_rtn(torch.randn(K, N) * 0.02, 128).items()}
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = reference(x, q["qweight"], q["scales"], q["zeros"]).float()
        nbytes = sum(t.numel() * t.element_size() for t in q.values())
        pct = lambda us: f"{100 * nbytes / bw / (us * 1e-6):.0f}% of copy bandwidth"  # noqa: E731
        if args.only in (None, "plain"):
            base, (us, cfg) = tune_plain(K, N, M, x, q, ref)
            print(f"{K}x{N} M={M} plain: heuristic {base:.1f} us, best {us:.1f} us ({pct(us)}) {cfg}", flush=True)
        for name, fits in (("kmajor", M <= w4a16_gemv.MAX_M), ("kmajor_gemm", M > w4a16_gemv.MAX_M)):
            if args.only in (None, name) and fits:
                base, (us, cfg) = tune_kmajor(K, N, M, x, q, ref, gemm=name == "kmajor_gemm")
                head = "failed" if base is None else f"{base:.1f} us"
                print(f"{K}x{N} M={M} {name}: heuristic {head}, best {us:.1f} us ({pct(us)}) {cfg}", flush=True)
                if name == "kmajor" and M == 1:
                    tuned[K, N] = (us, cfg)
                    if args.json:   # after every shape: a run cut short by its time limit keeps what it found
                        with open(args.json, "w") as f:
                            json.dump([{"K": k, "N": n, "us": t, "config": c} for (k, n), (t, c) in tuned.items()], f)
    if tuned:
        print("w4a16_gemv.TUNED entries (M = 1, group 128):")
        for (k, n), (t, c) in tuned.items():
            print(f"         ({k}, {n}): {c},   # {t:.1f} us")


if __name__ == "__main__":
    main()
