"""`serve`: uvicorn in front of the API, the model loaded behind it.

The socket opens at once (/health answers, /ready says 503) while the model loads and one token
is generated to warm it; then /ready says 200. SIGTERM (or Ctrl-C) drains: /ready and new
requests get 503, requests in flight finish for up to DRAIN_TIMEOUT_S, then the process exits;
a second signal exits at once. If the model cannot load or the generation thread dies, the
process exits with status 3 so that its supervisor restarts it.
"""

import asyncio
import logging
import os
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from ...engine.service import InferenceService
from ...errors import one_line
from ...settings import Settings
from .app import State, create_app
from .metrics import Metrics

log = logging.getLogger(__name__)
EXIT_FAILED = 3


class Server(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains instead of closing the socket: a request
    that arrives while draining is answered 503, not refused at the TCP level. (Not recorded
    as captured, so uvicorn does not raise the signal again on the way out: exit status 0.)"""

    def __init__(self, config: uvicorn.Config, state: State) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.state.ready:  # nothing to drain; the model may still be loading
            log.info("signal %d while loading: exiting", sig)
            os._exit(128 + sig)
        if self.state.draining:  # a second signal: now
            self.should_exit = self.force_exit = True
            return
        log.info("signal %d: draining (at most %.0f s)", sig, self.state.settings.drain_timeout_s)
        self.state.draining = True

    def stop(self, code: int) -> None:
        self.exit_code = self.exit_code or code
        self.should_exit = True


def serve(settings: Settings, load: Callable[[], InferenceService] | None) -> int:
    """Run the API until drained or stopped; return the process's exit status. With no `load`,
    the requests go through RabbitMQ to the workers (`queue_gateway.py`)."""
    name = settings.served_model_name or settings.model
    state = State(settings, Metrics(name), name)
    server: Server | None = None

    async def start() -> list[asyncio.Task]:
        assert server is not None
        if load is None:
            from .queue_gateway import QueueGateway

            state.generation = QueueGateway(settings, state.metrics)
            state.generation.thread.start()
            state.ready = True  # /ready also asks the gateway: connected, with a worker
            return [asyncio.create_task(_watch(state, server))]
        return [
            asyncio.create_task(_load(state, load, server)),
            asyncio.create_task(_watch(state, server)),
        ]

    app = create_app(state, start)
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="warning",
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = Server(config, state)
    log.info("serving on http://%s:%d (model %s)", settings.http_host, settings.http_port, name)
    server.run()
    return server.exit_code


async def _load(state: State, load: Callable[[], InferenceService], server: Server) -> None:
    """Load the model off the event loop, warm it with one token, then say ready."""
    try:
        service = await asyncio.to_thread(load)
        state.warm(service)
        assert state.generation is not None
        started = time.perf_counter()
        warmup = service.admit({"prompt": "Hi", "max_new_tokens": 1}, "warmup")
        if not hasattr(warmup, "request"):
            raise RuntimeError(f"the warm-up request was refused: {warmup}")
        loop = asyncio.get_running_loop()
        job = state.generation.submit(warmup, loop, internal=True)
        while (event := await job.events.get())[0] != "done":
            pass
        if event[1].error is not None:
            raise RuntimeError(f"the warm-up request failed: {event[1].error.message}")
        log.info("ready: warm-up token in %.2f s", time.perf_counter() - started)
        state.ready = True
    except Exception as exc:  # noqa: BLE001 - one line, and the supervisor restarts us
        log.critical("the model could not be loaded: %s", one_line(exc))
        server.stop(EXIT_FAILED)


async def _watch(state: State, server: Server) -> None:
    """Exit when the generation thread dies; when draining, once nothing is in flight."""
    deadline = None
    while not server.should_exit:
        await asyncio.sleep(0.2)
        generation = state.generation
        if generation is not None and not generation.thread.is_alive():
            log.critical("the %s thread died: exiting", generation.thread.name)
            server.stop(EXIT_FAILED)
        elif state.draining:
            deadline = deadline or time.monotonic() + state.settings.drain_timeout_s
            left = (len(generation.jobs) if generation else 0) + state.admitting
            if not left or time.monotonic() > deadline:
                if left:
                    log.warning("drain timeout: %d requests were still in flight", left)
                server.stop(0)
