"""Regenerate docs/cli.md from the click command tree: python scripts/gen_cli_docs.py"""

from pathlib import Path

import click

from lmdepot.cli import main


def walk(cmd: click.Command, path: list[str], out: list[str]) -> None:
    ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=80, max_content_width=80,
                        help_option_names=["-h", "--help"])
    out.append(f"{'#' * min(len(path) + 1, 4)} `{' '.join(path)}`\n\n```\n{cmd.get_help(ctx).strip()}\n```\n")
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            walk(cmd.get_command(ctx, name), path + [name], out)


def render() -> str:
    out = ["# CLI reference\n\nGenerated from `--help` by `scripts/gen_cli_docs.py`; do not edit by hand.\n"]
    walk(main, ["lmdepot"], out)
    return "\n".join(out)


if __name__ == "__main__":
    Path(__file__).resolve().parents[1].joinpath("docs", "cli.md").write_text(render())
