"""The worker: consume requests, batch them, generate off the connection's thread, reply, ack.

On the transformers engine requests are batched continuously (they join and leave the running
batch between decode steps, see backends/continuous.py); otherwise in whole dynamic batches.

Delivery is at-least-once: a request is acked only after its reply is confirmed by the broker,
so a crash or a lost connection redelivers it. Generation runs in its own thread and hands
replies back with `connection.add_callback_threadsafe`, so heartbeats keep flowing during a long
batch. A message that cannot be served gets an error reply (when it has a `reply_to`) and is
dead-lettered; the worker keeps serving.
"""

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, NackError, UnroutableError

from {{ cookiecutter.package_name }}.batching import DynamicBatcher
from {{ cookiecutter.package_name }}.messages import Reply
from {{ cookiecutter.package_name }}.queue.topology import (
    Names,
    connection_parameters,
    declare,
)
from {{ cookiecutter.package_name }}.service import Admitted, InferenceService
from {{ cookiecutter.package_name }}.settings import Settings, redact_url
from {{ cookiecutter.package_name }}.stats import Summary, summarize

if TYPE_CHECKING:
    from {{ cookiecutter.package_name }}.backends.continuous import ContinuousBatcher

log = logging.getLogger(__name__)
CONNECTION_ERRORS = (AMQPConnectionError, AMQPChannelError, ConnectionError, OSError)


@dataclass
class Delivery:
    tag: int
    reply_to: str
    correlation_id: str
    admitted: Admitted


@dataclass
class Counters:
    served: int = 0
    errors: int = 0
    dead_lettered: int = 0
    reconnects: int = 0


class MetricsWindow:
    """What the worker generated since the last look: batch sizes, latencies, tokens.

    Filled by the generation thread, read by the metrics reporter: guarded by a lock.
    """

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
        """Serve until `stop()`, reconnecting with backoff whenever the connection is lost."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._serve()
                delay = 0.5
            except CONNECTION_ERRORS as exc:
                if self._stop.is_set():
                    break
                self.counters.reconnects += 1
                log.warning("connection lost (%s); reconnecting in %.1f s", _short(exc), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
        log.info(
            "stopped: %d served, %d errors, %d dead-lettered, %d reconnects",
            self.counters.served, self.counters.errors,
            self.counters.dead_lettered, self.counters.reconnects,
        )  # fmt: skip

    def _serve(self) -> None:
        url = self.settings.rabbitmq_url
        connection = pika.BlockingConnection(connection_parameters(url, self.settings.heartbeat_s))
        session = _Session(self, connection)
        try:
            session.serve()
        finally:
            session.close()


class _Session:
    """One connection's life: its channel, its generation thread and its unacked deliveries."""

    def __init__(self, worker: Worker, connection: Any) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.connection = connection
        self.channel = connection.channel()
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.leftover: list[Delivery] = []
        self.generation_done = threading.Event()
        self.thread = threading.Thread(target=self._generate_loop, name="generation", daemon=True)

    def serve(self) -> None:
        names, settings = self.worker.names, self.settings
        declare(self.channel, names, settings.queue_max_length)
        self.channel.confirm_delivery()
        prefetch = settings.prefetch_count or 2 * settings.max_batch_size
        self.channel.basic_qos(prefetch_count=prefetch)
        tag = self.channel.basic_consume(names.requests, on_message_callback=self._on_message)
        self.thread.start()
        log.info(
            "consuming %s on %s (prefetch %d, heartbeat %d s)",
            names.requests, redact_url(settings.rabbitmq_url), prefetch, settings.heartbeat_s,
        )  # fmt: skip
        last_report = time.monotonic()
        while not self.worker._stop.is_set():
            self.connection.process_data_events(time_limit=0.2)
            if time.monotonic() - last_report >= settings.report_every_s:
                c = self.worker.counters
                log.info(
                    "served %d, errors %d, dead-lettered %d", c.served, c.errors, c.dead_lettered
                )
                last_report = time.monotonic()
        # Stopping: no new deliveries; the batch in hand finishes and is acked below.
        self.channel.basic_cancel(tag)
        while not self.generation_done.is_set():
            self.connection.process_data_events(time_limit=0.2)
        self.connection.process_data_events(time_limit=0)  # run the last acks
        requeued = self.leftover + _drain(self.inbox)
        for delivery in requeued:
            self.channel.basic_nack(delivery.tag, requeue=True)
        log.info("finished the batch in hand; requeued %d waiting requests", len(requeued))

    def close(self) -> None:
        self.generation_done.wait(timeout=600)  # never two batches of one model at once
        if self.connection.is_open:
            try:
                self.connection.close()
            except CONNECTION_ERRORS:
                pass

    # -- connection thread ---------------------------------------------------------------------

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        fallback_id = (
            properties.message_id or properties.correlation_id or f"delivery-{method.delivery_tag}"
        )
        admitted = self.worker.service.admit(body, str(fallback_id))
        reply_to = properties.reply_to or ""
        correlation_id = properties.correlation_id or ""
        if isinstance(admitted, Reply):
            log.warning(
                "rejected %s: %s", admitted.id, admitted.error.message if admitted.error else ""
            )
            self._dead_letter(method.delivery_tag, reply_to, correlation_id, admitted)
            return
        if not reply_to:
            log.warning(
                "rejected %s: no reply_to, the reply could not be routed", admitted.request.id
            )
            self._dead_letter(method.delivery_tag, "", correlation_id, None)
            return
        correlation_id = correlation_id or admitted.request.id
        self.inbox.put(Delivery(method.delivery_tag, reply_to, correlation_id, admitted))

    def _complete(self, deliveries: list[Delivery], replies: list[Reply]) -> None:
        for delivery, reply in zip(deliveries, replies, strict=True):
            if reply.error is not None:
                self._dead_letter(delivery.tag, delivery.reply_to, delivery.correlation_id, reply)
                continue
            if self._publish(delivery.reply_to, delivery.correlation_id, reply):
                self.channel.basic_ack(delivery.tag)
                self.worker.counters.served += 1
            else:  # the reply queue is gone: keep the request, dead-lettered, not lost
                self.channel.basic_nack(delivery.tag, requeue=False)
                self.worker.counters.dead_lettered += 1

    def _dead_letter(
        self, tag: int, reply_to: str, correlation_id: str, reply: Reply | None
    ) -> None:
        if reply is not None and reply_to:
            self._publish(reply_to, correlation_id or reply.id, reply)
        self.channel.basic_nack(tag, requeue=False)
        self.worker.counters.errors += reply is not None
        self.worker.counters.dead_lettered += 1

    def _publish(self, reply_to: str, correlation_id: str, reply: Reply) -> bool:
        """Publish a reply and wait for the broker's confirm; False if it cannot be routed."""
        properties = pika.BasicProperties(
            content_type="application/json",
            correlation_id=correlation_id,
            delivery_mode=pika.DeliveryMode.Persistent,
        )
        try:
            self.channel.basic_publish(
                "", reply_to, reply.model_dump_json().encode(), properties, mandatory=True
            )
            return True
        except (UnroutableError, NackError) as exc:
            log.warning("reply %s to %s not delivered: %s", reply.id, reply_to, type(exc).__name__)
            return False

    # -- generation thread ---------------------------------------------------------------------

    def _generate_loop(self) -> None:
        batcher = self.worker.service.continuous(self.settings)
        try:
            if batcher is None:
                self._static_loop()
            else:
                self._continuous_loop(batcher)
        finally:
            self.generation_done.set()

    def _static_loop(self) -> None:
        """Whole batches from the dynamic batcher, each run to completion and then acked."""
        settings = self.settings
        batcher: DynamicBatcher[Delivery] = DynamicBatcher(
            settings.max_batch_size,
            settings.max_wait_ms / 1000.0,
            settings.max_batch_tokens,
            settings.sort_by_length,
        )
        try:
            while not self.worker._stop.is_set() and self.connection.is_open:
                wait = batcher.seconds_until_due()
                try:
                    delivery = self.inbox.get(timeout=0.2 if wait is None else min(wait, 0.2))
                    batcher.add(delivery, delivery.admitted.request.tokens)
                    for more in _drain(self.inbox):
                        batcher.add(more, more.admitted.request.tokens)
                except queue.Empty:
                    pass
                batch = batcher.pop_batch()
                if batch:
                    self._run(batch)
        finally:
            self.leftover = [d for b in batcher.drain() for d in b]

    def _continuous_loop(self, batcher: "ContinuousBatcher[Delivery]") -> None:
        """Requests join the running batch between decode steps and are acked one by one as
        they finish. Stopping takes no new ones: the running ones finish, the waiting ones are
        requeued."""
        log.info("continuous batching: up to %d requests decode together", batcher.max_batch_size)
        try:
            stopping = False
            while self.connection.is_open:
                if self.worker._stop.is_set():
                    if not stopping:
                        log.info(
                            "stopping after %d served: %d requests in hand finish, %d waiting",
                            self.worker.counters.served, len(batcher.running), len(batcher.waiting),
                        )  # fmt: skip
                        stopping = True
                    self.leftover += batcher.take_waiting()
                    if not batcher.running:
                        break
                else:
                    arrived = _drain(self.inbox)
                    if not arrived and not len(batcher):
                        try:
                            arrived = [self.inbox.get(timeout=0.2)]
                        except queue.Empty:
                            continue
                    for delivery in arrived:
                        batcher.add(delivery.admitted.request, delivery)
                done = batcher.step()
                if done:
                    self._reply(done, decoding=len(batcher.running) + len(done))
        finally:
            self.leftover += batcher.take_waiting()

    def _reply(self, done: list[tuple[Delivery, Any]], decoding: int) -> None:
        deliveries = [delivery for delivery, _ in done]
        replies = [self.worker.service.reply(d.admitted, result) for d, result in done]
        self.worker.window.add(replies, batch_size=decoding)
        self._call_on_connection(functools.partial(self._complete, deliveries, replies))

    def _run(self, batch: list[Delivery]) -> None:
        log.info("generating a batch of %d", len(batch))
        started = time.perf_counter()
        replies = self.worker.service.run([d.admitted for d in batch])
        log.info("batch of %d in %.2f s", len(batch), time.perf_counter() - started)
        self.worker.window.add(replies)
        self._call_on_connection(functools.partial(self._complete, batch, replies))

    def _call_on_connection(self, callback: Callable[[], None]) -> None:
        try:
            self.connection.add_callback_threadsafe(callback)
        except CONNECTION_ERRORS:  # the connection died: the broker redelivers these requests
            log.warning("connection closed before replies could be sent; they will be redelivered")


def run_tracked(worker: Worker, tags: dict[str, object] | None = None) -> Counters:
    """Run `worker` in an MLflow run of kind "worker" until it stops; return its counters.

    Its metrics are logged every `worker_metrics_every_s` (and once at the end) by a thread of
    their own, so a slow tracking server never delays an ack; a failed report is a warning.
    """
    from {{ cookiecutter.package_name }}.tracking import settings_params, start_run

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
                log.warning("worker metrics not logged: %s", _short(exc))
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


def _drain(inbox: "queue.Queue[Delivery]") -> list[Delivery]:
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
