"""`serve --via-queue`: the HTTP API in front of the RabbitMQ workers (plain or Ray), so one
gateway, which loads no model, fronts many workers on many machines.

Each request is published to the request queue (confirmed, persistent) with `stream: true` and
this gateway's reply queue as reply_to; the worker serving it publishes text chunks
(`{"offset", "delta"}`) as it decodes, then the reply, which holds the whole text. Chunks are
deduplicated by offset: if the worker dies mid-stream, the broker gives the request to another
worker, whose chunks repeat the text from the start; a greedy answer goes on where it stopped,
a sampled one that comes out different ends with an error event. A request with no reply within
REPLY_TIMEOUT_S ends with an error, never a hang. /ready is 200 while the broker is connected
and at least one worker consumes the request queue.
"""

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.exceptions import NackError, UnroutableError

from ...errors import one_line
from ...messages import Reply, Request, RequestError, parse_request
from ...settings import Settings, redact_url
from ..queue.session import CHUNK_TYPE, CONNECTION_ERRORS
from ..queue.topology import Names, connection_parameters, declare, declare_reply_queue, options_for
from .generation import Full, emit
from .metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Queued:
    """A validated request, not yet published."""

    request: Request
    received: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class QueueJob:
    queued: Queued
    loop: asyncio.AbstractEventLoop
    correlation_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    sent: str = ""
    last: float | None = None
    deadline: float = 0.0

    def emit(self, *item: Any) -> None:
        emit(self, item)


class QueueGateway:
    """What the routes drive in queue mode: `admit`, `submit`, `jobs`, `ready`, `thread`."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.names = Names(settings.queue_prefix)
        self.reply_queue = self.names.replies(f"gateway-{uuid.uuid4().hex[:12]}")
        self.jobs: dict[str, QueueJob] = {}
        self.lock = threading.Lock()
        self.outbox: queue.Queue[QueueJob] = queue.Queue()
        self.connected = threading.Event()
        self.workers = 0
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="gateway-broker", daemon=True)

    @property
    def ready(self) -> bool:
        return self.connected.is_set() and self.workers > 0

    def admit(self, raw: dict[str, Any], request_id: str) -> Queued | Reply:
        """Validate with the request schema; the worker tokenizes and checks the context."""
        from ...engine.service import limits_of

        try:
            request = parse_request({**raw, "stream": True}, limits=limits_of(self.settings))
        except RequestError as exc:
            return Reply.failure(request_id, exc)
        return Queued(request)

    def submit(self, queued: Queued, loop: asyncio.AbstractEventLoop) -> QueueJob:
        if not self.connected.is_set():
            raise RuntimeError("the broker is not connected")
        job = QueueJob(queued, loop, deadline=time.monotonic() + self.settings.reply_timeout_s)
        with self.lock:
            if len(self.jobs) >= self.settings.max_batch_size + self.settings.max_waiting:
                raise Full(1)
            self.jobs[job.correlation_id] = job
        self.outbox.put(job)
        return job

    # -- the broker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 1.0
        while True:
            try:
                self._session()
            except CONNECTION_ERRORS as exc:
                self.connected.clear()
                log.warning("broker connection lost (%s); reconnecting in %.0f s",
                            one_line(exc), backoff)  # fmt: skip
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except BaseException as exc:  # the server's watchdog exits with it
                log.critical("the gateway's broker thread died", exc_info=True)
                self.failure = exc
                return

    def _session(self) -> None:
        parameters = connection_parameters(self.settings.rabbitmq_url, self.settings.heartbeat_s)
        connection = pika.BlockingConnection(parameters)
        channel = connection.channel()
        declare(channel, self.names, options_for(self.settings))
        declare_reply_queue(channel, self.reply_queue)
        channel.confirm_delivery()
        channel.basic_consume(self.reply_queue, self._on_message)
        log.info("gateway connected to %s; replies on %s",
                 redact_url(self.settings.rabbitmq_url), self.reply_queue)  # fmt: skip
        self.connected.set()
        checked = 0.0
        while True:
            connection.process_data_events(time_limit=0.01)
            while True:
                try:
                    self._publish(channel, self.outbox.get_nowait())
                except queue.Empty:
                    break
            if time.monotonic() - checked > 2.0:
                checked = time.monotonic()
                found = channel.queue_declare(self.names.requests, passive=True)
                self.workers = found.method.consumer_count
                self._expire()

    def _publish(self, channel: Any, job: QueueJob) -> None:
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            correlation_id=job.correlation_id,
            reply_to=self.reply_queue,
        )
        body = job.queued.request.model_dump_json(exclude_none=True)
        try:
            channel.basic_publish("", self.names.requests, body, properties, mandatory=True)
        except (NackError, UnroutableError):  # the queue is full (QUEUE_MAX_LENGTH)
            self._finish(job, Reply.failure(job.queued.request.id, FULL))

    def _expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [job for job in self.jobs.values() if job.deadline < now]
        for job in late:
            error = RequestError("reply_timeout", "no worker answered within REPLY_TIMEOUT_S")
            self._finish(job, Reply.failure(job.queued.request.id, error))

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        with self.lock:
            job = self.jobs.get(properties.correlation_id or "")
        if job is None:  # late: it was answered, timed out or gone
            return
        try:
            if properties.type == CHUNK_TYPE:
                chunk = json.loads(body)
                self._chunk(job, int(chunk["offset"]), str(chunk["delta"]))
            else:
                self._finish(job, Reply.model_validate_json(body))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("a malformed message on %s: %s", self.reply_queue, one_line(exc))

    def _chunk(self, job: QueueJob, offset: int, delta: str) -> None:
        """Forward what is new in a chunk; a repeat (a redelivered request) that disagrees with
        what was sent ends the request."""
        if not 0 <= offset <= len(job.sent) or offset + len(delta) <= len(job.sent):
            return  # a gap (the reply will fill it) or old news
        overlap = job.sent[offset:]
        if not delta.startswith(overlap):
            self._finish(job, Reply.failure(job.queued.request.id, DIVERGED))
            return
        new = delta[len(overlap) :]
        now = time.perf_counter()
        if not job.sent:
            self.metrics.ttft.observe(now - job.queued.received)
        elif job.last is not None:
            self.metrics.itl.observe(now - job.last)
        job.sent, job.last = job.sent + new, now
        job.emit("delta", new)

    def _finish(self, job: QueueJob, reply: Reply) -> None:
        with self.lock:
            if self.jobs.pop(job.correlation_id, None) is None:
                return
        self.metrics.e2e.observe(time.perf_counter() - job.queued.received)
        if reply.error is not None:
            self.metrics.error(reply.error.type)
            job.emit("done", reply, "")
        elif not reply.text.startswith(job.sent):
            self.metrics.error(DIVERGED.kind)
            job.emit("done", Reply.failure(reply.id, DIVERGED), "")
        else:
            usage = reply.usage
            self.metrics.finished(reply.finish_reason, usage.prompt_tokens, usage.completion_tokens)
            job.emit("done", reply, reply.text[len(job.sent) :])


FULL = RequestError("server_full", "the request queue is full (QUEUE_MAX_LENGTH)")
DIVERGED = RequestError(
    "generation_failed",
    "the worker serving this request died and its retry wrote another text; send it again",
)
