"""`lmdepot bench ...`: benchmarks that print the device, the date, the copy bandwidth, a peer and the roofline."""

import click

from lmdepot.bench.shapes import SHAPES
from lmdepot.runtime.cli_options import batched_tokens_option

_SHAPES = click.Choice(list(SHAPES))


def _model_options(fn):
    options = [
        click.option("--model", default=None,
                     help="A workspace dir, or an HF checkpoint dir (converted in the run). Default: --shape."),
        click.option("--shape", type=_SHAPES, default="llama2-7b", show_default=True,
                     help="Random-weight model with this published config (used without --model)."),
        click.option("--layers", type=click.IntRange(1), default=None,
                     help="Cut --shape's depth (per-layer shape kept)."),
        click.option("--int4", is_flag=True, help="Convert to int4 (RTN, group 128) instead of fp16."),
        click.option("--tp", default=1, show_default=True, type=click.IntRange(1, 64),
                     help="Tensor-parallel ranks to convert --shape / an HF --model for (a workspace keeps its own)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
                     help="Also write the results as JSON to this file."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _eager_option(fn):
    return click.option("--eager", is_flag=True, help="Run the engine without CUDA graphs.")(fn)


def _cache_option(fn):
    return click.option("--cache-max-entry-count", default=None, type=click.FloatRange(0, 1, min_open=True),
                        help="Fraction of free memory given to KV blocks.")(fn)


def _hf_option(fn):
    return click.option("--hf", default=None, type=click.Path(file_okay=False),
                        help="The HF checkpoint for --peer hf when --model is a workspace.")(fn)


def _kv_options(fn):
    fn = click.option("--kv-scales", type=click.Choice(["online", "static"]), default="online", show_default=True,
                      help="KV int scales: per token (online) or the workspace's calibrated ones (static).")(fn)
    return click.option("--quant-policy", type=click.Choice(["0", "8", "4"]), default="0", show_default=True,
                        help="KV cache: 0 float, 8 int8, 4 int4.")(fn)


def _workload_options(fn):
    options = [
        click.option("--num-prompts", "-n", default=256, show_default=True, type=click.IntRange(1),
                     help="Number of requests."),
        click.option("--prompt", "prompt_len", default="64-512", show_default=True,
                     help="Prompt tokens: N or LO-HI (uniform). Long context: 2048-4096."),
        click.option("--output", "output_len", default="256", show_default=True,
                     help="Output tokens (exact, ignore_eos): N or LO-HI."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the synthetic workload."),
        click.option("--dataset", default=None,
                     help="ShareGPT JSON instead of the synthetic workload: first human turn = prompt, its gpt"
                          " reply's token count = output length; -n requests drawn with --seed."),
        click.option("--max-batch-size", default=None, type=click.IntRange(1), help="Sequences per engine step."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


@click.group()
def bench():
    """Benchmarks: kernels, generation latency grid, offline throughput, serving, cold start."""


@bench.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--only", default="w4a16,w8a8,attention", show_default=True,
              help="Comma-separated sections to run: w4a16, w8a8, attention, gemv (dense decode GEMV).")
def kernels(as_json, only):
    """W4A16 and W8A8 GEMMs vs cuBLAS bf16 and torch int4/int8; paged decode attention vs bytes read."""
    from lmdepot.bench.kernels import SECTIONS, run
    from lmdepot.errors import LmdepotError

    sections = tuple(s.strip() for s in only.split(","))
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise LmdepotError(f"--only {bad[0]}: must be one of {', '.join(SECTIONS)}")
    click.echo(run(as_json=as_json, only=sections), nl=False)


@bench.command()
@_model_options
@_kv_options
@click.option("--concurrency", default="1,16,64", show_default=True, help="Comma-separated concurrencies.")
@click.option("--cases", default="1x128,128x128,2048x128,128x2048", show_default=True,
              help="Comma-separated PROMPTxOUTPUT token lengths.")
@click.option("--peer", type=click.Choice(["hf", "none"]), default="none", show_default=True,
              help="Also run HF transformers' eager generate (batch = concurrency) on the same model.")
@_hf_option
@_eager_option
@_cache_option
@batched_tokens_option
def generation(model, shape, layers, int4, tp, device, json_path, quant_policy, kv_scales, concurrency, cases, peer,
               hf, eager, cache_max_entry_count, max_num_batched_tokens):
    """First-token and per-token latency (p50/p90/p99), output tok/s and peak memory over a grid."""
    from lmdepot.bench.generation import run
    from lmdepot.bench.workload import parse_cases, parse_ints

    conc, grid = parse_ints(concurrency, "--concurrency"), parse_cases(cases)
    _, text = run(model, shape, layers, conc, grid, None if peer == "none" else peer, device, int(quant_policy),
                  kv_scales, int4, cache_max_entry_count, json_path, hf, tp=tp, eager=eager,
                  max_num_batched_tokens=max_num_batched_tokens)
    click.echo(text, nl=False)


@bench.command()
@_model_options
@_kv_options
@_workload_options
@click.option("--peer", type=click.Choice(["hf", "none"]), default="none", show_default=True,
              help="Also run HF transformers' continuous batching (generate_batch) on the same requests.")
@_hf_option
@_eager_option
@_cache_option
@batched_tokens_option
def throughput(model, shape, layers, int4, tp, device, json_path, quant_policy, kv_scales, num_prompts, prompt_len,
               output_len, seed, dataset, max_batch_size, peer, hf, eager, cache_max_entry_count,
               max_num_batched_tokens):
    """Offline request throughput (output tok/s, req/s) of N requests, optionally vs HF generate_batch."""
    from lmdepot.bench.throughput import run
    from lmdepot.bench.workload import parse_range

    _, text = run(model, shape, layers, num_prompts, parse_range(prompt_len, "--prompt"),
                  parse_range(output_len, "--output"), seed, dataset, None if peer == "none" else peer, device,
                  int(quant_policy), kv_scales, int4, max_batch_size, cache_max_entry_count, json_path, hf, tp=tp,
                  eager=eager, max_num_batched_tokens=max_num_batched_tokens)
    click.echo(text, nl=False)


@bench.command()
@_model_options
@_kv_options
@_workload_options
@click.option("--url", default=None, help="A running api_server (default: start one on a free local port).")
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1),
              help="Requests in flight at most.")
@click.option("--compare-offline", is_flag=True,
              help="Also run the same requests through the engine directly (after the server stops; with --url"
                   " the running server keeps its memory, so the second engine must fit beside it).")
@batched_tokens_option
def serving(model, shape, layers, int4, tp, device, json_path, quant_policy, kv_scales, num_prompts, prompt_len,
            output_len, seed, dataset, max_batch_size, url, concurrency, compare_offline, max_num_batched_tokens):
    """Streaming requests through the HTTP server: TTFT, ITL (p50/p90/p99), output tok/s, req/s."""
    from lmdepot.bench.serving import run
    from lmdepot.bench.workload import parse_range

    _, text = run(model, shape, layers, url, num_prompts, parse_range(prompt_len, "--prompt"),
                  parse_range(output_len, "--output"), seed, dataset, concurrency, compare_offline, device,
                  int(quant_policy), kv_scales, int4, max_batch_size, json_path, tp=tp,
                  max_num_batched_tokens=max_num_batched_tokens)
    click.echo(text, nl=False)


@bench.command()
@_model_options
@click.option("--registry", default=None,
              help="Registry URL holding --ref (default: push the workspace to a temp file:// registry first).")
@click.option("--ref", default=None, help="NAME:TAG to pull.")
def coldstart(model, shape, layers, int4, tp, device, json_path, registry, ref):
    """Pull a tag into a fresh cache, load, first token: the time of each phase and the total."""
    from lmdepot.bench.coldstart import run

    _, text = run(model, shape, layers, int4, registry, ref, device, json_path, tp=tp)
    click.echo(text, nl=False)


@bench.command("model")
@click.argument("shape", type=_SHAPES)
@click.option("--dst", required=True, type=click.Path(file_okay=False), help="Writes DST/hf, DST/fp16, DST/int4.")
@click.option("--layers", type=click.IntRange(1), default=None, help="Cut the depth (per-layer shape kept).")
@click.option("--int4", is_flag=True, help="Also write an int4 RTN (group 128) workspace.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1, 64), help="Tensor-parallel ranks.")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="Write the fp16 workspace DST/fp16.")
def model_(shape, dst, layers, int4, tp, fp16):
    """A random-weight checkpoint of SHAPE (on the GPU if any) and its fp16 (and int4) workspaces, timed."""
    from lmdepot.bench.models import build

    if not (fp16 or int4):
        raise click.UsageError("--no-fp16 without --int4 writes no workspace")
    r = build(shape, dst, layers, int4, tp, fp16)
    click.echo("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
