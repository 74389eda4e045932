"""Click options shared by the commands that build an engine (generate, chat, serve, eval, bench)."""

from __future__ import annotations

import click


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


def kv_engine_kwargs(opts: dict) -> dict:
    """EngineConfig keyword arguments of kv_options' values."""
    return {k: opts[k] for k in ("quant_policy", "kv_scales", "kv_scheme", "kv_group_size", "kv_rotate")}


def check_kv_options(opts: dict) -> None:
    """The KV options' errors (one line each) before anything is loaded."""
    from lmdepot.runtime.kv_cache import make_spec

    make_spec(opts["quant_policy"], None, 64, opts["kv_scales"], scheme=opts["kv_scheme"])


# Below this a long prompt needs hundreds of steps (each one a full read of the weights) and a step
# cannot even hold the decodes of a modest batch; no setting that small is a sensible trade-off.
MIN_BATCHED_TOKENS = 16


class _TokenBudget(click.ParamType):
    """An integer >= MIN_BATCHED_TOKENS; a bad value is an LmdepotError (one line), not click's usage block."""

    name = "integer"

    def convert(self, value, param, ctx):
        from lmdepot.errors import LmdepotError

        try:
            n = int(value)
        except (TypeError, ValueError):
            n = None
        if n is None or n < MIN_BATCHED_TOKENS:
            raise LmdepotError(f"--max-num-batched-tokens {value}: must be an integer of at least"
                               f" {MIN_BATCHED_TOKENS}")
        return n


def batched_tokens_option(fn):
    return click.option(
        "--max-num-batched-tokens", default=None, type=_TokenBudget(),
        help="Token budget of one engine step (prefill chunks + one token per decode); larger favours"
             " throughput, smaller the latency of running streams (longer prompts are prefilled in chunks"
             f" of it). At least {MIN_BATCHED_TOKENS}; keep it >= the max batch size, or it also caps the"
             " sequences that advance per step.  [default: the engine's, docs/runtime.md]")(fn)


def batched_tokens_kwargs(value: int | None) -> dict:
    """EngineConfig keyword arguments of --max-num-batched-tokens: none when it is not given (the default stays)."""
    return {} if value is None else {"max_num_batched_tokens": value}
