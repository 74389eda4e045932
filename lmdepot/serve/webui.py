"""`lmdepot serve gradio URL`: one HTML page plus a proxy to the api_server.

The page talks only to this server, which forwards chats to the api_server: no CORS setup, and the
API key stays server-side. A stopped reply (the page aborts its fetch) closes the upstream stream,
which makes the api_server abort the request and free its KV blocks.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from lmdepot.serve.client import base_url
from lmdepot.serve.protocol import error_body


def create_webui_app(url: str, api_key: str | None = None) -> FastAPI:
    import httpx

    upstream = base_url(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    page = resources.files("lmdepot.serve").joinpath("static/webui.html").read_text(encoding="utf-8")
    app = FastAPI(title="lmdepot web UI", docs_url=None, redoc_url=None, openapi_url=None)
    state: dict = {}

    def http() -> httpx.AsyncClient:
        if "http" not in state:
            state["http"] = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(10.0, read=None))
        return state["http"]

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/api/models")
    async def models():
        try:
            resp = await http().get(f"{upstream}/models")
        except httpx.HTTPError as exc:
            return JSONResponse(error_body(f"api_server unreachable: {exc}", "server_error"), 502)
        return JSONResponse(resp.json(), resp.status_code)

    @app.post("/api/chat")
    async def chat(request: Request):
        body = await request.body()
        req = http().build_request("POST", f"{upstream}/chat/completions", content=body,
                                   headers={"content-type": "application/json"})
        try:
            resp = await http().send(req, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse(error_body(f"api_server unreachable: {exc}", "server_error"), 502)
        if resp.status_code != 200:
            content = await resp.aread()
            await resp.aclose()
            return JSONResponse(content=_json_or_error(content, resp.status_code), status_code=resp.status_code)

        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()  # the browser went away or pressed stop: end the upstream request

        return StreamingResponse(relay(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _json_or_error(content: bytes, status: int):
    import json

    try:
        return json.loads(content)
    except ValueError:
        return error_body(content.decode("utf-8", "replace")[:500], "server_error", status)
