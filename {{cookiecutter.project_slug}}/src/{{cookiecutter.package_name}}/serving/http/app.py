"""The OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions (streamed or not),
/v1/models, /health, /ready and /metrics, over the generation thread (`generation.py`).

Status codes as OpenAI's clients expect them: 400 bad input, 401 bad key, 404 unknown model,
429 full (with Retry-After), 503 not ready or draining, 500 an engine failure.
"""

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ...engine.service import InferenceService, limits_of
from ...messages import Reply, RequestError
from ...settings import Settings
from .generation import Full, Generation
from .metrics import Metrics
from .openai_api import Chunks, Endpoint, error_body, read_body, response, to_request

log = logging.getLogger(__name__)
REGISTRY_VERSION = re.compile(r"/registry/[^/]+/v(\d+)-")
STATUS = {"model_not_found": 404, "not_ready": 503, "draining": 503, "generation_failed": 500,
          "server_full": 429, "reply_timeout": 504}  # fmt: skip


@dataclass
class State:
    """What the routes share; `generation` is set once the model is loaded and warm."""

    settings: Settings
    metrics: Metrics
    model_name: str
    generation: Any = None  # a Generation, or a QueueGateway (`serve --via-queue`)
    ready: bool = False
    draining: bool = False
    admitting: int = 0  # requests between their first check and their submission
    created: int = field(default_factory=lambda: int(time.time()))
    version: str | None = None

    def warm(self, service: InferenceService) -> None:
        self.generation = Generation(service, self.settings, self.metrics)
        self.generation.thread.start()
        model_dir = service.backend.describe().get("model_dir", "")
        if found := REGISTRY_VERSION.search(model_dir):
            self.version = found.group(1)


def fail(state: State, code: str, message: str, status: int = 400, **headers: str) -> JSONResponse:
    state.metrics.error(code)
    return JSONResponse(error_body(code, message, status), status_code=status, headers=headers)


def create_app(state: State, start: Callable[[], Awaitable[list[asyncio.Task]]]) -> FastAPI:
    """The API over `state`; `start` begins its background tasks (cancelled at shutdown)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = await start()
        yield
        for task in tasks:
            task.cancel()

    app = FastAPI(title="OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)
    if state.settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.state.service = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.ready and not state.draining and state.generation.ready:
            return JSONResponse({"status": "ready"})
        status = "draining" if state.draining else "loading" if not state.ready else "no engine"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(http: Request) -> JSONResponse:
        if denied := _denied(state, http):
            return denied
        card: dict[str, Any] = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "{{ cookiecutter.project_slug }}",
            "root": state.settings.model,
        }
        if state.version is not None:
            card["version"] = state.version
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Response:
        return await complete(state, http, "chat")

    @app.post("/v1/completions")
    async def completions(http: Request) -> Response:
        return await complete(state, http, "completion")

    return app


def _denied(state: State, http: Request) -> JSONResponse | None:
    """401 unless the request bears the API key (compared in constant time), when one is set."""
    key = state.settings.api_key
    if key is None:
        return None
    given = http.headers.get("authorization", "")
    expected = f"Bearer {key.get_secret_value()}"
    if hmac.compare_digest(given.encode(), expected.encode()):
        return None
    return fail(state, "invalid_api_key", "Incorrect API key provided", 401)


async def complete(state: State, http: Request, endpoint: Endpoint) -> Response:
    if denied := _denied(state, http):
        return denied
    state.admitting += 1  # a drain waits for it: it is answered, one way or the other
    try:
        return await _complete(state, http, endpoint)
    finally:
        state.admitting -= 1


async def _complete(state: State, http: Request, endpoint: Endpoint) -> Response:
    generation = state.generation
    if state.draining or not state.ready or generation is None:
        why = "draining" if state.draining else "not_ready"
        return fail(
            state, why, f"the server is {why.replace('_', ' ')}", 503, **{"Retry-After": "5"}
        )
    limits = limits_of(state.settings)
    try:
        raw = await _read(http, limits.max_request_bytes)
        body = read_body(raw, endpoint, limits)
    except RequestError as exc:
        return fail(state, exc.kind, str(exc))
    if body["model"] != state.model_name:
        return fail(
            state, "model_not_found", f"The model `{body['model'][:100]}` does not exist", 404
        )
    request_id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex
    try:
        ours = to_request(body, endpoint, request_id)
    except RequestError as exc:
        return fail(state, exc.kind, str(exc))
    admitted = await run_in_threadpool(generation.admit, ours, request_id)
    if isinstance(admitted, Reply):
        assert admitted.error is not None
        return fail(state, admitted.error.type, admitted.error.message)
    if state.draining:  # it began to drain while this request was read
        return fail(state, "draining", "the server is draining", 503, **{"Retry-After": "5"})
    try:
        job = generation.submit(admitted, asyncio.get_running_loop())
    except Full as exc:
        return fail(state, "server_full", str(exc), 429, **{"Retry-After": str(exc.retry_after)})
    except RuntimeError as exc:  # the generation thread died: the watchdog is exiting
        return fail(state, "generation_failed", str(exc), 503)
    # The first event decides the status: an error before any text (a worker's refusal in
    # queue mode) is an HTTP error, not a stream that fails.
    event = await _next(job, http)
    while event is not None and not body.get("stream") and event[0] != "done":
        event = await _next(job, http)
    if event is None:  # the client went away
        return Response(status_code=499)
    if event[0] == "done" and event[1].error is not None:
        error = event[1].error
        status = STATUS.get(error.type, 400)
        return JSONResponse(error_body(error.type, error.message, status), status)
    if body.get("stream"):
        options = body.get("stream_options") or {}
        chunks = Chunks(request_id, endpoint, state.model_name, bool(options.get("include_usage")))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            _stream(job, chunks, event), media_type="text/event-stream", headers=headers
        )
    return JSONResponse(response(event[1], endpoint, state.model_name, int(time.time())))


async def _read(http: Request, limit: int) -> bytes:
    """The body, refused as soon as it is over `limit` bytes (never read whole first)."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            "request_too_large", f"request is {declared} bytes, over the limit of {limit}"
        )
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError("request_too_large", f"request is over the limit of {limit} bytes")
    return bytes(body)


async def _next(job: Any, http: Request) -> tuple | None:
    """The request's next event; None (and the request stopped) if its client left."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=1.0)
        except TimeoutError:
            if await http.is_disconnected():
                job.cancelled = True
                return None


async def _stream(job: Any, chunks: Chunks, event: tuple) -> AsyncIterator[bytes]:
    """The events of a streamed request from `event` on; if the client goes away, its request
    stops."""
    try:
        if first := chunks.first():
            yield first
        while True:
            kind, *rest = event
            if kind == "delta":
                yield chunks.delta(rest[0])
                event = await job.events.get()
                continue
            reply, tail = rest
            if reply.error is not None:
                yield chunks.error(reply.error.type, reply.error.message)
            else:
                if tail:
                    yield chunks.delta(tail)
                yield chunks.last(reply)
            return
    finally:
        job.cancelled = True  # a no-op once it is done; else it leaves the batch
