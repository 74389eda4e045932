"""The `lmdepot` command line. Subsystems register their click groups here."""

from __future__ import annotations

import sys
import warnings

import click

from lmdepot import __version__
from lmdepot.errors import LmdepotError


class _Group(click.Group):
    """Turns user errors raised anywhere below into one line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmdepotError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lmdepot")
def main():
    """Convert, quantize, version and serve LLM workspaces."""
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


@main.command()
@click.argument("source")
@click.option("--dst-path", required=True, type=click.Path(file_okay=False), help="Workspace directory to write.")
@click.option("--tp", default=1, show_default=True, type=click.IntRange(1, 64), help="Tensor-parallel ranks.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True,
              help="Storage dtype of unquantized weights.")
@click.option("--model-name", default=None, help="model_name in config.ini (default: from the source).")
@click.option("--model-format", type=click.Choice(["hf", "awq"]), default="hf", show_default=True,
              help="awq: import an AutoAWQ (GEMM) int4 checkpoint as an int4 workspace.")
@click.option("--allow-pickle", is_flag=True, help="Allow reading pickle .bin checkpoints (runs code from the file).")
@click.option("--force", is_flag=True, help="Write into a non-empty dst (only files lmdepot writes are replaced).")
@click.option("--session-len", default=None, type=click.IntRange(1), help="session_len runtime default.")
def convert(source, dst_path, tp, dtype, model_name, model_format, allow_pickle, force, session_len):
    """Convert a HF checkpoint dir, a GGUF file or a built-in model (smollm2-135m) to a workspace."""
    from lmdepot.convert.converter import ConvertOptions, convert_model

    opts = ConvertOptions(tp=tp, dtype=dtype, model_name=model_name, model_format=model_format,
                          allow_pickle=allow_pickle, force=force, session_len=session_len)
    manifest = convert_model(source, dst_path, opts)
    click.echo(f"wrote {dst_path}: {len(manifest.files)} files, "
               f"{sum(e.size for e in manifest.files) / 2**20:.1f} MiB, manifest sha256:{manifest.digest}")


@main.command()
@click.argument("workspace", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Re-hash every file against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(workspace, verify, as_json):
    """Print a workspace's config, per-layer/rank sizes and totals."""
    from lmdepot.formats.inspect import inspect_workspace

    click.echo(inspect_workspace(workspace, verify=verify, as_json=as_json), nl=False)


@main.command("check_env")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def check_env(as_json):
    """Python, torch, Triton, CUDA, driver, GPUs, NCCL, installed extras, registry and cache dirs."""
    import json

    from lmdepot.env import collect, render

    info = collect()
    click.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else render(info), nl=as_json)


@main.command("list")
@click.option("--registry", "registry_url", default=None, help="Registry URL (default: $LMDEPOT_REGISTRY).")
def list_(registry_url):
    """Supported architectures, chat-template tool-call formats, and the registry's names."""
    from lmdepot.convert.arch import SUPPORTED
    from lmdepot.registry import Registry

    click.echo("architectures (lmdepot convert):")
    for arch in SUPPORTED:
        click.echo(f"  {arch}")
    click.echo("chat templates: each workspace's own (tokenizer/tokenizer_config.json), applied by the runtime;"
               " tool-call formats detected from them (serve --tool-call-parser):")
    click.echo("  internlm2 (<|action_start|><|plugin|>), llama3 (<|python_tag|> JSON), hermes/qwen (<tool_call> JSON)")
    registry = Registry(registry_url)
    names = registry.ls()
    click.echo(f"registry {registry.url}: {len(names)} name(s)")
    for name, tags in names.items():
        click.echo(f"  {name}\t{', '.join(tags)}")


def _register_subsystems():
    from lmdepot.bench.cli import bench
    from lmdepot.convert.lite_cli import lite
    from lmdepot.eval.cli import eval_group
    from lmdepot.registry.cli import registry
    from lmdepot.runtime.cli import chat, generate
    from lmdepot.serve.cli import serve

    for command in (lite, registry, generate, chat, serve, eval_group, bench):
        main.add_command(command)


_register_subsystems()

if __name__ == "__main__":
    sys.exit(main())
