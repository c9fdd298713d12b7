"""The ASGI application: routes, the checks every request passes, errors, and the page.

`create_app(served, ...)` builds it around one loaded model and starts that model's worker
thread with the app (lifespan). Every HTTP request goes through `Guard` first: the API key
(when one is set; the page itself needs none), the body size limit, and one log line when the
response is done. Errors of every kind become JSON in the API's shape (see `errors.py`): a
request never gets a traceback and never takes the server down. The only file served is the
page, from memory: no route reads a path from the request.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmft.serving import ollama_api, openai_api
from llmft.serving.batcher import ClassifyBatcher, GenerationBatcher, GenerationJob, Worker
from llmft.serving.bridge import Context, Limits
from llmft.serving.errors import RequestError, error_response
from llmft.serving.served import ClassifierModel, ServedModel

log = logging.getLogger("llmft.serve")

PAGE = Path(__file__).with_name("static") / "index.html"
PUBLIC_PATHS = {"/", "/index.html"}  # the page: no API key needed to load it


class Guard:
    """ASGI middleware in front of every route: API key, body size limit (bodies are read
    as JSON, whatever their Content-Type), one log line."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began, status = time.perf_counter(), []
        state = scope.setdefault("state", {})

        async def recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        # Bodies are JSON whatever they are labelled: `curl -d` says x-www-form-urlencoded.
        scope["headers"] = [h for h in scope["headers"] if h[0] != b"content-type"] + \
            [(b"content-type", b"application/json")]
        try:
            refused = self._refused(scope)
            body = None if refused else await self._body(scope, receive)
            if isinstance(body, RequestError) or refused:
                await error_response(scope["path"], refused or body)(scope, receive, recorded)
            else:
                await self.app(scope, _replay(body, receive), recorded)
        finally:
            log.info("%s %s %s %s %.0f ms%s", (scope.get("client") or ("-",))[0], scope["method"], scope["path"],
                     status[0] if status else "-", (time.perf_counter() - began) * 1000, _job_summary(state))

    def _refused(self, scope: Scope) -> RequestError | None:
        """A 401 when an API key is set and the request does not carry it (as a Bearer token)."""
        if self.api_key is None or scope["path"] in PUBLIC_PATHS:
            return None
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return None
        return RequestError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)",
                            code="invalid_api_key")

    async def _body(self, scope: Scope, receive: Receive) -> bytes | RequestError:
        """The whole request body, or a 413 once it is longer than the limit."""
        too_long = RequestError(413, f"the request body is larger than this server's limit of {self.max_body} bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body:
            return too_long
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # the client left: the route will find out
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return too_long
            if not message.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read already, then passes on (to hear a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _job_summary(state: dict[str, Any]) -> str:
    job = state.get("job")
    if isinstance(job, GenerationJob):
        return f" | {len(job.prompt)} prompt + {len(job.tokens)} new tokens ({job.finish_reason})"
    return f" | {len(job.texts)} text(s)" if job is not None else ""


def validation_error(error: RequestValidationError) -> RequestError:
    """The first problem pydantic found in a body, as a 400 naming the field."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"][1:])
    if first["type"] == "json_invalid":
        return RequestError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])} "
                            f"at character {field or 0})")
    if not field:
        return RequestError(400, "the body must be a JSON object with the request's fields")
    return RequestError(400, f"{field}: {first['msg'].removeprefix('Value error, ')}", param=field)


def _add_error_handlers(app: FastAPI) -> None:
    async def request_error(request: Request, e: RequestError) -> Response:
        return error_response(request.url.path, e)

    async def invalid(request: Request, e: RequestValidationError) -> Response:
        return error_response(request.url.path, validation_error(e))

    async def http_error(request: Request, e: HTTPException) -> Response:
        message = f"no route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return error_response(request.url.path, RequestError(e.status_code, message, headers=e.headers))

    async def unexpected(request: Request, e: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(request.url.path, RequestError(500, f"internal error ({type(e).__name__})"))

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def make_worker(served: ServedModel, max_batch: int, max_queue: int, prepack: bool = True) -> Worker:
    """The worker thread for the model: continuous batching of generations, or batched
    classification."""
    if isinstance(served, ClassifierModel):
        return ClassifyBatcher(served.probabilities, max_batch, max_queue)
    return GenerationBatcher(served.model, max_batch, max_queue, prepack)


def create_app(served: ServedModel, *, api_key: str | None = None, max_batch: int = 16, max_queue: int = 64,
               limits: Limits | None = None, prepack: bool = True) -> FastAPI:
    """The server's application for one loaded model (`load_served`): up to `max_batch`
    requests computed together, `max_queue` more waiting (then 503)."""
    worker = make_worker(served, max_batch, max_queue, prepack)
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="llmft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmft = Context(served, worker, limits, anyio.CapacityLimiter(worker.capacity + 8))
    app.add_middleware(Guard, api_key=api_key, max_body=limits.max_body)
    _add_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
