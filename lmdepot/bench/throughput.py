"""`lmdepot bench throughput`: N requests through the offline engine (continuous batching), output
tok/s and req/s; with `--peer hf`, HF transformers' continuous-batching `generate_batch` on the same
requests in the same run, and the ratio.

Requests come from a seeded distribution (the issue's anchor: 256 requests, prompts uniform 64-512,
256 output tokens) or a ShareGPT file; all run with ignore_eos so both sides emit the same tokens.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmdepot.bench.builds import describe
from lmdepot.bench.models import prepare
from lmdepot.bench.offline import open_llm, run_offline, step_bytes, warmup
from lmdepot.bench.workload import (Request, bandwidth, device_of, dump, header, load_sharegpt, meta, peak_memory,
                                    release, reset_peak, sharegpt, synthetic, sync)


def hf_generate_batch(hf_dir: Path, requests: list[Request], device: str) -> dict:
    """HF's continuous batching (transformers >= 4.56) on the same requests; {"error": ...} when unavailable."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    if not hasattr(transformers.GenerationMixin, "generate_batch"):
        return {"error": f"transformers {transformers.__version__} has no generate_batch (needs >= 4.56)"}
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    max_new = max(r.output_len for r in requests)
    if any(r.output_len != max_new for r in requests):
        return {"error": "generate_batch takes one max_new_tokens; use a fixed --output for the HF peer"}
    model, impl, load_errors = None, None, []
    # The paged implementation's name moved across versions: 4.56-4.57 "sdpa_paged", 5.x "paged|sdpa",
    # later plain "sdpa" (generate_batch switches to paged attention itself).
    for impl in ("paged|sdpa", "sdpa", "sdpa_paged"):
        try:
            model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation=impl)
            break
        except (ValueError, ImportError) as exc:
            load_errors.append(f"{impl}: {str(exc).splitlines()[0][:120]}")
    if model is None:
        return {"error": "no paged attention implementation loads: " + "; ".join(load_errors)}
    model = model.to(device).eval()
    inputs = [list(r.prompt_ids) for r in requests]
    # eos_token_id=-1: no token ever matches, so every request emits exactly max_new tokens (ignore_eos)
    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kw = {}
    if not device.startswith("cuda"):  # sized to the workload: HF's default sizing zeroes GBs on the CPU
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        blocks = sum(-(-(len(p) + max_new) // 64) for p in inputs) + 4
        kw["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=blocks, page_size=64)
    # A first full run sizes the manager for this workload and captures its CUDA graphs; with a
    # persistent manager the timed run reuses it, as our engine reuses its warm state.
    persistent = "persistent_manager" in inspect.signature(model.generate_batch).parameters
    if persistent:
        kw["persistent_manager"] = True
    try:
        model.generate_batch(inputs=inputs, generation_config=gen, **kw)
        sync(device)
        t = time.perf_counter()
        out = model.generate_batch(inputs=inputs, generation_config=gen, **kw)
        sync(device)
        elapsed = time.perf_counter() - t
        if persistent:
            model.destroy_cached_continuous_batching_manager()
    except Exception as exc:  # noqa: BLE001 - the API is young and differs across versions; report, don't crash
        return {"error": f"generate_batch failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    del model
    n_out = sum(len(o.generated_tokens) for o in out.values())
    return {"impl": f"generate_batch attn={impl} transformers {transformers.__version__}", "requests": len(out),
            "output_tokens": n_out, "elapsed_s": elapsed, "output_tok_s": n_out / elapsed,
            "req_s": len(requests) / elapsed}


def make_requests(n: int, prompt: tuple[int, int], output: tuple[int, int], seed: int, vocab: int,
                  pairs: list | None, tokenizer, session_len: int | None) -> list[Request]:
    if pairs:
        return sharegpt(pairs, tokenizer, n, seed, max_len=session_len - 1 if session_len else None)
    return synthetic(n, prompt, output, vocab, seed)


def run(model: str | None = None, shape: str | None = "llama2-7b", layers: int | None = None, n: int = 256,
        prompt=(64, 512), output=(256, 256), seed: int = 0, dataset: str | None = None, peer: str | None = None,
        device: str = "auto", quant_policy: int = 0, kv_scales: str = "online", int4: bool = False,
        max_batch_size: int | None = None, cache_max_entry_count: float | None = None,
        json_path: str | None = None, hf: str | None = None, tp: int = 1, eager: bool = False,
        max_num_batched_tokens: int | None = None) -> tuple[dict, str]:
    device = device_of(device)
    pairs = load_sharegpt(dataset) if dataset else None  # a bad file fails before a model is built
    bw = bandwidth(device)
    with tempfile.TemporaryDirectory(prefix="lmdepot-bench-") as tmp:
        hf_dir, ws = prepare(model, shape, layers, Path(tmp), int4, hf, tp=tp)
        session_len = None if dataset else prompt[1] + output[1] + 8
        llm = open_llm(ws, device, max_batch_size or 256, session_len, quant_policy, kv_scales,
                       cache_max_entry_count, eager=eager, max_num_batched_tokens=max_num_batched_tokens)
        try:
            vocab = llm.engine.cfg.vocab_size
            requests = make_requests(n, prompt, output, seed, vocab, pairs, llm.tokenizer, llm.engine.session_len)
            warmup(llm, vocab, requests)
            reset_peak(device)
            engine = run_offline(llm, requests, device).summary()
            engine["peak_memory_GB"] = peak_memory(device) / 1e9
            weights, kv_token = step_bytes(llm)
            num_layer = llm.engine.cfg.num_layer
            ranks = llm.engine.ecfg.tp
            budget = llm.engine.ecfg.max_num_batched_tokens
            num_blocks, block_size = llm.engine.bm.num_blocks, llm.engine.bm.block_size
        finally:
            llm.close()
            release(device)
        result = {"engine": engine}
        result["meta"] = meta(device, bw, bench="throughput", model=model or shape,
                              layers=num_layer, tp=ranks, max_num_batched_tokens=budget,
                              requests=len(requests), dataset=dataset, seed=seed,
                              prompt_tokens=sum(len(r.prompt_ids) for r in requests),
                              expected_output_tokens=sum(r.output_len for r in requests),
                              quant_policy=quant_policy, kv_scales=kv_scales, int4=int4, weight_bytes=weights,
                              kv_bytes_per_token=kv_token, kv_cache_tokens=num_blocks * block_size)
        if peer == "hf":
            # the engine's numbers first: the peer takes minutes, and a run cut short keeps them
            dump(result, json_path)
            print(f"[lmdepot] engine: {engine['output_tok_s']:.1f} out tok/s in {engine['elapsed_s']:.2f} s;"
                  " running the HF peer", file=sys.stderr, flush=True)
            result["hf"] = hf_generate_batch(hf_dir, requests, device) if hf_dir is not None else \
                {"error": "the HF peer needs an HF checkpoint (--shape, --hf, or --model pointing at one)"}
            if "output_tok_s" in result["hf"]:
                result["engine_vs_hf"] = engine["output_tok_s"] / result["hf"]["output_tok_s"]
    dump(result, json_path)
    return result, render(result)


def render(result: dict) -> str:
    m, e = result["meta"], result["engine"]
    lines = header(m) + [
        f"model {m['model']} layers {m['layers']}  {m['requests']} requests  prompt tokens {m['prompt_tokens']}"
        f"  output tokens {m['expected_output_tokens']}  quant_policy {m['quant_policy']}"
        f"  KV cache {m['kv_cache_tokens']} tokens  step budget {m['max_num_batched_tokens']} tokens", "",
        f"{'':10} {'out tok/s':>10} {'req/s':>8} {'elapsed s':>10} {'TTFT p50 ms':>12} {'ITL p50 ms':>11}",
        f"{'lmdepot':10} {e['output_tok_s']:10.1f} {e['req_s']:8.2f} {e['elapsed_s']:10.2f}"
        f" {e['ttft_ms']['p50']:12.1f} {e['itl_ms']['p50']:11.2f}"]
    builds = describe(e.get("triton_builds"))
    if builds:   # compilation inside the timed run: a fresh machine's numbers
        lines.append(f"{'':10} ({builds})")
    hf = result.get("hf")
    if hf and "error" in hf:
        lines.append(f"{'HF':10} unavailable: {hf['error']}")
    elif hf:
        lines.append(f"{'HF':10} {hf['output_tok_s']:10.1f} {hf['req_s']:8.2f} {hf['elapsed_s']:10.2f}"
                     f"   ({hf['impl']})")
        lines.append(f"lmdepot / HF: {result['engine_vs_hf']:.2f}x")
    return "\n".join(lines) + "\n"
