"""FastAPI factory: state, auth, admission control, OpenAI-style errors, health and metrics."""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmdepot.errors import LmdepotError
from lmdepot.serve.metrics import Metrics
from lmdepot.serve.protocol import error_body, now

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class ServeConfig:
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    tool_call_parser: str | None = None          # None: detected from the chat template
    max_queued_requests: int = 256               # admitted beyond max_batch_size before answering 429
    allow_origins: list[str] = field(default_factory=list)


class ServerState:
    def __init__(self, llm, cfg: ServeConfig):
        from lmdepot.serve.structured import Grammars
        from lmdepot.serve.tools import detect_parser

        self.llm, self.cfg = llm, cfg
        engine = llm.engine
        self.tokenizer = llm.tokenizer
        self.session_len = engine.session_len
        self.metrics = Metrics(engine)
        self.grammars = Grammars(self.tokenizer, engine.cfg.vocab_size, engine.eos_ids)
        self.parser = cfg.tool_call_parser or detect_parser(self.tokenizer.chat_template)
        self.capacity = engine.scheduler.max_batch_size + cfg.max_queued_requests
        self.inflight = 0
        self.created = now()
        self.sessions: dict[int, object] = {}    # interactive session id -> cancel event of its turn

    def check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise HTTPException(404, f"The model `{name}` does not exist. Available: {self.cfg.model_name}")

    def acquire(self) -> None:
        """A bounded queue: beyond capacity a request is refused at once, with a hint when to retry.
        Streaming responses release in their generator's finally, so this is not a context manager."""
        if self.inflight >= self.capacity:
            self.metrics.rejected.inc()
            raise HTTPException(429, f"the server is busy ({self.inflight} requests in flight); retry later",
                                headers={"Retry-After": "1"})
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1


def _error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, _TYPES.get(status, "server_error"), status), status, headers=headers)


class _AuthAndCount:
    """Bearer-key check on /v1 routes, and the requests-by-route-and-status counter."""

    def __init__(self, app, state: ServerState, api_keys: list[str]):
        self.app, self.state, self.keys = app, state, [k.encode() for k in api_keys]

    def _authorized(self, scope) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        token = auth[7:] if auth[:7].lower() == b"bearer " else b""
        return any(secrets.compare_digest(token, k) for k in self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counter = self.state.metrics.requests
        if self.keys and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS" \
                and not self._authorized(scope):
            counter.labels("auth", "401").inc()
            response = _error(401, "Incorrect or missing API key. Send it as `Authorization: Bearer KEY`.")
            return await response(scope, receive, send)
        status = ["500"]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            counter.labels(getattr(scope.get("route"), "path", "unmatched"), status[0]).inc()


def create_app(llm, cfg: ServeConfig, owns_llm: bool = False) -> FastAPI:
    """An OpenAI-compatible app on an AsyncLLM. owns_llm: close it when the app shuts down."""
    from lmdepot.serve.interactive import router as interactive_router
    from lmdepot.serve.openai_routes import router as openai_router

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if owns_llm:
            llm.close()

    app = FastAPI(title="lmdepot api_server", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API over the lmdepot runtime")
    state = app.state.serve = ServerState(llm, cfg)
    # Plain ASGI rather than @app.middleware("http"): that wrapper hides client disconnects from
    # the routes, and a non-streamed request could then not be aborted when its client goes away.
    app.add_middleware(_AuthAndCount, state=state, api_keys=cfg.api_keys)
    if cfg.allow_origins:  # added last, so outermost: preflights and 401s carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=cfg.allow_origins, allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return _error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(LmdepotError)
    async def _user(request, exc: LmdepotError):
        return _error(400, str(exc))

    @app.get("/health")
    async def health():
        if not llm.alive:
            return _error(503, "the engine has stopped")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(state.inflight), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": state.created,
                                            "owned_by": "lmdepot", "root": cfg.model_name,
                                            "max_model_len": state.session_len}]}

    app.include_router(openai_router)
    app.include_router(interactive_router)
    return app
