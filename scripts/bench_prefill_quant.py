"""GPU timing of prefill/extend attention over an int8 / int4 paged cache: the Triton kernel
(kernels/prefill_attention_quant.py) vs the torch reference it replaces (ops/reference.py) and the
float cache's prefill kernel on the same shapes. Llama-3-8B attention (32 q / 8 kv heads, head_dim
128), pages of 64, fp16. Run from the repo root:

PYTHONPATH=. python scripts/bench_prefill_quant.py [--sweep]   (--sweep: also times each tile config
    of CONFIGS, passed to the launcher as `config`, on every case and scheme, and marks the fastest)
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from lmdepot.runtime.context import Context, SeqSlice
from lmdepot.runtime.kernels.prefill_attention import prefill_attention
from lmdepot.runtime.kernels.prefill_attention_quant import prefill_attention_quant
from lmdepot.runtime.kv_cache import allocate, make_spec
from lmdepot.runtime.ops import reference
from lmdepot.runtime.ops.kv_quant import store_kv_quant

CASES = (("prefill 1x4096", [(4096, 4096)]), ("extend 4x1024 +1024 cached", [(1024, 2048)] * 4),
         ("mixed 4x512 + 64 decodes @2048", [(512, 512)] * 4 + [(1, 2048)] * 64))
PAGE, HQ, HKV, D, DT = 64, 32, 8, 128, torch.float16
# block_m x block_n tiles, warps, pipeline stages (below 5 every wait in the loops drains the pipeline:
# prefill_attention_quant.default_config)
CONFIGS = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st) for m, n, w, st in (
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 5), (128, 32, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3),
    (64, 64, 4, 5), (64, 32, 4, 2))]


def sweep(run, want) -> None:
    """Time `run(config)` for every config of CONFIGS; each line: ms, max |diff| from `want`, config."""
    times = []
    for cfg in CONFIGS:
        try:
            diff = (run(cfg).float() - want).abs().max().item()
            times.append((do_bench(lambda: run(cfg)), diff, str(cfg)))
        except Exception as exc:   # out of resources for a config: say so, go on
            print(f"      {cfg}: {type(exc).__name__}")
    for t, diff, cfg in sorted(times):
        print(f"      {t:9.3f} ms  max|diff| {diff:.4f}  {cfg}{'  <- best' if t == min(times)[0] else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time every tile config of CONFIGS")
    args = ap.parse_args()
    dev = "cuda"
    print(f"{torch.cuda.get_device_name()}  32q/8kv d128 page 64 fp16; ms (do_bench)")
    print(f"{'case':34} {'kv':14} {'triton quant':>12} {'torch ref':>10} {'float kernel':>12} {'max |diff|':>10}")
    for name, seqs in CASES:
        pages = [-(-n // PAGE) for _, n in seqs]
        perm = torch.randperm(sum(pages)).tolist()
        tables = torch.zeros(len(seqs), max(pages), dtype=torch.int32)
        for i, p in enumerate(pages):
            tables[i, :p] = torch.tensor(perm[sum(pages[:i]):sum(pages[:i]) + p])
        tables = tables.to(dev)
        starts = torch.tensor([0] + [q for q, _ in seqs]).cumsum(0).to(dev, torch.int32)
        lens = torch.tensor([n for _, n in seqs], device=dev, dtype=torch.int32)
        q = torch.randn(int(starts[-1]), HQ, D, device=dev, dtype=DT)
        slots = torch.cat([(tables[i, :p].long()[:, None] * PAGE + torch.arange(PAGE, device=dev)).reshape(-1)[:n]
                           for i, (p, (_, n)) in enumerate(zip(pages, seqs))])
        k = torch.randn(len(slots), HKV, D, device=dev, dtype=DT)
        v = torch.randn_like(k)
        kf, vf = (torch.zeros(sum(pages), PAGE, HKV, D, device=dev, dtype=DT) for _ in range(2))
        reference.store_kv(k, v, kf, vf, slots)
        t_float = do_bench(lambda: prefill_attention(q, kf, vf, tables, starts, lens, max(ql for ql, _ in seqs)))
        ctx = Context(slots, [SeqSlice(int(starts[i]), ql, n, tables[i].long()) for i, (ql, n) in enumerate(seqs)],
                      PAGE, block_tables=tables, context_lens=lens, q_start_loc=starts,
                      max_q_len=max(ql for ql, _ in seqs), max_ctx_len=max(n for _, n in seqs))
        for bits, scheme in ((8, "plain"), (4, "rotate"), (4, "channel")):
            cache = allocate(make_spec(bits, DT, D, scheme=scheme), sum(pages), PAGE, HKV, D, device=dev)
            store_kv_quant(k, v, cache, slots)

            def run(config=None, cache=cache):
                return prefill_attention_quant(q, cache, tables, starts, lens, ctx.max_q_len, config=config)

            ref = lambda: reference.paged_attention_quant(q, k, v, cache, ctx, D ** -0.5)   # noqa: E731
            want = ref().float()
            diff = (run().float() - want).abs().max().item()
            t_kernel, t_ref = do_bench(run), do_bench(ref, warmup=1, rep=1)
            print(f"{name:34} int{bits} {scheme:9} {t_kernel:12.3f} {t_ref:10.2f} {t_float:12.3f} {diff:10.4f}")
            if args.sweep:
                sweep(run, want)


if __name__ == "__main__":
    main()
