"""`lmdepot serve api_server | api_client | gradio`, named as in LMDeploy so its users feel at home."""

from __future__ import annotations

import os
import re
import sys

import click

from lmdepot.errors import LmdepotError
from lmdepot.runtime.cli_options import (batched_tokens_kwargs, batched_tokens_option, check_kv_options,
                                         kv_engine_kwargs, kv_options)

from lmdepot.serve.tools import PARSERS


def _split(values) -> list[str]:
    """`--api-keys "k1 k2" --api-keys k3`: LMDeploy takes several values after one flag; click takes one."""
    return [v for value in values for v in re.split(r"[,\s]+", value) if v]


@click.group()
def serve():
    """Serve a workspace over an OpenAI-compatible HTTP API, and talk to it."""


@serve.command("api_server")
@click.argument("model")
@click.option("--server-name", default="0.0.0.0", show_default=True, help="Address to bind.")
@click.option("--server-port", default=23333, show_default=True, type=click.IntRange(0, 65535))
@click.option("--tp", default=None, type=click.IntRange(1, 64),
              help="Tensor-parallel ranks (must equal the workspace's tensor_para_size).")
@kv_options
@click.option("--cache-max-entry-count", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of free memory (CPU: of --memory-budget) after weights given to KV blocks.")
@click.option("--max-batch-size", default=None, type=click.IntRange(1), help="Sequences per engine step.")
@batched_tokens_option
@click.option("--session-len", default=None, type=click.IntRange(2), help="Max prompt + reply tokens.")
@click.option("--model-name", default=None,
              help="Name served by /v1/models (default: MODEL as given; for a registry ref NAME:TAG, its NAME).")
@click.option("--api-keys", multiple=True,
              help="Accepted API keys (Authorization: Bearer KEY); several may be given, space- or comma-separated,"
                   " or by repeating the flag. Default: no authentication.")
@click.option("--tool-call-parser", type=click.Choice(PARSERS), default=None,
              help="How tool calls are found in replies (default: detected from the chat template).")
@click.option("--max-queued-requests", default=256, show_default=True, type=click.IntRange(0),
              help="Requests admitted beyond --max-batch-size; more are answered 429 with Retry-After.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"], case_sensitive=False))
@click.option("--allow-origins", multiple=True, help="CORS origins allowed (space- or comma-separated, or repeated).")
@click.option("--memory-budget", default=4.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="CPU only: GiB for weights + KV cache.")
@click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto", show_default=True,
              help="Compute/KV dtype.")
@click.option("--eager", is_flag=True, help="CUDA: no CUDA graphs for decode steps (debugging, profiling).")
def api_server(model, server_name, server_port, tp, cache_max_entry_count, max_batch_size, max_num_batched_tokens,
               session_len, model_name, api_keys, tool_call_parser, max_queued_requests, log_level, allow_origins,
               memory_budget, dtype, eager, **kv):
    """OpenAI-compatible API server. MODEL: workspace dir or NAME:TAG.

    Routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/chat/interactive, /health, /metrics,
    /openapi.json (and /docs). SIGTERM or Ctrl-C stops accepting requests and drains those in flight.
    """
    import uvicorn

    from lmdepot.runtime.llm import AsyncLLM
    from lmdepot.serve.app import ServeConfig, create_app

    check_kv_options(kv)
    set_switch_interval()
    llm = AsyncLLM(model, tp=tp, session_len=session_len, max_batch_size=max_batch_size,
                   cache_max_entry_count=cache_max_entry_count, cpu_memory_budget=int(memory_budget * 2**30),
                   dtype=dtype, eager=eager, **kv_engine_kwargs(kv), **batched_tokens_kwargs(max_num_batched_tokens))
    cfg = ServeConfig(model_name=model_name or _default_model_name(model), api_keys=_split(api_keys), tool_call_parser=tool_call_parser,
                      max_queued_requests=max_queued_requests, allow_origins=_split(allow_origins))
    app = create_app(llm, cfg, owns_llm=True)
    click.echo(f"serving {cfg.model_name} on http://{server_name}:{server_port}/v1", err=True)
    # timeout_graceful_shutdown=None: on SIGTERM, streams in flight run to their end before exit.
    # Keep-alive outlives the clients' own idle expiry (httpx, hence the openai SDK: 5 s), so a client never
    # sends a request on a connection the server is closing at that moment.
    uvicorn.run(app, host=server_name, port=server_port, log_level=log_level.lower(),
                timeout_graceful_shutdown=None, timeout_keep_alive=30)


def set_switch_interval() -> None:
    """The engine thread and the event loop share the GIL; a thread that wants it waits up to the switch
    interval for the holder to let go. LMDEPOT_SWITCH_INTERVAL (seconds) sets it; unset or 0 keeps
    Python's 5 ms, which measured best on an H200 (server / offline 0.90-0.95; 1 ms: 0.62, since the
    engine thread releases the GIL at every torch call and then waits on the loop; docs/serving.md)."""
    raw = os.environ.get("LMDEPOT_SWITCH_INTERVAL", "0")
    try:
        value = float(raw)
    except ValueError:
        raise LmdepotError(f"LMDEPOT_SWITCH_INTERVAL={raw!r}: must be a number of seconds") from None
    if value < 0:
        raise LmdepotError(f"LMDEPOT_SWITCH_INTERVAL={raw!r}: must be 0 (Python's default) or more")
    if value > 0:
        sys.setswitchinterval(value)


def _default_model_name(model: str) -> str:
    from pathlib import Path

    from lmdepot.runtime.loader import is_ref

    if not Path(model).exists() and is_ref(model):
        return model.split("@")[0].rsplit(":", 1)[0]
    return model


@serve.command("api_client")
@click.argument("url")
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY", help="Bearer key (or $OPENAI_API_KEY).")
@click.option("--model", default=None, help="Model name (default: the server's first).")
@click.option("--system", default=None, help="System prompt.")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, 2))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--max-tokens", default=None, type=click.IntRange(1), help="Reply length cap.")
def api_client(url, api_key, model, system, temperature, top_p, max_tokens):
    """Interactive terminal chat with an api_server at URL (e.g. http://127.0.0.1:23333).

    End an input with a double enter; `exit` quits; Ctrl-C stops the current reply.
    """
    from lmdepot.serve.client import run_client

    run_client(url, api_key, model, system, temperature, top_p, max_tokens)


@serve.command("gradio")
@click.argument("url")
@click.option("--server-name", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--server-port", default=6006, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY", help="Key for the api_server (kept server-side).")
def gradio(url, server_name, server_port, api_key):
    """Chat web UI for an api_server at URL: streaming, system prompt, sampling controls, stop button.

    Named `gradio` for LMDeploy users; it is a single page served by FastAPI (no Gradio needed), which
    starts in a second and forwards chats to the api_server.
    """
    import uvicorn

    from lmdepot.serve.webui import create_webui_app

    click.echo(f"web UI for {url} on http://{server_name}:{server_port}", err=True)
    uvicorn.run(create_webui_app(url, api_key), host=server_name, port=server_port, log_level="warning",
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    sys.exit(serve())
