"""`lmdepot bench generation`: first-token and per-token latency, output tok/s and peak memory over a
grid of concurrency x (prompt, output) lengths, beside the decode roofline measured in the same run.

Each grid point submits `concurrency` requests at once (prompt P, exactly O new tokens: ignore_eos)
and times every token. Roofline: a decode step must read the weights once plus the batch's KV
(context ~ P + O/2 on average), so roofline tok/s = concurrency x bandwidth / those bytes.
Optional peer: HF transformers' eager `generate` on the same checkpoint, batch = concurrency.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from lmdepot.bench.builds import describe
from lmdepot.bench.models import prepare
from lmdepot.bench.offline import open_llm, run_offline, step_bytes, warmup
from lmdepot.bench.workload import (Request, bandwidth, device_of, dump, header, meta, peak_memory, release,
                                    reset_peak, synthetic, sync)

DEFAULT_CASES = [(1, 128), (128, 128), (2048, 128), (128, 2048)]
DEFAULT_CONCURRENCY = [1, 16, 64]


def _hf_model(hf_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()


def _hf_decode(model, device: str, batch: int, prompt_len: int, output_len: int) -> dict:
    """HF eager generate, greedy, exactly output_len tokens: prefill time and decode tok/s."""
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, prompt_len), device=device)

    def run(n):
        sync(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t

    run(2)
    prefill = run(1)
    total = run(output_len)
    return {"ttft_ms": 1e3 * prefill, "decode_tok_s": batch * (output_len - 1) / max(total - prefill, 1e-9)}


def point(llm, device: str, bw: float, concurrency: int, prompt_len: int, output_len: int, vocab: int,
          seed: int = 0) -> dict:
    reqs = [Request(r.prompt_ids, output_len)
            for r in synthetic(concurrency, (prompt_len, prompt_len), (output_len, output_len), vocab, seed)]
    reset_peak(device)
    timing = run_offline(llm, reqs, device)
    s = timing.summary()
    all_first = max(t[0] for t in timing.token_times)
    decode_s = timing.elapsed - all_first
    decode_tok_s = concurrency * (output_len - 1) / decode_s if output_len > 1 and decode_s > 0 else math.nan
    weights, kv_token = step_bytes(llm)
    roof = concurrency * bw / (weights + concurrency * (prompt_len + output_len // 2) * kv_token)
    return {"concurrency": concurrency, "prompt_len": prompt_len, "output_len": output_len,
            "completed": s["completed"], "output_tokens": s["output_tokens"],
            "first_token_ms": s["ttft_ms"], "per_token_ms": s["itl_ms"], "output_tok_s": s["output_tok_s"],
            "decode_tok_s": decode_tok_s, "roofline_tok_s": roof, "roofline_pct": 100 * decode_tok_s / roof,
            "peak_memory_GB": peak_memory(device) / 1e9, "triton_builds": s["triton_builds"]}


def run(model: str | None = None, shape: str | None = "llama2-7b", layers: int | None = None,
        concurrency=tuple(DEFAULT_CONCURRENCY), cases=tuple(DEFAULT_CASES), peer: str | None = None,
        device: str = "auto", quant_policy: int = 0, kv_scales: str = "online", int4: bool = False,
        cache_max_entry_count: float | None = None, json_path: str | None = None,
        hf: str | None = None, tp: int = 1, eager: bool = False,
        max_num_batched_tokens: int | None = None) -> tuple[dict, str]:
    device = device_of(device)
    bw = bandwidth(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmdepot-bench-") as tmp:
        hf_dir, ws = prepare(model, shape, layers, Path(tmp), int4, hf, tp=tp)
        session_len = max(p + o for p, o in cases) + 8
        llm = open_llm(ws, device, max(concurrency), session_len, quant_policy, kv_scales, cache_max_entry_count,
                       eager=eager, max_num_batched_tokens=max_num_batched_tokens)
        try:
            vocab = llm.engine.cfg.vocab_size
            warmup(llm, vocab)
            weights, kv_token = step_bytes(llm)
            num_layer = llm.engine.cfg.num_layer
            ranks = llm.engine.ecfg.tp
            budget = llm.engine.ecfg.max_num_batched_tokens
            for p, o in cases:
                for c in concurrency:
                    rows.append(point(llm, device, bw, c, p, o, vocab))
        finally:
            llm.close()
            release(device)
        if peer == "hf":
            if hf_dir is None:
                why = "the HF peer needs an HF checkpoint (--shape, --hf, or --model pointing at one)"
                for r in rows:
                    r["hf"] = {"error": why}
            else:
                hf_model = _hf_model(hf_dir, device)
                for r in rows:
                    r["hf"] = _hf_decode(hf_model, device, r["concurrency"], r["prompt_len"], r["output_len"])
                    r["engine_vs_hf"] = r["decode_tok_s"] / r["hf"]["decode_tok_s"]
                    release(device)
                del hf_model
    m = meta(device, bw, bench="generation", model=model or shape,
             layers=num_layer, tp=ranks, max_num_batched_tokens=budget,
             quant_policy=quant_policy, kv_scales=kv_scales, int4=int4, weight_bytes=weights,
             kv_bytes_per_token=kv_token)
    result = {"meta": m, "rows": rows}
    dump(result, json_path)
    return result, render(result)


def render(result: dict) -> str:
    m = result["meta"]
    lines = header(m) + [f"model {m['model']} layers {m['layers']}  weights {m['weight_bytes'] / 1e9:.2f} GB"
                         f"  KV {m['kv_bytes_per_token'] / 1e3:.1f} kB/token  quant_policy {m['quant_policy']}"
                         f"  step budget {m['max_num_batched_tokens']} tokens", "",
                         f"{'conc':>5} {'prompt':>7} {'output':>7} {'1st tok ms':>11} {'tok p50':>8} {'p90':>8}"
                         f" {'p99':>8} {'out tok/s':>10} {'roofline':>9} {'peak GB':>8} {'vs HF':>6}"]
    for r in result["rows"]:
        ratio = f"{r['engine_vs_hf']:5.2f}x" if "engine_vs_hf" in r else ""
        lines.append(f"{r['concurrency']:5d} {r['prompt_len']:7d} {r['output_len']:7d}"
                     f" {r['first_token_ms']['p50']:11.1f} {r['per_token_ms']['p50']:8.2f}"
                     f" {r['per_token_ms']['p90']:8.2f} {r['per_token_ms']['p99']:8.2f} {r['output_tok_s']:10.1f}"
                     f" {r['roofline_pct']:8.1f}% {r['peak_memory_GB']:8.2f} {ratio:>6}")
    for r in result["rows"]:   # compilation inside a timed point: a fresh machine's numbers
        builds = describe(r.get("triton_builds"))
        if builds:
            lines.append(f"  {r['concurrency']} x {r['prompt_len']}x{r['output_len']} {builds}")
    errors = {r["hf"]["error"] for r in result["rows"] if "error" in r.get("hf", {})}
    lines += [f"HF peer unavailable: {e}" for e in sorted(errors)]
    return "\n".join(lines) + "\n"
