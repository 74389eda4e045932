from pathlib import Path

from click.testing import CliRunner

from lmdepot.cli import main
from scripts.gen_cli_docs import render


def test_cli_reference_is_current():
    import difflib

    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    diff = list(difflib.unified_diff(doc.read_text().splitlines(), render().splitlines(), lineterm="", n=1))
    assert not diff, "run: python scripts/gen_cli_docs.py\n" + "\n".join(diff[:40])


def test_every_command_has_help():
    import click

    def walk(cmd, path):
        result = CliRunner().invoke(main, path + ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, path
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])

    walk(main, [])
