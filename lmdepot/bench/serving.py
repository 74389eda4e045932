"""`lmdepot bench serving`: the throughput workload through the OpenAI HTTP server, streamed.

The server is `lmdepot serve api_server` started here as a subprocess on a free local port (or a
running one at `--url`). Requests go to /v1/completions as token-id prompts with ignore_eos and
stream_options.include_usage, at most `--concurrency` at a time. TTFT: submit -> first streamed
chunk; ITL: gaps between a request's chunks (a chunk carries the text of one or more tokens; the
server holds back tokens whose text is not final); token counts come from the usage chunk.
`--compare-offline` runs the same requests through the engine without the server afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmdepot.bench.models import prepare
from lmdepot.bench.offline import open_llm, run_offline, warmup
from lmdepot.bench.throughput import make_requests
from lmdepot.bench.workload import (BenchError, Request, bandwidth, device_of, dump, header, load_sharegpt, meta,
                                    percentiles, release)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ws: Path, device: str, port: int, max_batch_size: int, session_len: int | None,
                 quant_policy: int, kv_scales: str, queue: int, log: Path, timeout: float = 600.0,
                 max_num_batched_tokens: int | None = None):
    cmd = [sys.executable, "-m", "lmdepot.cli", "serve", "api_server", str(ws), "--server-name", "127.0.0.1",
           "--server-port", str(port), "--max-batch-size", str(max_batch_size), "--quant-policy", str(quant_policy),
           "--kv-scales", kv_scales, "--max-queued-requests", str(queue), "--log-level", "WARNING",
           "--model-name", "bench", "--dtype", "fp16" if device.startswith("cuda") else "auto"]
    if session_len:
        cmd += ["--session-len", str(session_len)]
    if max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    env = dict(os.environ, LMDEPOT_DEVICE=device)
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise BenchError(f"the api_server exited with {proc.returncode}: {tail[0]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise BenchError(f"the api_server did not answer /health within {timeout:.0f} s (log: {log})")


async def _one(session, url: str, model: str, req: Request, sem, start: float, out: list, i: int) -> None:
    import aiohttp

    body = {"model": model, "prompt": list(req.prompt_ids), "max_tokens": req.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    async with sem:
        t0 = time.perf_counter()
        times, tokens, error = [], 0, None
        try:
            async with session.post(url + "/v1/completions", json=body) as resp:
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                else:
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = chunk["error"].get("message")
                        if chunk.get("choices"):
                            times.append(time.perf_counter() - t0)
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:  # counted, not fatal
            error = f"{type(exc).__name__}: {exc}"
        out[i] = {"submit": t0 - start, "times": times, "tokens": tokens, "error": error}


async def _client(url: str, model: str, requests: list[Request], concurrency: int) -> tuple[list, float]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    out: list = [None] * len(requests)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(_one(session, url, model, r, sem, start, out, i) for i, r in enumerate(requests)))
        return out, time.perf_counter() - start


def summarize(results: list, elapsed: float) -> dict:
    ok = [r for r in results if r["error"] is None and r["tokens"] > 0]
    n_out = sum(r["tokens"] for r in ok)
    ttft = [r["times"][0] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    errors = [r["error"] for r in results if r["error"]]
    return {"requests": len(results), "completed": len(ok), "errors": len(errors),
            "first_error": errors[0] if errors else None, "output_tokens": n_out, "elapsed_s": elapsed,
            "output_tok_s": n_out / elapsed, "req_s": len(ok) / elapsed,
            "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl)}


def run(model: str | None = None, shape: str | None = "llama2-7b", layers: int | None = None, url: str | None = None,
        n: int = 256, prompt=(64, 512), output=(256, 256), seed: int = 0, dataset: str | None = None,
        concurrency: int = 64, compare_offline: bool = False, device: str = "auto", quant_policy: int = 0,
        kv_scales: str = "online", int4: bool = False, max_batch_size: int | None = None,
        json_path: str | None = None, tp: int = 1, max_num_batched_tokens: int | None = None) -> tuple[dict, str]:
    device = device_of(device)
    pairs = load_sharegpt(dataset) if dataset else None  # a bad file fails before a model is built
    if url and not model and (compare_offline or dataset):
        raise BenchError("--url: --dataset and --compare-offline need the workspace too; add --model")
    if url and max_num_batched_tokens and not compare_offline:
        raise BenchError("--max-num-batched-tokens: the server at --url keeps the budget it was started with"
                         " (it applies here only to a server this bench starts, and to --compare-offline)")
    bw = bandwidth(device)
    batch = max_batch_size or concurrency
    with tempfile.TemporaryDirectory(prefix="lmdepot-bench-") as tmp:
        proc, ws, session_len = None, None, None
        if model or not url:
            _, ws = prepare(model, shape, layers, Path(tmp), int4, tp=tp)
            from lmdepot.runtime.engine import load_tokenizer
            from lmdepot.runtime.loader import read_config

            cfg = read_config(ws, None)
            session_len = None if dataset else prompt[1] + output[1] + 8
            requests = make_requests(n, prompt, output, seed, cfg.vocab_size, pairs, load_tokenizer(ws),
                                     session_len or cfg.session_len)
        else:  # a running server and no workspace: ids below 100 are valid in any vocabulary
            requests = make_requests(n, prompt, output, seed, 100, None, None, None)
        if not url:
            proc, url = start_server(ws, device, free_port(), batch, session_len, quant_policy, kv_scales, n,
                                     Path(tmp) / "server.log", max_num_batched_tokens=max_num_batched_tokens)
        try:
            asyncio.run(_client(url, "bench" if proc else _served_model(url), requests[:2], 2))  # warmup
            results, elapsed = asyncio.run(_client(url, "bench" if proc else _served_model(url), requests,
                                                   concurrency))
        finally:
            if proc is not None:
                proc.terminate()  # graceful: streams in flight finish, then the engine closes
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        result = {"serving": summarize(results, elapsed)}
        if compare_offline:
            llm = open_llm(ws, device, batch, session_len, quant_policy, kv_scales,
                           max_num_batched_tokens=max_num_batched_tokens)
            try:
                warmup(llm, llm.engine.cfg.vocab_size)
                result["offline"] = run_offline(llm, requests, device).summary()
            finally:
                llm.close()
                release(device)
            result["serving_vs_offline"] = result["serving"]["output_tok_s"] / result["offline"]["output_tok_s"]
    result["meta"] = meta(device, bw, bench="serving", model=model or url or shape, layers=layers,
                          requests=len(requests), concurrency=concurrency, max_batch_size=batch, dataset=dataset,
                          max_num_batched_tokens=None if proc is None else max_num_batched_tokens or _default_budget(),
                          seed=seed, expected_output_tokens=sum(r.output_len for r in requests),
                          quant_policy=quant_policy, kv_scales=kv_scales, int4=int4)
    dump(result, json_path)
    return result, render(result)


def _default_budget() -> int:
    from lmdepot.runtime.config import EngineConfig

    return EngineConfig.max_num_batched_tokens


def _served_model(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def render(result: dict) -> str:
    m, s = result["meta"], result["serving"]
    lines = header(m) + [
        f"model {m['model']}  {m['requests']} requests  concurrency {m['concurrency']}"
        f"  output tokens expected {m['expected_output_tokens']}", "",
        f"{'':9} {'done':>5} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'p90':>8} {'p99':>8}"
        f" {'ITL p50':>8} {'p90':>7} {'p99':>7}  (ms)"]

    def row(name, d):
        return (f"{name:9} {d['completed']:5d} {d['output_tok_s']:10.1f} {d['req_s']:7.2f}"
                f" {d['ttft_ms']['p50']:9.1f} {d['ttft_ms']['p90']:8.1f} {d['ttft_ms']['p99']:8.1f}"
                f" {d['itl_ms']['p50']:8.2f} {d['itl_ms']['p90']:7.2f} {d['itl_ms']['p99']:7.2f}")

    lines.append(row("server", s))
    if s["errors"]:
        lines.append(f"{s['errors']} request(s) failed; first: {s['first_error']}")
    if "offline" in result:
        lines.append(row("offline", result["offline"]))
        lines.append(f"server / offline output tok/s: {result['serving_vs_offline']:.2f}")
    return "\n".join(lines) + "\n"
