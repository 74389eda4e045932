"""GPU timing of decode attention over an int8 / int4 paged cache (kernels/paged_decode_attention_quant.py)
against the float cache's decode kernel on the same shapes, with the % of copy bandwidth each reaches
(bytes: codes + per-token/per-block params, or fp16 K + V). Long contexts at large batch are where the
quantized cache must win (the issue's long-context workload: ~110 sequences of 2-4k tokens).

PYTHONPATH=. python scripts/bench_decode_quant.py [--shapes 32/32,32/8] [--cases 64x3000,128x3000,1x4096]
    [--sweep 128x3000]   (also times each tile config of CONFIGS on that case and marks the fastest)
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench_cudagraph

from lmdepot.bench.kernels import copy_bandwidth
from lmdepot.runtime.kernels.paged_decode_attention import paged_decode_attention
from lmdepot.runtime.kernels.paged_decode_attention_quant import paged_decode_attention_quant, reference
from lmdepot.runtime.kv_cache import allocate, make_spec
from lmdepot.runtime.ops.kv_quant import store_kv_quant

PAGE, D, DT = 64, 128, torch.float16
SCHEMES = ((8, "plain"), (4, "rotate"), (4, "channel"))
# each merged over default_config; maxnreg caps registers a thread for more programs an SM
CONFIGS = [{"sub": sub, "num_warps": w, "num_stages": st} for sub, w, st in ((32, 4, 3), (64, 4, 2), (64, 4, 3),
                                                                           (64, 4, 5), (64, 4, 6))] + \
    [{"sub": 64, "num_warps": 4, "num_stages": 3, "maxnreg": r} for r in (128, 168)] + \
    [{"sub": 64, "num_warps": 4, "num_stages": st, "asm": a} for st in (2, 3) for a in (False, True)]
# one q head per kv head (the CUDA-core path): value partial sums folded to a thread's rows (`fold`,
# eleventh session) or kept per key slot, each scheme's earlier default beside the folded variants; the
# last three not timed yet (sm_90 int8: 8 warps 74 registers, 32-key tiles 80, a cap of 80 spills 152 bytes)
VECTOR_CONFIGS = [{"sub": sub, "num_warps": w, "num_stages": st, "vector": True, "maxnreg": r, "fold": f}
                  for sub, w, st, r, f in ((64, 4, 2, 168, False), (64, 4, 2, None, True), (64, 4, 3, None, True),
                                           (64, 2, 2, None, False), (64, 2, 2, None, True), (64, 2, 3, None, False),
                                           (64, 2, 3, None, True), (64, 2, 2, 168, True), (64, 8, 2, None, True),
                                           (32, 4, 2, None, True), (64, 4, 2, 80, True))]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def case(hq: int, hkv: int, batch: int, ctx: int, bw: float, sweep: bool = False, dev: str = "cuda") -> None:
    pages = -(-ctx // PAGE)
    n_blocks = batch * pages
    tables = torch.randperm(n_blocks, device=dev, dtype=torch.int32).view(batch, pages)
    lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(batch, hq, D, device=dev, dtype=DT)
    kf, vf = (torch.randn(n_blocks, PAGE, hkv, D, device=dev, dtype=DT) for _ in range(2))
    t = do_bench_cudagraph(lambda: paged_decode_attention(q, kf, vf, tables, lens), rep=50) * 1e3
    used = batch * ctx / (n_blocks * PAGE)   # the read fraction of each cache tensor
    fb = _nbytes(kf, vf) * used
    print(f"  {batch:4}x{ctx:<5} fp16          {t:9.1f} us  {fb / t / 1e-6 / bw:6.1%}")
    slots = torch.arange(n_blocks * PAGE, device=dev)
    for bits, scheme in SCHEMES:
        cache = allocate(make_spec(bits, DT, D, scheme=scheme), n_blocks, PAGE, hkv, D, device=dev)
        for i in range(0, n_blocks, 512):   # store page ranges: the reference store's temporaries stay small
            s = slots[i * PAGE:(i + 512) * PAGE]
            store_kv_quant(kf.view(-1, hkv, D)[s], vf.view(-1, hkv, D)[s], cache, s)
        run = lambda: paged_decode_attention_quant(q, cache, tables, lens)   # noqa: E731
        ref = reference(q[:4], cache, tables[:4], lens[:4], D ** -0.5)   # the first sequences suffice
        err = (run()[:4].float() - ref.float()).abs().max().item()
        t = do_bench_cudagraph(run, rep=50) * 1e3
        qb = _nbytes(*cache.codes, *cache.scales, *cache.zeros, cache.key_scale, cache.key_min, cache.key_sink) * used
        print(f"  {batch:4}x{ctx:<5} int{bits} {scheme:8} {t:9.1f} us  {qb / t / 1e-6 / bw:6.1%}  "
              f"x{fb / qb:.2f} fewer bytes  max|diff| {err:.4f}")
        if sweep:
            times = []
            for cfg in VECTOR_CONFIGS if hq == hkv else CONFIGS:
                try:
                    fn = lambda: paged_decode_attention_quant(q, cache, tables, lens, config=cfg)  # noqa: E731, B023
                    diff = (fn()[:4].float() - ref.float()).abs().max().item()
                    times.append((do_bench_cudagraph(fn, rep=50) * 1e3, str(cfg), diff, cfg))
                except Exception as exc:   # out of resources for a config: say so, go on
                    print(f"      {cfg}: {type(exc).__name__}")
            # the leaders timed again after the whole sweep (a config's time moved by up to 25% between
            # machines in session 8; within a run the repeat shows what one timing is worth)
            again = {name: do_bench_cudagraph(lambda: paged_decode_attention_quant(  # noqa: B023
                q, cache, tables, lens, config=cfg), rep=50) * 1e3 for _, name, _, cfg in sorted(times)[:3]}
            for t, cfg, diff, _ in sorted(times):
                rerun = f" (again {again[cfg]:.1f})" if cfg in again else ""
                print(f"      {t:9.1f} us{rerun}  {qb / t / 1e-6 / bw:6.1%}  max|diff| {diff:.4f}  {cfg}"
                      f"{'  <- best' if t == min(times)[0] else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32/32,32/8", help="q heads / kv heads, comma-separated")
    ap.add_argument("--cases", default="64x3000,128x3000,1x4096,256x512", help="batch x context tokens")
    ap.add_argument("--sweep", default="", help="cases (batch x context) on which to time every tile config")
    args = ap.parse_args()
    bw = copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}  head_dim {D}, page {PAGE}, fp16; copy bandwidth {bw / 1e9:.0f} GB/s; "
          "CUDA-graph replays")
    for shape in args.shapes.split(","):
        hq, hkv = (int(x) for x in shape.split("/"))
        print(f"{hq} q / {hkv} kv heads")
        for c in args.cases.split(","):
            batch, ctx = (int(x) for x in c.split("x"))
            case(hq, hkv, batch, ctx, bw, sweep=c in args.sweep.split(","))


if __name__ == "__main__":
    main()
