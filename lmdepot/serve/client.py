"""`lmdepot serve api_client URL`: a terminal chat over the OpenAI API, streaming each reply."""

from __future__ import annotations

import json
import sys

import click

from lmdepot.errors import LmdepotError


class ClientError(LmdepotError):
    """The server is unreachable or refused a request."""


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _fail(resp) -> None:
    try:
        message = resp.json()["error"]["message"]
    except Exception:
        message = resp.text[:200]
    raise ClientError(f"HTTP {resp.status_code}: {message}")


def stream_chat(http, url: str, body: dict):
    """Yield content deltas of one streamed chat completion."""
    with http.stream("POST", f"{url}/chat/completions", json=body | {"stream": True}) as resp:
        if resp.status_code != 200:
            resp.read()
            _fail(resp)
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                raise ClientError(obj["error"].get("message", "server error"))
            for choice in obj.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text


def run_client(url, api_key, model, system, temperature, top_p, max_tokens) -> None:
    import httpx

    from lmdepot.runtime.cli import _read_turn

    url = base_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=httpx.Timeout(10.0, read=None)) as http:
        try:
            resp = http.get(f"{url}/models")
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach {url}: {exc}") from None
        if resp.status_code != 200:
            _fail(resp)
        model = model or resp.json()["data"][0]["id"]
        click.echo(f"connected to {url}, model {model}", err=True)
        messages = [{"role": "system", "content": system}] if system else []
        while True:
            text = _read_turn("\ndouble enter to end input >>> ")
            if text is None or text.strip() == "exit":
                break
            messages.append({"role": "user", "content": text})
            body = {"model": model, "messages": messages, "temperature": temperature, "top_p": top_p}
            if max_tokens:
                body["max_tokens"] = max_tokens
            reply = []
            try:
                for delta in stream_chat(http, url, body):
                    reply.append(delta)
                    click.echo(delta, nl=False)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                click.echo(" [interrupted]", nl=False)
            except (ClientError, httpx.HTTPError) as exc:
                click.echo(f"\nerror: {exc}", err=True)
                messages.pop()
                continue
            click.echo()
            messages.append({"role": "assistant", "content": "".join(reply)})
