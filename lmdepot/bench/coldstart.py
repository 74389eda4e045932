"""`lmdepot bench coldstart`: registry tag -> first token, each phase timed (target: <= 15 s for a 7B int4).

Phases: pull (resolve the tag, fetch and hash every blob into a fresh cache dir, materialize the
snapshot), load (weights onto the device, KV cache allocated; the manifest re-hash is skipped
because pull has just hashed every blob) and first token (one greedy token of a short prompt).
Without `--registry`, the workspace is pushed first to a local file:// registry in a temp dir
(not timed). The OS page cache is not dropped: a truly cold disk read is slower than this.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lmdepot.bench.models import prepare
from lmdepot.bench.workload import BenchError, bandwidth, device_of, dump, header, meta, sync


def run(model: str | None = None, shape: str | None = "llama2-7b", layers: int | None = None, int4: bool = False,
        registry: str | None = None, ref: str | None = None, device: str = "auto",
        json_path: str | None = None, tp: int = 1) -> tuple[dict, str]:
    from lmdepot.registry import Registry
    from lmdepot.runtime.llm import LLM
    from lmdepot.runtime.sequence import SamplingParams

    device = device_of(device)
    if registry and not ref:
        raise BenchError("--registry needs --ref NAME:TAG (the version to pull)")
    bw = bandwidth(device)
    with tempfile.TemporaryDirectory(prefix="lmdepot-bench-") as tmp:
        tmp = Path(tmp)
        pushed = None
        if not registry:
            _, ws = prepare(model, shape, layers, tmp, int4, tp=tp)
            registry, ref = str(tmp / "registry"), ref or "bench:cold"
            t = time.perf_counter()
            Registry(registry, cache_dir=tmp / "push-cache").push(ws, ref, show_progress=False)
            pushed = time.perf_counter() - t
        phases = {}
        sync(device)
        t0 = time.perf_counter()
        path = Registry(registry, cache_dir=tmp / "fresh-cache").pull(ref, show_progress=False)
        phases["pull_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        llm = LLM(path, dtype="fp16" if device.startswith("cuda") else "auto", device=device, quiet=True,
                  verify=False, max_batch_size=1)
        sync(device)
        phases["load_s"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            out = llm.generate([list(range(3, 19))], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            phases["first_token_s"] = time.perf_counter() - t
            weight_bytes = sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))
            weight_type = llm.engine.cfg.weight_type
        finally:
            llm.close()
        phases["total_s"] = time.perf_counter() - t0
    result = {"phases": phases, "tokens": len(out[0].token_ids),
              "meta": meta(device, bw, bench="coldstart", model=model or shape, layers=layers,
                           weight_type=weight_type,
                           ref=ref, registry=registry if pushed is None else "file:// (temp, pushed here)",
                           push_s=pushed, weight_bytes=weight_bytes)}
    dump(result, json_path)
    return result, render(result)


def render(result: dict) -> str:
    m, p = result["meta"], result["phases"]
    lines = header(m) + [f"ref {m['ref']}  weights {m['weight_bytes'] / 1e9:.2f} GB  ({m['weight_type']})", ""]
    for k in ("pull_s", "load_s", "first_token_s", "total_s"):
        lines.append(f"{k[:-2]:12} {p[k]:8.2f} s")
    return "\n".join(lines) + "\n"
