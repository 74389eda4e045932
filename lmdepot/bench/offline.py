"""The engine driven directly (no server): open it, run requests, time every token of every request.

Shared by `bench generation`, `bench throughput` and `bench serving --compare-offline`, so the three
measure the same engine the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lmdepot.bench.builds import record_builds, summary as builds_summary
from lmdepot.bench.workload import Request, percentiles, sync


# `warmup` on the workload: up to this many of its requests, prompts cut to one step's token budget,
# at most this many steps' worth of prompt tokens in all, and enough new tokens each that 16+
# sequences decode beside prefill chunks (the mixed steps' decode-kernel split)
WARMUP_REQUESTS, WARMUP_STEPS, WARMUP_TOKENS = 64, 16, 24


@dataclass
class Timing:
    """Wall-clock seconds from the submit of all requests: each request's token times."""
    token_times: list[list[float]] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    elapsed: float = 0.0
    builds: list = field(default_factory=list)   # (kernel, seconds) of Triton builds inside the timed run

    def summary(self) -> dict:
        n_out = sum(self.token_counts)
        firsts = [t[0] for t in self.token_times if t]
        itl = [b - a for t in self.token_times for a, b in zip(t, t[1:])]
        return {"requests": len(self.token_counts), "completed": sum(1 for c in self.token_counts if c > 0),
                "output_tokens": n_out, "elapsed_s": self.elapsed,
                "output_tok_s": n_out / self.elapsed if self.elapsed else 0.0,
                "req_s": len(self.token_counts) / self.elapsed if self.elapsed else 0.0,
                "ttft_ms": percentiles(firsts), "itl_ms": percentiles(itl), "triton_builds": builds_summary(self.builds)}


def open_llm(ws: Path, device: str, max_batch_size: int, session_len: int | None = None, quant_policy: int = 0,
             kv_scales: str = "online", cache_max_entry_count: float | None = None, eager: bool = False,
             max_num_batched_tokens: int | None = None):
    from lmdepot.runtime.cli_options import batched_tokens_kwargs
    from lmdepot.runtime.llm import LLM

    dtype = "fp16" if device.startswith("cuda") else "auto"
    return LLM(ws, dtype=dtype, device=device, max_batch_size=max_batch_size, session_len=session_len,
               quant_policy=quant_policy, kv_scales=kv_scales, cache_max_entry_count=cache_max_entry_count,
               quiet=True, verify=False, eager=eager, **batched_tokens_kwargs(max_num_batched_tokens))


def run_offline(llm, requests: list[Request], device: str) -> Timing:
    """Submit every request at once (continuous batching admits what fits) and step until all finish."""
    from lmdepot.runtime.sequence import SamplingParams

    sync(device)
    with record_builds() as builds:
        start = time.perf_counter()
        seqs = [llm.engine.add_request(list(r.prompt_ids),
                                       SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
                for r in requests]
        index = {s.id: i for i, s in enumerate(seqs)}
        times: list[list[float]] = [[] for _ in requests]
        while llm.engine.has_unfinished():
            outs = llm.engine.step()
            now = time.perf_counter() - start  # tokens reach the host inside step(): no extra sync needed
            for out in outs:
                if out.token_id is not None and out.seq_id in index:
                    times[index[out.seq_id]].append(now)
        elapsed = time.perf_counter() - start
    return Timing(times, [len(s.output_ids) for s in seqs], elapsed, builds)


def warmup(llm, vocab: int, requests: list[Request] = ()) -> None:
    """Short requests first, so that first-call costs (kernel compilation, allocator growth) stay out of
    the numbers. Prompt lengths of both parities and multiples of 16 or not: Triton specializes
    kernels on the divisibility of their integer arguments and compiles each variant on first use;
    and 512, from which the prefill kernel takes its larger tiles (prefill_attention.default_config:
    at a step budget of 8,192 the 256-request run prefilled its one 512-token prompt whole and built
    that variant inside the timed run, 1.3 s; at 2,048 the prompt was chunked).
    Then requests of the workload's first prompt lengths together (WARMUP_*): the batched prefill,
    mixed prefill + decode steps and multi-sequence attention compile their variants too (a fresh GPU
    machine's first 256-request runs: TTFT p50 3.7-4.1 s against ~1 s warm). Their tokens differ
    from the workload's, so the prefix cache gives the timed run nothing."""
    from lmdepot.runtime.sequence import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for n in (8, 16, 17, 128, 512):
        if n + params.max_tokens > llm.engine.session_len:
            continue
        llm.generate([[3 + i % max(1, vocab - 3) for i in range(n)]], params)
    if requests:
        budget, span = llm.engine.ecfg.max_num_batched_tokens, max(1, vocab - 3)
        prompts, total = [], 0
        for r in requests[:WARMUP_REQUESTS]:
            ids = [3 + (t + 1) % span for t in r.prompt_ids[:budget]]
            if total + len(ids) > WARMUP_STEPS * budget:
                break
            prompts.append(ids)
            total += len(ids)
        room = llm.engine.session_len - max((len(p) for p in prompts), default=llm.engine.session_len)
        if room >= 1:
            llm.generate(prompts, SamplingParams(max_tokens=min(WARMUP_TOKENS, room), temperature=0, ignore_eos=True))


def step_bytes(llm) -> tuple[int, int]:
    """(weight bytes one rank reads per decode step, KV bytes per token of context on one rank).

    With tp ranks each GPU reads about 1/tp of the weights and of the KV, so the roofline per GPU
    with these per-rank bytes is the whole engine's roofline."""
    runner = llm.engine.runner
    cfg = runner.cfg
    tp = max(1, cfg.tensor_para_size)
    weight_bytes = sum(p.stat().st_size for p in Path(runner.workspace).rglob("*.safetensors")
                       if "kv_scales" not in p.name) // tp
    hkv = max(1, cfg.kv_head_num // tp)
    return weight_bytes, cfg.num_layer * runner.kv_spec.token_bytes(hkv, cfg.size_per_head)
