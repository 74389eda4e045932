"""Sweep W8A8 GEMM launch configs on the GPU and print the best per (shape, M) beside the heuristic's
and cuBLAS bf16.

python scripts/tune_w8a8.py [M ...]   (device run; prints a table, feeds w8a8.heuristic_config by hand)

Two stages keep the number of compilations (about a second each) small: tiles, warps and stages
without a K split, then K splits of 2 and 4 for the three best of those.
"""

import itertools
import sys

import torch
from triton.testing import do_bench_cudagraph

from lmdepot.runtime.kernels.w8a8 import heuristic_config, w8a8_linear

SHAPES = [(4096, 11008), (11008, 4096)]   # (K, N)
MS = [int(m) for m in sys.argv[1:]] or [256, 1024]
TILES = [(64, 128), (128, 128), (64, 256), (128, 256), (256, 128)]


def main():
    for (K, N), M in itertools.product(SHAPES, MS):
        a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        xs, ws = torch.rand(M, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3
        ref = (a.double() @ w.double().t()).int()
        x, w_bf16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(K, N, device="cuda",
                                                                                      dtype=torch.bfloat16)
        cublas = do_bench_cudagraph(lambda: x @ w_bf16, rep=50) * 1e3
        base = do_bench_cudagraph(lambda: w8a8_linear(a, xs, w, ws, out_dtype=torch.bfloat16), rep=50) * 1e3
        results = []

        def time(cfg):
            try:
                if not torch.equal(w8a8_linear(a, xs, w, ws, config=cfg, raw=True), ref):
                    print("MISMATCH", K, N, M, cfg)
                    return
                fn = lambda: w8a8_linear(a, xs, w, ws, out_dtype=torch.bfloat16, config=cfg)  # noqa: E731
                results.append((do_bench_cudagraph(fn, rep=20) * 1e3, cfg))
            except Exception:  # noqa: BLE001 - a config may run out of shared memory; skip it
                pass

        for (bm, bn), warps, stages in itertools.product(TILES, [4, 8], [3, 4]):
            time(dict(block_m=bm, block_n=bn, block_k=128, num_warps=warps, num_stages=stages, group_m=8, split_k=1))
        for _, cfg in sorted(results, key=lambda r: r[0])[:3]:
            for split in (2, 4):
                time(cfg | {"split_k": split})
        us, cfg = min(results, key=lambda r: r[0])
        print(f"{K}x{N} M={M}: cublas bf16 {cublas:.1f} us, heuristic {base:.1f} us ({cublas / base:.2f}x),"
              f" best {us:.1f} us ({cublas / us:.2f}x) {cfg}", flush=True)


if __name__ == "__main__":
    main()
