"""`lmdepot bench ...`: benchmarks that print the device, the date, a peer and the roofline."""

import click


@click.group()
def bench():
    """Benchmarks (GPU): kernels against cuBLAS/torch and the memory roofline."""


@bench.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def kernels(as_json):
    """W4A16 GEMV/GEMM vs cuBLAS bf16 and torch int4; paged decode attention vs bytes read."""
    from lmdepot.bench.kernels import run

    click.echo(run(as_json=as_json), nl=False)
