"""The worker: it serves requests from RabbitMQ until stopped, and fails loudly.

Per connection, a broker session (session.py) and a generation thread (generation.py). A lost
connection, or a consumer the broker cancelled (its queue deleted), is reconnected with backoff
and the topology re-declared. If the generation thread dies, the worker exits non-zero
(WorkerFailed) so that its supervisor restarts it; the broker redelivers what it held."""

import contextlib
import itertools
import logging
import os
import threading
import time

import pika

from ...engine.service import Admitted, InferenceService
from ...errors import one_line
from ...messages import Reply
from ...settings import Settings, redact_url
from ...stats import Summary, summarize
from .generation import Generation
from .session import CONNECTION_ERRORS, ConsumerCancelled, Counters, Session
from .topology import Names, connection_parameters, declare, options_for

log = logging.getLogger(__name__)
EXIT_FAILED = 3  # the worker's exit status when it stops because a part of it died
WINDOW_METRICS = ("inputs_per_s", "tokens_per_s", "batches", "batch_size_mean", "batch_size_max",
                  "latency_p50_ms", "latency_p95_ms", "latency_p99_ms")  # fmt: skip


class WorkerFailed(RuntimeError):
    """A thread the worker needs died; the process must exit non-zero to be restarted."""


class MetricsWindow:
    """What the worker generated since the last look: batch sizes, latencies, tokens. Filled
    by the generation thread, read by the metrics reporter: guarded by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since, self._tokens = time.monotonic(), 0
        self._sizes: list[int] = []
        self._latencies: list[float] = []

    def add(self, replies: list[Reply], batch_size: int | None = None) -> None:
        """Record replies that finished together, from a batch of `batch_size` (theirs if None)."""
        with self._lock:
            self._sizes.append(batch_size or len(replies))
            for reply in replies:
                if reply.error is None:
                    self._latencies.append(reply.latency_ms)
                    self._tokens += reply.usage.completion_tokens

    def take(self) -> Summary:
        """The window's summary; the window starts again empty."""
        with self._lock:
            now = time.monotonic()
            summary = summarize(now - self._since, self._latencies, self._tokens, 0, self._sizes)
            self._since, self._sizes, self._latencies, self._tokens = now, [], [], 0
        return summary


class Worker:
    def __init__(self, service: InferenceService, settings: Settings) -> None:
        self.service, self.settings = service, settings
        self.names = Names(settings.queue_prefix)
        self.counters = Counters()
        self.window = MetricsWindow()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the worker to stop: the batch in hand is finished and acked, the rest requeued."""
        self._stop.set()

    def snapshot(self) -> dict[str, float]:
        """Counters since start, and throughput, latency and batch sizes since the last call."""
        window = self.window.take().metrics()
        totals = {f"total_{k}": float(v) for k, v in vars(self.counters).items()}
        return totals | {k: window[k] for k in WINDOW_METRICS}

    def run(self) -> None:
        """Serve until `stop()`, reconnecting with backoff whenever the connection is lost.
        Raises WorkerFailed if the generation thread dies, and TopologyError if the queues
        exist with other arguments: neither is fixed by reconnecting."""
        delay = 0.5
        try:
            while not self._stop.is_set():
                try:
                    self._serve()  # returns once stopped
                except CONNECTION_ERRORS as exc:
                    if self._stop.is_set():
                        break
                    self.counters.reconnects += 1
                    log.warning("connection lost (%s); reconnecting in %.1f s",
                                one_line(exc), delay)  # fmt: skip
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            c = self.counters
            log.info("stopped: %d served, %d errors, %d dead-lettered, %d reconnects",
                     c.served, c.errors, c.dead_lettered, c.reconnects)  # fmt: skip

    def _serve(self) -> None:
        """One connection: deliveries in and replies out on this thread, the watchdog between
        events, until `stop()`; then the batch in hand finishes and the rest is given back."""
        settings, url = self.settings, self.settings.rabbitmq_url
        connection = pika.BlockingConnection(connection_parameters(url, settings.heartbeat_s))
        generation = None
        try:
            channel = connection.channel()
            declare(channel, self.names, options_for(settings))
            session = Session(channel, settings, self.counters, self._admit)  # consumes from now on
            generation = Generation(session, self.service, self._stop, self.window.add)
            generation.thread.start()
            log.info(
                "consuming %s on %s (prefetch %d after the first fresh request, heartbeat %d s)",
                self.names.requests, redact_url(url), session.prefetch, settings.heartbeat_s,
            )  # fmt: skip
            last_report = time.monotonic()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.2)
                self._check_alive(session, generation)
                if time.monotonic() - last_report >= settings.report_every_s:
                    c = self.counters
                    log.info("served %d, errors %d, dead-lettered %d",
                             c.served, c.errors, c.dead_lettered)  # fmt: skip
                    last_report = time.monotonic()
            session.channel.basic_cancel(session.consumer_tag)  # no new deliveries
            while generation.thread.is_alive():  # the batch in hand finishes, is acked below
                connection.process_data_events(time_limit=0.2)
            self._check_alive(session, generation)
            session.give_back(generation.leftover)
        finally:
            if generation is not None:
                generation.close()
            with contextlib.suppress(*CONNECTION_ERRORS):
                if connection.is_open:  # unacked deliveries go back to the queue
                    connection.close()

    @staticmethod
    def _check_alive(session: Session, generation: Generation) -> None:
        """The watchdog: a dead generation thread or a cancelled consumer ends the session."""
        if generation.failure is not None:
            session.connection.process_data_events(time_limit=0)  # send the replies it finished
            raise WorkerFailed(f"the generation thread died: {one_line(generation.failure)}")
        if session.cancelled:
            raise ConsumerCancelled("the broker cancelled the consumer (was the queue deleted?)")

    def _admit(self, body: bytes, fallback_id: str) -> Admitted | Reply:
        fault = self.settings.fault_exit_on  # fault injection: the process dies on a message
        if fault and fault.encode() in body:
            log.critical("fault injection: exiting on a message that holds %r", fault)
            os._exit(EXIT_FAILED)
        return self.service.admit(body, fallback_id)


def run_tracked(worker: Worker, tags: dict[str, object] | None = None) -> Counters:
    """Run `worker` in an MLflow run of kind "worker" until it stops; return its counters. Its
    metrics are logged every `worker_metrics_every_s` (and once at the end) by a thread of their
    own, so a slow tracking server never delays an ack; a failed report is a warning."""
    from ...lifecycle.tracking import settings_params, start_run

    settings = worker.settings
    with start_run(settings, "worker", settings_params(settings)) as run:
        run.log_params(worker.service.backend.describe())
        run.set_tags({"queue": worker.names.requests, **(tags or {})})
        done, steps = threading.Event(), itertools.count()

        def report() -> None:  # a step is used up even when its report fails
            try:
                run.log_metrics(step=next(steps), metrics=worker.snapshot())
            except Exception as exc:  # noqa: BLE001 - tracking must never stop serving
                log.warning("worker metrics not logged: %s", one_line(exc))

        def reporter() -> None:
            while not done.wait(settings.worker_metrics_every_s):
                report()

        thread = threading.Thread(target=reporter, name="metrics", daemon=True)
        thread.start()
        try:
            worker.run()
        finally:
            done.set()
            thread.join()
            report()
    return worker.counters
