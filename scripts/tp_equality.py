"""tp=2 vs tp=1 on two workspaces of one checkpoint: logits, greedy tokens, decode latency, throughput.

    python scripts/tp_equality.py --tp1 WS_TP1 --tp2 WS_TP2 [--dtype bf16] [--json OUT.json]

WS may be a directory or a registry ref. Correctness (the issue's bar): the first decoding step's
logits over 16 prompts, relative error ||l2 - l1|| / ||l1|| <= 1e-2, and >= 95% of the 32-token
greedy continuations identical. Speed: decode latency per step at batch 1 (prompt 128, 128 new
tokens) and the output tokens/s of 256 requests (prompts of 64..512 tokens, 256 new tokens each).
Needs one GPU for tp=1 and two for tp=2; on the CPU (tiny workspaces) it runs the same code.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

from lmdepot.runtime.llm import LLM
from lmdepot.runtime.sequence import SamplingParams


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, min(vocab, 30000), (k,), generator=g).tolist() for k in lens]


def text_prompts(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """n windows of lo..hi tokens of natural text (the held-out part of Python's pydoc topics): a
    trained model's confident predictions there, unlike on random ids, survive bf16 rounding."""
    from lmdepot.convert.calib_data import _pydoc_parts

    ids = tokenizer.encode(_pydoc_parts()[1], add_special_tokens=False)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    starts = torch.randint(0, len(ids) - hi, (n,), generator=g).tolist()
    return [ids[s:s + k] for s, k in zip(starts, lens)]


def first_step_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits of the last prompt position from one prefill on an idle engine (its first blocks)."""
    n, bs = len(ids), engine.bm.block_size
    meta = {"tokens": ids, "positions": list(range(n)), "slots": list(range(n)),
            "seqs": [(n, n, list(range(-(-n // bs))))], "logit_rows": [n - 1]}
    return engine.runner.run(meta)[0].float()


def decode_latency(llm, prompt_len: int = 128, new: int = 128) -> tuple[float, float]:
    """(seconds per decode step at batch 1, of which rank 0 spent sending the step to the others)."""
    from lmdepot.runtime import tp

    engine = llm.engine
    ids = prompts(1, engine.cfg.vocab_size, prompt_len, prompt_len, 7)[0]
    llm.generate([ids[:16]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))   # warm-up
    seq = engine.add_request(ids, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    sent, send = [0.0], tp.send_step

    def timed_send(obj=None):
        t = time.perf_counter()
        try:
            return send(obj)
        finally:
            sent[0] += time.perf_counter() - t

    first = None
    tp.send_step = timed_send
    try:
        while engine.has_unfinished():
            engine.step()
            if first is None and seq.num_output >= 1:
                _sync()
                first, sent[0] = time.perf_counter(), 0.0
        _sync()
    finally:
        tp.send_step = send
    return (time.perf_counter() - first) / (new - 1), sent[0] / (new - 1)


def throughput(llm, requests: int, new: int = 256) -> dict:
    """The GPU issue's workload: prompts of 64..512 tokens, 256 new tokens each, ignore_eos."""
    reqs = prompts(requests, llm.engine.cfg.vocab_size, 64, 512, 11)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    _sync()
    start = time.perf_counter()
    outs = llm.generate(reqs, params)
    _sync()
    seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outs)
    return {"requests": requests, "prompt_tokens": sum(map(len, reqs)), "output_tokens": generated,
            "seconds": seconds, "output_tok_s": generated / seconds, "req_s": requests / seconds}


def measure(ws: str, tp: int, args) -> dict:
    t0 = time.perf_counter()
    llm = LLM(ws, tp=tp, dtype=args.dtype, max_batch_size=args.max_batch_size, verify=False)
    load_s = time.perf_counter() - t0
    try:
        ps = text_prompts(llm.engine.tokenizer, args.prompts, 16, 128, 3) if args.text else \
            prompts(args.prompts, llm.engine.cfg.vocab_size, 16, 128, 3)
        logits = torch.stack([first_step_logits(llm.engine, p) for p in ps])
        outs = llm.generate(ps, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
        res = {"tp": tp, "load_s": load_s, "logits": logits, "tokens": [o.token_ids for o in outs]}
        if not args.no_speed:
            step, sent = decode_latency(llm)
            res["decode_bs1_ms"], res["decode_bs1_broadcast_ms"] = 1e3 * step, 1e3 * sent
            res["throughput"] = throughput(llm, args.requests)
        return res
    finally:
        llm.close()


def _free() -> None:
    """Give the previous engine's weights and KV cache back before the next one sizes its cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(a: dict, b: dict) -> dict:
    l1, l2 = a["logits"], b["logits"]
    rel = float((l2 - l1).norm() / l1.norm())
    same = [x == y for x, y in zip(a["tokens"], b["tokens"])]
    tok = sum(u == v for x, y in zip(a["tokens"], b["tokens"]) for u, v in zip(x, y))
    total = sum(len(x) for x in a["tokens"])
    top2 = l1.topk(2, dim=-1).values
    out = {"logits_rel_err": rel, "logits_max_abs_err": float((l2 - l1).abs().max()),
           "argmax_equal_first_step": float((l1.argmax(-1) == l2.argmax(-1)).float().mean()),
           "tp1_top2_margin_min": float((top2[:, 0] - top2[:, 1]).min()),
           "continuations_identical_pct": 100.0 * sum(same) / len(same), "tokens_equal_pct": 100.0 * tok / total,
           "pass_logits": rel <= 1e-2, "pass_tokens": sum(same) / len(same) >= 0.95}
    if "decode_bs1_ms" in a and "decode_bs1_ms" in b:
        out["decode_bs1_ratio_tp2_over_tp1"] = b["decode_bs1_ms"] / a["decode_bs1_ms"]
        out["pass_latency"] = out["decode_bs1_ratio_tp2_over_tp1"] <= 0.6
        out["throughput_ratio_tp2_over_tp1"] = b["throughput"]["output_tok_s"] / a["throughput"]["output_tok_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp1", required=True, help="workspace (dir or NAME:TAG) converted with --tp 1")
    ap.add_argument("--tp2", required=True, help="the same checkpoint converted with --tp 2")
    ap.add_argument("--text", action="store_true",
                    help="prompts from natural text (pydoc topics) instead of random token ids (trained models)")
    ap.add_argument("--ranks", type=int, default=2,
                    help="tensor-parallel size of --tp2 (e.g. 3 for SmolLM2's 9 heads on the CPU)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--no-speed", action="store_true", help="correctness only")
    ap.add_argument("--allreduce", default="auto",
                    help="comma list of LMDEPOT_ALLREDUCE modes to run tp=2 with (runtime/allreduce.py), e.g. "
                         "nccl,fused; at most one mode that uses symmetric memory (auto, symm, fused) per run: "
                         "a second one's fresh rank-1 worker disagrees with this process on PyTorch's "
                         "symmetric-memory rendezvous count (120 s wait, then NCCL)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    a = measure(args.tp1, 1, args)
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "dtype": args.dtype,
              "date": time.strftime("%Y-%m-%d %H:%M"), "prompts": args.prompts, "tokens": args.tokens,
              "tp1": {k: v for k, v in a.items() if k not in ("logits", "tokens")}, "tp2": {}}
    ok = True
    for mode in args.allreduce.split(","):
        _free()
        os.environ["LMDEPOT_ALLREDUCE"] = mode   # read by rank 0 here and inherited by the spawned rank
        b = measure(args.tp2, args.ranks, args)
        cmp = compare(a, b)
        report["tp2"][mode] = {**{k: v for k, v in b.items() if k not in ("logits", "tokens")}, **cmp}
        ok = ok and cmp["pass_logits"] and cmp["pass_tokens"]
        speed = ""
        if "decode_bs1_ratio_tp2_over_tp1" in cmp:
            speed = (f"; decode bs1 {a['decode_bs1_ms']:.2f} -> {b['decode_bs1_ms']:.2f} ms/step"
                     f" (step broadcast {b['decode_bs1_broadcast_ms']:.3f} ms)"
                     f" ({cmp['decode_bs1_ratio_tp2_over_tp1']:.2f}x); {args.requests} requests"
                     f" {a['throughput']['output_tok_s']:.0f} -> {b['throughput']['output_tok_s']:.0f} out tok/s"
                     f" ({cmp['throughput_ratio_tp2_over_tp1']:.2f}x)")
        print(f"summary (all-reduce {mode}): logits rel err {cmp['logits_rel_err']:.2e}; continuations identical"
              f" {cmp['continuations_identical_pct']:.1f}% (tokens {cmp['tokens_equal_pct']:.1f}%){speed}",
              flush=True)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
