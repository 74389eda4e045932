"""`lmdepot eval ppl`: perplexity of a workspace through the runtime (KV quantization included)."""

from __future__ import annotations

import click

from lmdepot.eval import PYDOC_EVAL
from lmdepot.runtime.cli_options import kv_options


@click.group("eval")
def eval_group():
    """Evaluate workspaces (perplexity)."""


@eval_group.command()
@click.argument("model")
@click.option("--text", default=PYDOC_EVAL, show_default=True,
              help="'pydoc-eval' (embedded Python docs, the part calibration never sees) or a UTF-8 text file.")
@click.option("--seqlen", default=1024, show_default=True, type=int, help="Tokens per window.")
@click.option("--samples", default=None, type=click.IntRange(1), help="Windows to evaluate (default: all that fit).")
@click.option("--chunk", default=256, show_default=True, type=int,
              help="Prefill chunk: later chunks attend to the (quantized) cached KV.")
@kv_options
@click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto", show_default=True,
              help="Compute dtype (auto: bf16 for bf16 weights, else fp32 on CPU).")
@click.option("--tp", default=None, type=click.IntRange(1, 64), help="Tensor-parallel ranks (the workspace's).")
def ppl(model, text, seqlen, samples, chunk, quant_policy, kv_scales, kv_scheme, kv_group_size, kv_rotate, dtype, tp):
    """Perplexity of MODEL (workspace dir or NAME:TAG) on --text, through the paged KV cache."""
    from lmdepot.eval.ppl import evaluate
    from lmdepot.runtime.kv_cache import make_spec

    make_spec(quant_policy, None, 64, kv_scales, scheme=kv_scheme)  # option errors before any loading
    result, engine = evaluate(model, text, seqlen, samples, chunk, quant_policy=quant_policy, kv_scales=kv_scales,
                              kv_scheme=kv_scheme, kv_group_size=kv_group_size, kv_rotate=kv_rotate, dtype=dtype, tp=tp)
    engine.close()
    click.echo(f"ppl {result.ppl:.4f} over {result.tokens} tokens ({result.windows} x {seqlen}),"
               f" {result.seconds:.1f} s")
