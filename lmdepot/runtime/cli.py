"""`lmdepot generate` and `lmdepot chat`: the runtime from the command line.

Only the completion goes to stdout; the KV-cache summary and any progress go to stderr.
"""

from __future__ import annotations

import sys

import click

from lmdepot.runtime.cli_options import (batched_tokens_kwargs, batched_tokens_option, check_kv_options,
                                         kv_engine_kwargs, kv_options)

from lmdepot.runtime.errors import RequestError


def _runtime_options(fn):
    options = [
        click.option("--tp", default=None, type=click.IntRange(1, 64),
                     help="Tensor-parallel ranks (must equal the workspace's tensor_para_size)."),
        click.option("--session-len", default=None, type=click.IntRange(1), help="Max tokens of a session."),
        click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default="auto",
                     show_default=True, help="Compute/KV dtype (auto: bf16 for bf16 weights, else fp32 on CPU)."),
        click.option("--cache-max-entry-count", default=None, type=click.FloatRange(0, 1, min_open=True),
                     help="Fraction of free memory (CPU: of the budget) after weights given to KV blocks."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="auto: the GPU when one is visible (one per tensor-parallel rank), else the CPU."),
        click.option("--memory-budget", default=4.0, show_default=True, type=click.FloatRange(0, min_open=True),
                     help="CPU only: GiB for weights + KV cache; KV gets cache_max_entry_count of what weights leave."),
        click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(0),
                     help="0 means greedy."),
        click.option("--top-p", default=0.8, show_default=True, type=click.FloatRange(0, 1, min_open=True)),
        click.option("--top-k", default=40, show_default=True, type=click.IntRange(0)),
        click.option("--repetition-penalty", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True)),
        click.option("--max-new-tokens", default=512, show_default=True, type=click.IntRange(1)),
        click.option("--seed", default=None, type=int, help="Makes sampling reproducible."),
        click.option("--eager", is_flag=True, help="CUDA: no CUDA graphs for decode steps (debugging, profiling)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return kv_options(batched_tokens_option(fn))


def _open(model, opts: dict):
    """The engine from the runtime options (tp None: the workspace's own tensor_para_size)."""
    from lmdepot.runtime.llm import LLM

    check_kv_options(opts)
    return LLM(model, tp=opts["tp"], session_len=opts["session_len"], dtype=opts["dtype"],
               cache_max_entry_count=opts["cache_max_entry_count"], device=opts["device"],
               cpu_memory_budget=int(opts["memory_budget"] * 2**30), eager=opts["eager"], **kv_engine_kwargs(opts),
               **batched_tokens_kwargs(opts["max_num_batched_tokens"]))


def _params(opts: dict):
    from lmdepot.runtime.sequence import SamplingParams

    return SamplingParams(max_tokens=opts["max_new_tokens"], temperature=opts["temperature"], top_p=opts["top_p"],
                          top_k=opts["top_k"], repetition_penalty=opts["repetition_penalty"], seed=opts["seed"])


def _stream(engine, ids, params, session_id=None):
    seq = engine.add_request(ids, params, session_id=session_id)
    try:
        while not seq.finished:
            for out in engine.step():
                if out.seq_id == seq.id and out.text:
                    click.echo(out.text, nl=False)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        engine.abort(seq.id)
        click.echo(" [interrupted]", nl=False)
    return seq


def _stats_line(prompt_tokens: int, output_tokens: int, seconds: float) -> str:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (f"[lmdepot] {prompt_tokens} prompt + {output_tokens} generated tokens in {seconds:.2f} s"
            f" ({output_tokens / seconds:.1f} tok/s end to end); peak memory {peak:.0f} MiB (RSS)")


@click.command()
@click.argument("model")
@click.option("--prompt", required=True, help="Prompt text (a user message, unless --no-chat-template).")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option("--stats", is_flag=True, help="Print token counts, tokens/s and peak memory to stderr.")
@_runtime_options
def generate(model, prompt, no_chat_template, stats, **opts):
    """Complete one prompt; prints only the completion. MODEL: workspace dir or NAME:TAG."""
    import time

    from lmdepot.runtime.llm import encode_prompt

    params = _params(opts)
    llm = _open(model, opts)
    try:
        ids = encode_prompt(llm.tokenizer, prompt, chat_template=not no_chat_template)
        start = time.perf_counter()
        seq = _stream(llm.engine, ids, params)
        elapsed = time.perf_counter() - start
        click.echo()
        if stats:
            click.echo(_stats_line(len(ids), len(seq.token_ids) - len(ids), elapsed), err=True)
    finally:
        llm.close()


def _read_turn(prompt: str) -> str | None:
    """Lines up to an empty one (a double enter); None at end of input."""
    click.echo(prompt, nl=False)
    lines = []
    while True:
        line = sys.stdin.readline()
        if not line:
            return None if not lines else "\n".join(lines)
        line = line.rstrip("\n")
        if line == "" and lines:
            return "\n".join(lines)
        if line.strip() == "exit" and not lines:
            return "exit"  # quitting needs no second enter
        if line != "" or lines:
            lines.append(line)


@click.command()
@click.argument("model")
@_runtime_options
def chat(model, **opts):
    """Interactive chat; end an input with a double enter, `exit` quits. MODEL: workspace dir or NAME:TAG."""
    from lmdepot.runtime.llm import encode_prompt

    params = _params(opts)
    llm = _open(model, opts)
    engine, tok = llm.engine, llm.tokenizer
    messages: list[dict] = []
    session = 0
    try:
        while True:
            text = _read_turn("\ndouble enter to end input >>> ")
            if text is None or text.strip() == "exit":
                break
            history = engine.scheduler.sessions[session].token_ids if session in engine.scheduler.sessions else []
            messages.append({"role": "user", "content": text})
            full = encode_prompt(tok, messages, chat_template=True)
            if full[:len(history)] != history:
                # the template does not re-render our history token for token: start over from the text
                engine.end_session(session)
                session += 1
                history = []
            try:
                _stream(engine, full[len(history):], params, session_id=session)
            except RequestError as exc:
                click.echo(f"error: {exc}; starting a new conversation", err=True)
                engine.end_session(session)
                session += 1
                messages = []
                continue
            click.echo()
            reply = engine.scheduler.sessions[session].token_ids[len(full):]
            messages.append({"role": "assistant", "content": tok.decode(reply, skip_special_tokens=True)})
    finally:
        llm.close()
