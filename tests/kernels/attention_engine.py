"""The engine with the attention kernels against the same engine with the reference ops.

Shared by the interpreter test (tests/kernels/test_attention_engine.py, CPU) and the GPU test
(tests/runtime/test_gpu.py). One scenario covers the cases the kernels must get right inside a real
step: a prefix-cache hit (extend over cached blocks), chunked prefill beside decodes in one batch
(mixed launch), decode-only steps, partial last pages.
"""

from __future__ import annotations

import torch

from lmdepot.runtime import ops
from lmdepot.runtime.llm import LLM
from lmdepot.runtime.ops import kv_quant, reference
from lmdepot.runtime.sequence import SamplingParams

# The reference of every op a kernel test may replace (float cache, then quantized cache).
REFERENCE_OPS = {"rope_store_kv": reference.rope_store_kv, "paged_attention": reference.paged_attention,
                 "store_kv_quant": kv_quant.store_kv_quant,
                 "paged_attention_quant": reference.paged_attention_quant}


def scenario_prompts(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab - 10, (40,), generator=g).tolist()   # 2.5 pages of 16
    first = shared + [5, 6, 7]
    batch = [shared + torch.randint(3, vocab - 10, (n,), generator=g).tolist() for n in (9, 1)]
    batch += [torch.randint(3, vocab - 10, (n,), generator=g).tolist() for n in (3, 30, 17)]
    return first, batch


def generate_with_spy(llm, first, batch, params):
    """Generates `first` (fills the prefix cache), then `batch`; returns outputs and each step's q_lens."""
    steps = []
    orig = llm.engine.scheduler.schedule

    def spy():
        b, doomed = orig()
        steps.append([n for _, n in b])
        return b, doomed

    llm.engine.scheduler.schedule = spy
    out = [llm.generate(first, params).token_ids]
    hits = llm.engine.bm.hits
    out += [o.token_ids for o in llm.generate(batch, params)]
    return out, steps, llm.engine.bm.hits - hits


def teacher_forced_logits(llm, ids):
    """Logits at every position of ids from one plain prefill over an idle engine's first blocks."""
    n = len(ids)
    meta = {"tokens": ids, "positions": list(range(n)), "slots": list(range(n)),
            "seqs": [(n, n, list(range(-(-n // llm.engine.bm.block_size))))], "logit_rows": list(range(n))}
    return llm.engine.runner.run(meta)


def check_kernels_follow_reference(ws, device: str, kernel_ops: dict, vocab: int, max_tokens: int = 6,
                                   tie: float = 0.05, engine_kw: dict | None = None):
    """Greedy tokens of the engine with `kernel_ops` installed equal the reference engine's argmax at
    every step, up to near-ties (top-2 logits closer than `tie`, which fp16 kernels may break either
    way). Returns (steps, prefix hits) of the kernel run for the caller's scenario checks."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    first, batch = scenario_prompts(vocab)
    kw = dict(device=device, dtype="fp16", cache_block_seq_len=16, num_kv_blocks=64, max_batch_size=8,
              max_num_batched_tokens=24, quiet=True) | (engine_kw or {})
    saved = {name: ops._TABLE[name] for name in REFERENCE_OPS}
    try:
        for name, fn in kernel_ops.items():
            ops.register(name, fn)
        llm = LLM(ws, **kw)
        try:
            outs, steps, hits = generate_with_spy(llm, first, batch, params)
        finally:
            llm.close()
        for name, fn in REFERENCE_OPS.items():
            ops.register(name, fn)
        ref = LLM(ws, **kw)
        try:
            for prompt, out in zip([first, *batch], outs):
                logits = teacher_forced_logits(ref, prompt + out)[len(prompt) - 1:-1].float()
                top2 = logits.topk(2).values
                agree = logits.argmax(-1) == torch.tensor(out)
                assert bool((agree | ((top2[:, 0] - top2[:, 1]) < tie)).all()), (prompt, out, logits.argmax(-1))
        finally:
            ref.close()
    finally:
        for name, fn in saved.items():
            ops.register(name, fn)
    return steps, hits
