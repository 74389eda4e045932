"""Sweep W4A16 launch configs on the GPU and print the best per (shape, M) next to the heuristic's.

python scripts/tune_w4a16.py [M ...]   (device run; prints a table, feeds heuristic_config by hand)
"""

import itertools
import sys

import torch
from triton.testing import do_bench_cudagraph

from lmdepot.formats.int4 import quantize_int4_rtn
from lmdepot.runtime.kernels.w4a16 import heuristic_config, reference, w4a16_linear

SHAPES = [(4096, 11008), (11008, 4096)]
MS = [int(m) for m in sys.argv[1:]] or [1, 16, 256]


def main():
    for (K, N), M in itertools.product(SHAPES, MS):
        q = {k: v.cuda() for k, v in quantize_int4_rtn(torch.randn(K, N) * 0.02, 128).items()}
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ref = reference(x, q["qweight"], q["scales"], q["zeros"]).float()
        base = do_bench_cudagraph(lambda: w4a16_linear(x, q["qweight"], q["scales"], q["zeros"]), rep=50) * 1e3
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
            try:
                fn = lambda: w4a16_linear(x, q["qweight"], q["scales"], q["zeros"], config=cfg)  # noqa: E731
                if not torch.allclose(fn().float(), ref, rtol=3e-2, atol=0.1):
                    print("MISMATCH", K, N, M, cfg)
                    continue
                us = do_bench_cudagraph(fn, rep=20) * 1e3
            except Exception:  # noqa: BLE001 - a config may run out of resources; skip it
                continue
            if us < best[0]:
                best = (us, cfg)
            mode = (cfg.get("x_tile"), cfg.get("no_masks"))
            if us < by_mode.get(mode, (1e9,))[0]:
                by_mode[mode] = (us, cfg)
        for (x_tile, no_masks), (us, cfg) in by_mode.items():
            print(f"  best with x_tile={x_tile} no_masks={no_masks}: {us:.1f} us {cfg}")
        print(f"{K}x{N} M={M}: heuristic {base:.1f} us, best {best[0]:.1f} us {best[1]}", flush=True)


if __name__ == "__main__":
    main()
