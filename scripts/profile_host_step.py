"""Host (python) time per engine step, by phase, on the CPU: what `lmdepot bench throughput` pays per
step besides the model's forward.

The bench's own loop (lmdepot.bench.offline.run_offline) drives an engine built on a tiny random
Llama (hidden 64, 1 layer, 4 heads: the forward costs little) with the bench's 32000-word
tokenizer, so scheduling, block management, metadata, sampling and detokenization run exactly as
in the bench. Phases are timed by wrapping the engine's methods with perf_counter:

  schedule    Scheduler.schedule (admission, block growth, preemption)
  metadata    Engine._metadata (tokens, positions, slots, block tables of the step)
  runner      ModelRunner.execute minus the model forward: host-to-device inputs, Context / graph buffers
  forward     the model's forward and lm_head (device work on a GPU; excluded from the host total)
  graph-ctx   with --graphs only: the Context (SeqSlice views) the uncaptured CPU replay builds, sets
              and frees (a GPU replays the graph instead; excluded from the host total)
  commit      BlockManager.commit (prefix-cache hashes of blocks that filled)
  sample      sampler.sample (argmax over (batch, vocab) logits: on a GPU a kernel plus the one sync)
  append      step()'s loop of Engine._append after sampling: stop checks, incremental
              detokenization, StepOutputs
  bench-loop  run_offline's per-output bookkeeping between two step() calls

host = step wall time - forward - graph-ctx; HOST-argmax also takes out the sampler's (n, vocab) argmax
(torch.Tensor.argmax timed in the run), CPU compute here but a kernel on a GPU.
Only decode steps whose batch is all `--n` sequences count; each phase is the median over them
(torch runs one thread: on a shared machine the medians stay put). Phases do not sum to the wall
time exactly: medians, and step()'s own loop over the batch (num_computed updates) is unlisted.

    PYTHONPATH=. /work/venv/bin/python scripts/profile_host_step.py --n 256 [--graphs] [--profile] [--device cuda]

--graphs (CPU) runs the padded CUDA-graph decode path (LMDEPOT_GRAPHS_ON_CPU=1, uncaptured), the
path a GPU takes for decode batches up to 256; --profile prints the top cProfile entries of the
whole run's host code (prefills included). --device cuda runs it on a GPU (graphs captured): there the kernels run
asynchronously and sample() waits for them, so host ~ wall - sample.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PHASES = ("schedule", "metadata", "runner", "forward", "graph-ctx", "commit", "sample", "append", "bench-loop")


def build_workspace(tmp: Path, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmdepot.bench.models import convert, word_tokenizer

    hf = tmp / "hf"
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config, dtype=torch.float16).save_pretrained(hf)
    word_tokenizer(hf, config.vocab_size)
    return convert(hf, tmp / "ws")


_MISSING = object()


class Timers:
    def __init__(self):
        self.step: dict[str, float] = defaultdict(float)
        self.patched: list = []   # (object, attribute, what it was): undone by restore()

    def patch(self, obj, name: str, value) -> None:
        self.patched.append((obj, name, obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, old in reversed(self.patched):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.patched.clear()

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)
        acc = self.step

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[phase] += time.perf_counter() - t

        self.patch(obj, name, timed)


def instrument(llm, timers: Timers, steps: list) -> None:
    import torch

    import lmdepot.runtime.engine as engine_mod

    eng = llm.engine
    runner = eng.runner
    timers.wrap(eng.scheduler, "schedule", "schedule")
    timers.wrap(eng, "_metadata", "metadata")
    timers.wrap(runner, "execute", "runner")
    timers.wrap(runner.model, "forward", "forward")
    timers.wrap(runner.model, "logits", "forward")
    if runner.graphs is not None:   # the uncaptured replay's Context: built, set, reset (and freed)
        import lmdepot.runtime.cuda_graph as graph_mod

        timers.wrap(runner.graphs, "_context", "graph-ctx")
        timers.wrap(graph_mod, "set_context", "graph-ctx")
        timers.wrap(graph_mod, "reset_context", "graph-ctx")
    timers.wrap(eng.bm, "commit", "commit")
    # sample once per step; what follows it in step() is the per-sequence _append loop, timed as one
    # span (a wrapper around each _append call would add its own cost 256 times a step)
    sample = engine_mod.sample
    sampled_at = [0.0]

    def timed_sample(*a, **kw):
        t = time.perf_counter()
        try:
            return sample(*a, **kw)
        finally:
            sampled_at[0] = time.perf_counter()
            timers.step["sample"] += sampled_at[0] - t

    timers.patch(engine_mod, "sample", timed_sample)
    # the sampler's argmax over (n, vocab) logits: CPU compute here, a kernel on a GPU
    timers.wrap(torch.Tensor, "argmax", "argmax")
    step = eng.step
    last_end = [None]

    def timed_step():
        called = time.perf_counter()
        acc = timers.step
        acc.clear()
        if last_end[0] is not None:
            acc["bench-loop-prev"] = called - last_end[0]
        batch = [(len(s.token_ids) - s.num_computed) for s in eng.scheduler.running]
        start = time.perf_counter()   # the harness's own look at the batch above is not the step's
        sampled_at[0] = 0.0
        out = step()
        end = last_end[0] = time.perf_counter()
        rec = dict(acc)
        rec["append"] = end - sampled_at[0] if sampled_at[0] else 0.0
        rec["wall"] = end - start
        rec["batch"] = len(out)
        rec["decode"] = bool(batch) and all(n == 1 for n in batch) and not eng.scheduler.waiting
        steps.append(rec)
        return out

    timers.patch(eng, "step", timed_step)


def summarize(steps: list, n: int) -> dict:
    """Medians over the full decode steps (robust to a shared machine's stalls), in ms."""
    # the bench-loop time measured before step k belongs to step k-1's outputs
    for prev, cur in zip(steps, steps[1:]):
        prev["bench-loop"] = cur.get("bench-loop-prev", 0.0)
    decode = [s for s in steps[:-1] if s["decode"] and s["batch"] == n]
    out = {"decode_steps": len(decode), "all_steps": len(steps)}
    if not decode:
        return out
    for s in decode:
        s["runner"] = s.get("runner", 0.0) - s.get("forward", 0.0) - s.get("graph-ctx", 0.0)  # execute's own work
        s["wall"] += s["bench-loop"]
        s["host"] = s["wall"] - s.get("forward", 0.0) - s.get("graph-ctx", 0.0)
        s["host-argmax"] = s["host"] - s.get("argmax", 0.0)
    for p in (*PHASES, "wall", "host", "argmax", "host-argmax"):
        out[p] = statistics.median(s.get(p, 0.0) for s in decode) * 1e3
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="concurrent requests")
    ap.add_argument("--prompt", default="64-512")
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--graphs", action="store_true", help="the padded CUDA-graph decode path, uncaptured")
    ap.add_argument("--profile", action="store_true", help="cProfile the run, print the top entries of the host code")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the real path (captured graphs); the device work is then waited for in sample")
    args = ap.parse_args(argv)
    if args.graphs:
        os.environ["LMDEPOT_GRAPHS_ON_CPU"] = "1"
    import torch

    from lmdepot.bench.offline import open_llm, run_offline, warmup
    from lmdepot.bench.workload import parse_range, synthetic

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)   # a shared 2-core machine: one thread keeps the numbers steady
    lo, hi = parse_range(args.prompt, "--prompt")
    with tempfile.TemporaryDirectory(prefix="lmdepot-hoststep-") as tmp:
        ws = build_workspace(Path(tmp), args.layers)
        timers, steps = Timers(), []
        llm = open_llm(ws, args.device, max(args.n, 1), session_len=hi + args.output + 8)
        try:
            vocab = llm.engine.cfg.vocab_size
            warmup(llm, vocab)
            requests = synthetic(args.n, (lo, hi), (args.output, args.output), vocab, args.seed)
            instrument(llm, timers, steps)
            prof = cProfile.Profile() if args.profile else None
            if prof:
                prof.enable()
            t = time.perf_counter()
            timing = run_offline(llm, requests, args.device)
            total = time.perf_counter() - t
            if prof:
                prof.disable()
        finally:
            timers.restore()   # module functions and torch.Tensor.argmax as they were
            llm.close()
    s = summarize(steps, args.n)
    print(f"{args.n} requests, prompts {lo}-{hi}, {args.output} output tokens, {args.layers} layer(s),"
          f" graphs={'on' if args.graphs else 'off'}: {s['all_steps']} steps in {total:.1f} s,"
          f" {sum(timing.token_counts)} tokens")
    if not s["decode_steps"]:
        print("no full decode steps")
        return 1
    print(f"decode steps with all {args.n} sequences: {s['decode_steps']}; median ms per step:")
    for p in PHASES:
        print(f"  {p:11} {s[p]:8.3f}")
    print(f"  {'wall':11} {s['wall']:8.3f}")
    if args.device == "cuda":   # kernels queue asynchronously; sample's copy back waits for all of them
        print(f"  {'HOST':11} {s['wall'] - s['sample']:8.3f}   (wall - sample: sample waits for the device)")
        return 0
    print(f"  {'HOST':11} {s['host']:8.3f}   (wall - forward - graph-ctx)")
    print(f"  {'argmax':11} {s['argmax']:8.3f}   (of sample: the ({args.n}, {vocab}) argmax, a kernel on a GPU)")
    print(f"  {'HOST-argmax':11} {s['host-argmax']:8.3f}")
    if prof:
        # the host side only: the model's forward and the reference ops would drown it
        host = r"lmdepot/(runtime/(engine|scheduler|block_manager|sequence|sampler|runner|context|cuda_graph)|bench)"
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(host, 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
