"""The HTTP server's generation thread: it drives the engine's scheduler (continuous batching
on transformers, streamed whole batches otherwise) and hands each request's text to its
asyncio task as it is decoded.

Admission is bounded: past a full batch (MAX_BATCH_SIZE), at most MAX_WAITING requests wait;
one more is refused (`Full`, an HTTP 429) rather than queued without end. A request whose
client went away is stopped at its next token. If the thread dies, every request in hand gets
an error and `failure` says why: the server's watchdog then exits non-zero.
"""

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ...engine.backend import Cancelled
from ...engine.service import Admitted, InferenceService
from ...engine.streaming import TextStream, eos_ids_of
from ...messages import Reply, RequestError
from ...settings import Settings
from .metrics import Metrics

log = logging.getLogger(__name__)


class Full(Exception):
    """The waiting queue is full; `retry_after` is an estimate in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request in flight: its events go to `events` as ("delta", text) or ("done", reply,
    rest of the text)."""

    admitted: Admitted
    loop: asyncio.AbstractEventLoop
    text: TextStream
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    internal: bool = False  # the warm-up: not in the metrics
    tokens: int = 0
    first: float | None = None
    last: float | None = None

    @property
    def id(self) -> str:
        return str(self.admitted.request.id)

    def emit(self, *item: Any) -> None:
        emit(self, item)


def emit(job: "Job | Any", item: tuple) -> None:
    """Hand an event to the request's task, from any thread (of a Job or a queue gateway job)."""
    try:
        job.loop.call_soon_threadsafe(job.events.put_nowait, item)
    except RuntimeError:  # the loop closed: the server is gone
        pass


class Generation:
    def __init__(self, service: InferenceService, settings: Settings, metrics: Metrics) -> None:
        self.service, self.settings, self.metrics = service, settings, metrics
        self.scheduler = service.scheduler(settings)
        self.scheduler.on_token = self._on_token
        self.scheduler.on_start = self._on_start
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.jobs: set[Job] = set()  # accepted, not finished
        self.started: set[Job] = set()  # of those, in the running batch
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self.eos_ids = eos_ids_of(service.backend, service.backend.tokenizer)

    def admit(self, raw: dict[str, Any], request_id: str) -> Admitted | Reply:
        return self.service.admit(raw, request_id)

    @property
    def ready(self) -> bool:
        return self.failure is None

    @property
    def waiting(self) -> int:
        return max(0, len(self.jobs) - len(self.started))

    def submit(
        self, admitted: Admitted, loop: asyncio.AbstractEventLoop, internal: bool = False
    ) -> Job:
        """Queue a request; raise Full when a full batch runs and MAX_WAITING requests wait."""
        with self.lock:  # the thread's failure is set under it: no job is accepted after it
            if self.failure is not None or not self.thread.is_alive():
                raise RuntimeError("the generation thread is not running")
            if len(self.jobs) >= self.settings.max_batch_size + self.settings.max_waiting:
                raise Full(self._retry_after())
            tokenizer, stops = self.service.backend.tokenizer, admitted.request.params.stop
            job = Job(admitted, loop, TextStream(tokenizer, stops, self.eos_ids), internal=internal)
            self.jobs.add(job)
        self.inbox.put(job)
        self.metrics.waiting.set(self.waiting)
        return job

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean request time, per batch of waiters."""
        count, total = _histogram_totals(self.metrics.e2e)
        mean = total / count if count else 1.0
        batches = self.waiting / max(1, self.settings.max_batch_size) + 1
        return max(1, min(60, math.ceil(mean * batches)))

    def _loop(self) -> None:
        try:
            while True:
                self._take(block=not len(self.scheduler))
                done = self.scheduler.step()
                size = len(done) + len(self.scheduler.running)
                if size and (done or self.scheduler.step_decodes):  # not each poll of a batch
                    self.metrics.batch_size.observe(size)
                for job, result in done:
                    self._finish(job, self.service.reply(job.admitted, result))
        except BaseException as exc:  # the server's watchdog exits with it
            log.critical("the generation thread died", exc_info=True)
            failed = RequestError("generation_failed", "the generation thread died; exiting")
            with self.lock:
                self.failure = exc
                jobs, self.jobs, self.started = list(self.jobs), set(), set()
            for job in jobs:
                job.emit("done", Reply.failure(job.admitted.request.id, failed), "")

    def _take(self, block: bool) -> None:
        arrived = _drain(self.inbox)
        if not arrived and block:
            try:
                arrived = [self.inbox.get(timeout=0.2)]
            except queue.Empty:
                return
        for job in arrived:
            self._fault(job)
            if job.cancelled:  # gone before it started
                self._finish(job, self.service.reply(job.admitted, Cancelled()))
            else:
                self.scheduler.add(job.admitted.request, job)

    def _on_start(self, job: Job) -> None:
        with self.lock:
            self.started.add(job)
        self._gauges()
        if not job.internal:
            self.metrics.queue_time.observe(time.perf_counter() - job.admitted.received)

    def _on_token(self, job: Job, token: int) -> bool:
        """Hand the token's text to the request's task; True stops the request (its client left,
        or its text could not be decoded: it alone ends, as cancelled)."""
        if job.cancelled:
            log.info("%s: the client went away; stopped after %d tokens", job.id, job.tokens)
            return True
        job.tokens += 1
        now = time.perf_counter()
        if not job.internal:
            if job.first is None:
                self.metrics.ttft.observe(now - job.admitted.received)
            elif job.last is not None:
                self.metrics.itl.observe(now - job.last)
        job.first, job.last = job.first or now, now
        try:
            delta = job.text.push(token)
        except Exception:  # one request's text, not the batch
            log.exception("%s: its text could not be decoded; it is stopped", job.id)
            job.cancelled = True
            return True
        if delta:
            job.emit("delta", delta)
        return False

    def _finish(self, job: Job, reply: Reply) -> None:
        with self.lock:
            self.jobs.discard(job)
            self.started.discard(job)
        self._gauges()
        if job.internal:
            job.emit("done", reply, "")
            return
        self.metrics.e2e.observe(time.perf_counter() - job.admitted.received)
        if reply.error is not None:
            self.metrics.error(reply.error.type)
            job.emit("done", reply, "")
            return
        self.metrics.finished(
            reply.finish_reason, reply.usage.prompt_tokens, reply.usage.completion_tokens
        )
        job.emit("done", reply, job.text.finish(reply.text))

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.started))
        self.metrics.waiting.set(self.waiting)

    def _fault(self, job: Job) -> None:
        fault = self.settings.fault_generation_on
        if fault and fault in job.admitted.request.text:
            raise RuntimeError(f"fault injection: the generation thread dies on {fault!r}")


def _drain(inbox: "queue.Queue[Job]") -> list[Job]:
    jobs = []
    while True:
        try:
            jobs.append(inbox.get_nowait())
        except queue.Empty:
            return jobs


def _histogram_totals(histogram: Any) -> tuple[float, float]:
    """(count, sum) of a prometheus_client histogram child."""
    samples = {s.name: s.value for metric in histogram.collect() for s in metric.samples}
    count = next((v for k, v in samples.items() if k.endswith("_count")), 0.0)
    total = next((v for k, v in samples.items() if k.endswith("_sum")), 0.0)
    return count, total
