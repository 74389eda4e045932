"""Where a decode step's time goes: GPU kernel time per step by kernel, against the step's wall time.

    python scripts/profile_decode.py WORKSPACE [--batch 1,16] [--steps 20] [--eager] [--sync] [--tp 2]
        [--w4a16-tuned tune.json]

Runs `batch` sequences (prompt 128 tokens unless --prompt) into steady decode, then records `steps` decode steps
with torch.profiler (CUDA activity; kernels inside CUDA graph replays are recorded too) and prints,
per step: wall time, summed kernel time, the gap between them (host work and idle GPU), and the
kernels by total time. Device run; on the CPU it prints the wall time only. By default decode
steps run asynchronously (EngineConfig.async_steps: step n+1 is launched before step n's tokens are
read back, so the host work hides behind the GPU); --sync turns that off to compare.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile(llm: LLM, batch: int, steps: int, prompt: int = 128) -> None:
    engine = llm.engine
    g = torch.Generator().manual_seed(batch)
    warm = 20 + -(-batch * prompt // engine.ecfg.max_num_batched_tokens)
    for _ in range(batch):
        ids = torch.randint(3, min(engine.cfg.vocab_size, 30000), (prompt,), generator=g).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=steps + warm + 20, temperature=0, ignore_eos=True))
    for _ in range(warm):   # the prefill chunks and a few decode steps: warm
        engine.step()
    _sync()
    activities = [torch.profiler.ProfilerActivity.CUDA if torch.cuda.is_available() else torch.profiler.ProfilerActivity.CPU]
    ahead = engine.steps_ahead
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync()
        wall = (time.perf_counter() - t0) / steps
    ahead = engine.steps_ahead - ahead
    while engine.has_unfinished():
        engine.step()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    gpu = sum(r[0] for r in rows) / 1e3
    print(f"batch {batch}: wall {wall * 1e3:.3f} ms/step, kernels {gpu:.3f} ms/step, "
          f"gap {wall * 1e3 - gpu:.3f} ms/step; {ahead}/{steps} steps launched ahead (async)")
    for us, n, name in rows[:30]:
        print(f"  {us:9.1f} us  x{n:5.1f}  {name[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--sync", action="store_true", help="no asynchronous decode steps (async_steps=False)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence (the context decode reads)")
    ap.add_argument("--kv", default=None, help="quant_policy of the KV cache: 8 or 4 (default fp16)")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: the workspace's); "
                    "the profile is rank 0's")
    ap.add_argument("--w4a16-tuned", help="JSON of tune_w4a16.py --json: int4 GEMV configs to run with (one rank)")
    args = ap.parse_args()
    if args.w4a16_tuned:
        from lmdepot.runtime.kernels import w4a16_gemv

        with open(args.w4a16_tuned) as f:
            w4a16_gemv.TUNED.update({(e["K"], e["N"]): e["config"] for e in json.load(f)})
    batches = [int(x) for x in args.batch.split(",")]
    kw = ({"quant_policy": int(args.kv)} if args.kv else {}) | ({"tp": args.tp} if args.tp else {})
    llm = LLM(args.workspace, eager=args.eager, async_steps=not args.sync, verify=False,
              max_batch_size=max(batches), **kw)
    try:
        for b in batches:
            profile(llm, b, args.steps, args.prompt)
    finally:
        llm.close()


if __name__ == "__main__":
    main()
