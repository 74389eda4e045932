"""`lmdepot bench ...`: benchmarks that print the device, the date, a peer and the roofline."""

import click


@click.group()
def bench():
    """Benchmarks (GPU): kernels against cuBLAS/torch and the memory roofline."""


@bench.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--only", default="w4a16,w8a8,attention", show_default=True,
              help="Comma-separated sections to run: w4a16, w8a8, attention.")
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
@click.option("--shape", type=click.Choice(["llama2-7b", "llama3-8b", "qwen2.5-1.5b"]), default="llama2-7b",
              show_default=True, help="Published config of the random-weight model.")
@click.option("--layers", type=click.IntRange(1), default=None, help="Cut the depth (per-layer shape kept).")
@click.option("--batch", "batches", default="1,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--output-len", default=128, show_default=True, type=click.IntRange(2))
@click.option("--peer", type=click.Choice(["hf", "none"]), default="hf", show_default=True,
              help="Run HF transformers' eager generate on the same model in the same run.")
def generation(shape, layers, batches, prompt_len, output_len, peer):
    """Decode tokens/s and first-token latency of the engine vs HF, beside the roofline (JSON)."""
    from lmdepot.bench.generation import run

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise click.BadParameter(f"{batches!r} is not a comma-separated list of integers", param_hint="--batch")
    click.echo(run(shape, layers, sizes, prompt_len, output_len, None if peer == "none" else peer), nl=False)
