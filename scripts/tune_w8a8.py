"""Sweep W8A8 GEMM launch configs on the GPU and print the best per (shape, M) beside the heuristic's
and cuBLAS bf16.

python scripts/tune_w8a8.py   (device run; prints a table, feeds w8a8.heuristic_config by hand)
"""

import itertools

import torch
from triton.testing import do_bench_cudagraph

from lmdepot.runtime.kernels.w8a8 import heuristic_config, w8a8_linear

SHAPES = [(4096, 11008), (11008, 4096)]
MS = [1, 16, 256, 1024, 4096]


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
        best = (base, heuristic_config(M, N, K))
        if M <= 64:
            grid = dict(block_m=[16] if M <= 16 else [32, 64], block_n=[32, 64, 128], block_k=[128, 256],
                        num_warps=[4], num_stages=[3, 4, 5], group_m=[8])
        else:
            grid = dict(block_m=[64, 128], block_n=[64, 128, 256], block_k=[64, 128], num_warps=[4, 8],
                        num_stages=[3, 4], group_m=[8])
        for values in itertools.product(*grid.values()):
            cfg = dict(zip(grid, values))
            try:
                if not torch.equal(w8a8_linear(a, xs, w, ws, config=cfg, raw=True), ref):
                    print("MISMATCH", K, N, M, cfg)
                    continue
                fn = lambda: w8a8_linear(a, xs, w, ws, out_dtype=torch.bfloat16, config=cfg)  # noqa: E731
                us = do_bench_cudagraph(fn, rep=20) * 1e3
            except Exception:  # noqa: BLE001 - a config may run out of shared memory; skip it
                continue
            if us < best[0]:
                best = (us, cfg)
        print(f"{K}x{N} M={M}: cublas bf16 {cublas:.1f} us, heuristic {base:.1f} us ({cublas / base:.2f}x),"
              f" best {best[0]:.1f} us ({cublas / best[0]:.2f}x) {best[1]}", flush=True)


if __name__ == "__main__":
    main()
