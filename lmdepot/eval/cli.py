"""`lmdepot eval ppl`: perplexity of a workspace through the runtime (KV quantization included)."""

from __future__ import annotations

import click

from lmdepot.eval import PYDOC_EVAL


def kv_options(fn):
    options = [
        click.option("--quant-policy", default=0, show_default=True, type=int,
                     help="KV cache: 0 float, 8 int8, 4 int4."),
        click.option("--kv-scales", default="online", show_default=True,
                     help="online (per-token scales) or static (the workspace's calibrated per-head scales)."),
        click.option("--kv-scheme", type=click.Choice(["plain", "rotate", "channel"]), default=None,
                     help="Online KV: plain (LMDeploy's per-token per-head), rotate (Hadamard, then plain) or"
                          " channel (int4: per-channel keys over each block + rotated per-token values)."
                          "  [default: channel for int4, plain for int8]"),
        click.option("--kv-group-size", default=None, type=int,
                     help="Online KV: channels per scale (default: the whole head, LMDeploy's scheme)."),
        click.option("--kv-rotate/--no-kv-rotate", default=None,
                     help="Online KV: Hadamard-rotate the per-token quantizers (default: the scheme's; on for int4)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


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
