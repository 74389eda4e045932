"""What every bench shares: the requests (seeded or ShareGPT), option parsing, run metadata, percentiles.

A request is a list of prompt token ids and an exact output length (benches run with ignore_eos,
so every engine and peer generates the same number of tokens and tok/s compare like for like).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmdepot.errors import LmdepotError


class BenchError(LmdepotError):
    """A bad bench input (a list, a dataset file, a model path)."""


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    output_len: int


def parse_ints(text: str, what: str, minimum: int = 1) -> list[int]:
    """'1,16,64' -> [1, 16, 64]; anything else is a one-line error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < minimum for v in values):
        raise BenchError(f"{what}: {text!r} is not a comma-separated list of integers >= {minimum}")
    return values


def parse_cases(text: str) -> list[tuple[int, int]]:
    """'1x128,128x2048' -> [(1, 128), (128, 2048)]: (prompt tokens, output tokens) pairs."""
    cases = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise BenchError(f"--cases: {item!r} is not PROMPTxOUTPUT (e.g. 128x128)")
        cases.append((int(parts[0]), int(parts[1])))
    if not cases:
        raise BenchError("--cases: empty list")
    return cases


def parse_range(text: str, what: str) -> tuple[int, int]:
    """'64-512' (uniform, inclusive) or '256' (fixed) -> (lo, hi)."""
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise BenchError(f"{what}: {text!r} is not N or LO-HI") from None
    if lo_i < 1 or hi_i < lo_i:
        raise BenchError(f"{what}: {text!r} needs 1 <= LO <= HI")
    return lo_i, hi_i


def synthetic(n: int, prompt: tuple[int, int], output: tuple[int, int], vocab: int, seed: int = 0) -> list[Request]:
    """n requests with uniform prompt/output lengths and token ids in [3, vocab), one seed -> one workload."""
    rng = random.Random(seed)
    hi_tok = max(4, min(vocab, 32000))  # ids below 3 are <unk>/<s>/</s> in our synthetic vocabularies
    out = []
    for _ in range(n):
        p = rng.randint(*prompt)
        out.append(Request(tuple(rng.randrange(3, hi_tok) for _ in range(p)), rng.randint(*output)))
    return out


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """ShareGPT JSON -> (first human turn, the gpt reply after it) pairs; checked before any model is built.

    Conversations that do not start with a human turn followed by a gpt turn are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"--dataset: {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"--dataset: {path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise BenchError(f"--dataset: {path}: expected a JSON list of {{\"conversations\": [...]}} objects")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            continue
        if turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    if not pairs:
        raise BenchError(f"--dataset: {path}: no usable conversation (a human turn followed by a gpt turn)")
    return pairs


def sharegpt(pairs: list[tuple[str, str]], tokenizer, n: int | None, seed: int = 0,
             max_len: int | None = None) -> list[Request]:
    """Requests as LMDeploy's profile_throughput makes them: prompt = the human turn tokenized, output
    length = the gpt reply's token count. Empty pairs and pairs longer than max_len (prompt + output:
    they would not fit a session) are dropped; with n, n requests are drawn (seeded)."""
    reqs = []
    for human, gpt in pairs:
        prompt = tokenizer.encode(human, add_special_tokens=False)
        output = len(tokenizer.encode(gpt, add_special_tokens=False))
        if prompt and output and not (max_len and len(prompt) + output > max_len):
            reqs.append(Request(tuple(prompt), output))
    if not reqs:
        raise BenchError(f"--dataset: no conversation fits (session length {max_len})")
    if n is not None:
        rng = random.Random(seed)
        reqs = [reqs[i] for i in rng.sample(range(len(reqs)), n)] if n <= len(reqs) else \
            [rng.choice(reqs) for _ in range(n)]
    return reqs


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles in ms ({"p50": ..}); NaN for no samples (e.g. 1-token outputs have no ITL)."""
    if not values:
        return {f"p{q}": math.nan for q in qs}
    s = sorted(values)
    return {f"p{q}": 1e3 * s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] for q in qs}


def device_of(device: str) -> str:
    if device == "auto":
        return os.environ.get("LMDEPOT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return device


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth(device: str) -> float:
    """Copy bandwidth (bytes/s, read + write) measured now; on the CPU a small plain-timer copy."""
    if device.startswith("cuda"):
        from lmdepot.bench.kernels import copy_bandwidth

        bw = copy_bandwidth("cuda")
        release(device)  # its 2 GiB of buffers stay cached otherwise, out of a server subprocess's reach
        return bw
    src = torch.empty(1 << 24, dtype=torch.float16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 5 * 2 * src.numel() * 2 / (time.perf_counter() - t)


def release(device: str) -> None:
    """Give cached GPU blocks back (after an engine closes), so the next engine or peer finds them free."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> int:
    """Peak bytes: allocated on the GPU since reset_peak; on the CPU the process's max RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def meta(device: str, bw: float, **extra) -> dict:
    import transformers
    import triton

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"device": name, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "copy_bandwidth_GBps": bw / 1e9, **extra}


def dump(result: dict, json_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=float) + "\n")


def header(m: dict) -> list[str]:
    return [f"device {m['device']}  date {m['date']}  torch {m['torch']}  triton {m['triton']}"
            f"  transformers {m['transformers']}",
            f"measured copy bandwidth: {m['copy_bandwidth_GBps']:.1f} GB/s"]
