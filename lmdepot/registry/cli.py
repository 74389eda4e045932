"""`lmdepot registry ...` commands."""

import click


@click.group()
def registry():
    """Content-addressed workspace registry on any fsspec URL."""
