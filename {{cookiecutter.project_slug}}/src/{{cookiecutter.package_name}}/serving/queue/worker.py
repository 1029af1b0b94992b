"""The worker: it serves requests from RabbitMQ until stopped, and fails loudly.

Each connection gets a broker session (session.py: consuming, acks, error replies,
dead-lettering) and a generation thread (generation.py: batching, the engine). Delivery is
at-least-once: a request is acked only after its reply is confirmed, so a crash or a lost
connection redelivers it, and the worker reconnects with backoff.

This module owns the worker: its reconnect loop, the connection thread's loop and the watchdog
in it, its counters, its metrics window, `stop`, and `run_tracked`. A worker never sits alive
and useless: if its generation thread dies, it logs why and exits non-zero (WorkerFailed), so
its supervisor restarts it and the broker redelivers what it held. A consumer cancelled by the
broker (its queue deleted) re-declares the topology and resumes.
"""

import logging
import os
import threading
import time

import pika

from ...engine.service import Admitted, InferenceService
from ...errors import one_line
from ...messages import Reply
from ...serving.queue.generation import Generation
from ...serving.queue.session import (
    CONNECTION_ERRORS,
    PRIOR_DELIVERIES_HEADER,  # noqa: F401 - importable from here too
    ConsumerCancelled,
    Counters,
    Delivery,  # noqa: F401 - importable from here too
    Session,
    close_connection,
)
from ...serving.queue.topology import Names, connection_parameters
from ...settings import Settings, redact_url
from ...stats import Summary, summarize

log = logging.getLogger(__name__)
EXIT_FAILED = 3  # the worker's exit status when it stops because a part of it died


class WorkerFailed(RuntimeError):
    """A thread the worker needs died; the process must exit non-zero to be restarted."""


class MetricsWindow:
    """What the worker generated since the last look: batch sizes, latencies, tokens. Filled
    by the generation thread, read by the metrics reporter: guarded by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = time.monotonic()
        self._sizes: list[int] = []
        self._latencies: list[float] = []
        self._tokens = 0

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
        self.service = service
        self.settings = settings
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
        return {
            **{f"total_{k}": float(v) for k, v in vars(self.counters).items()},
            **{k: window[k] for k in ("inputs_per_s", "tokens_per_s", "batches")},
            **{k: window[k] for k in ("batch_size_mean", "batch_size_max")},
            **{k: window[k] for k in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")},
        }

    def run(self) -> None:
        """Serve until `stop()`, reconnecting with backoff whenever the connection is lost.

        Raises WorkerFailed if the generation thread dies, and TopologyError if the queues
        exist with other arguments: neither is fixed by reconnecting.
        """
        delay = 0.5
        try:
            while not self._stop.is_set():
                try:
                    self._serve()
                    delay = 0.5
                except CONNECTION_ERRORS as exc:
                    if self._stop.is_set():
                        break
                    self.counters.reconnects += 1
                    log.warning(
                        "connection lost (%s); reconnecting in %.1f s", one_line(exc), delay
                    )
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            log.info(
                "stopped: %d served, %d errors, %d dead-lettered, %d reconnects",
                self.counters.served, self.counters.errors,
                self.counters.dead_lettered, self.counters.reconnects,
            )  # fmt: skip

    def _serve(self) -> None:
        url = self.settings.rabbitmq_url
        connection = pika.BlockingConnection(connection_parameters(url, self.settings.heartbeat_s))
        try:
            session = Session(connection, self.settings, self.names, self.counters, self._admit)
        except CONNECTION_ERRORS:
            close_connection(connection)
            raise
        generation = Generation(session, self.service, self.settings, self._stop, self.window.add)
        try:
            self._serve_session(session, generation)
        finally:
            generation.close()
            close_connection(connection)  # unacked deliveries go back to the queue

    def _serve_session(self, session: Session, generation: Generation) -> None:
        """The connection thread's loop, until `stop()`: deliveries in, replies out, and the
        watchdog between events. Then the batch in hand finishes and the rest is given back."""
        settings = self.settings
        session.open()
        generation.start()
        log.info(
            "consuming %s on %s (prefetch %d after the first fresh request, heartbeat %d s)",
            self.names.requests, redact_url(settings.rabbitmq_url), session.prefetch,
            settings.heartbeat_s,
        )  # fmt: skip
        last_report = time.monotonic()
        while not self._stop.is_set():
            session.connection.process_data_events(time_limit=0.2)
            self._check_alive(session, generation)
            if time.monotonic() - last_report >= settings.report_every_s:
                c = self.counters
                log.info(
                    "served %d, errors %d, dead-lettered %d", c.served, c.errors, c.dead_lettered
                )
                last_report = time.monotonic()
        # Stopping: no new deliveries; the batch in hand finishes and is acked below.
        session.stop_consuming()
        while not generation.done.is_set():
            session.connection.process_data_events(time_limit=0.2)
        self._check_alive(session, generation)
        session.give_back(generation.leftover)

    @staticmethod
    def _check_alive(session: Session, generation: Generation) -> None:
        """The watchdog: a dead generation thread or a cancelled consumer ends the session."""
        if generation.failure is not None:
            session.connection.process_data_events(time_limit=0)  # send the replies it finished
            raise WorkerFailed(f"the generation thread died: {one_line(generation.failure)}")
        if session.cancelled:
            raise ConsumerCancelled("the broker cancelled the consumer (was the queue deleted?)")

    def _admit(self, body: bytes, fallback_id: str) -> Admitted | Reply:
        """Admit a delivery's body for the session (fault injection may exit here first)."""
        fault = self.settings.fault_exit_on
        if fault and fault.encode() in body:
            log.critical("fault injection: exiting on a message that holds %r", fault)
            os._exit(EXIT_FAILED)
        return self.service.admit(body, fallback_id)


def run_tracked(worker: Worker, tags: dict[str, object] | None = None) -> Counters:
    """Run `worker` in an MLflow run of kind "worker" until it stops; return its counters.

    Its metrics are logged every `worker_metrics_every_s` (and once at the end) by a thread of
    their own, so a slow tracking server never delays an ack; a failed report is a warning.
    """
    from ...lifecycle.tracking import settings_params, start_run

    settings = worker.settings
    with start_run(settings, "worker", settings_params(settings)) as run:
        run.log_params(worker.service.backend.describe())
        run.set_tags({"queue": worker.names.requests, **(tags or {})})
        done = threading.Event()
        step = 0

        def report() -> None:
            nonlocal step
            try:
                run.log_metrics(worker.snapshot(), step=step)
            except Exception as exc:  # noqa: BLE001 - tracking must never stop serving
                log.warning("worker metrics not logged: %s", one_line(exc))
            step += 1

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
