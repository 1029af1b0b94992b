"""The worker: consume requests, batch them, generate off the connection's thread, reply, ack.

On the transformers engine requests are batched continuously (they join and leave the running
batch between decode steps, see backends/continuous.py); otherwise in whole dynamic batches.

Delivery is at-least-once: a request is acked only after its reply is confirmed by the broker,
so a crash or a lost connection redelivers it. Generation runs in its own thread and hands
replies back with `connection.add_callback_threadsafe`, so heartbeats keep flowing during a long
batch. A message that cannot be served gets an error reply (when it has a `reply_to`) and is
dead-lettered with why in its headers; the worker keeps serving: nothing a client sends can
raise out of a pika callback.

A worker never sits alive and useless: if its generation thread dies, it logs why and exits
non-zero (WorkerFailed), so its supervisor restarts it and the broker redelivers what it held. A
consumer cancelled by the broker (its queue deleted) re-declares the topology and resumes.
"""

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, NackError, UnroutableError

from {{ cookiecutter.package_name }}.batching import DynamicBatcher
from {{ cookiecutter.package_name }}.messages import Reply, RequestError
from {{ cookiecutter.package_name }}.queue.topology import (
    ERROR_MESSAGE_HEADER,
    ERROR_TYPE_HEADER,
    Names,
    connection_parameters,
    copy_properties,
    declare,
    options_for,
)
from {{ cookiecutter.package_name }}.service import Admitted, InferenceService
from {{ cookiecutter.package_name }}.settings import Settings, redact_url
from {{ cookiecutter.package_name }}.stats import Summary, summarize

if TYPE_CHECKING:
    from {{ cookiecutter.package_name }}.backends.continuous import ContinuousBatcher

log = logging.getLogger(__name__)
CONNECTION_ERRORS = (AMQPConnectionError, AMQPChannelError, ConnectionError, OSError)
EXIT_FAILED = 3  # the worker's exit status when it stops because a part of it died
PRIOR_DELIVERIES_HEADER = "x-prior-deliveries"


class WorkerFailed(RuntimeError):
    """A thread the worker needs died; the process must exit non-zero to be restarted."""


class ConsumerCancelled(AMQPChannelError):
    """The broker cancelled our consumer (e.g. the queue was deleted): reconnect, re-declare."""


@dataclass
class Delivery:
    tag: int
    reply_to: str
    correlation_id: str
    admitted: Admitted
    body: bytes
    properties: Any = None


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
                    log.warning("connection lost (%s); reconnecting in %.1f s", _short(exc), delay)
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
            session = _Session(self, connection)
        except CONNECTION_ERRORS:
            _close(connection)
            raise
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
        self.abort = threading.Event()  # the session ends without finishing its batch
        self.failure: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._generate_loop, name="generation", daemon=True)
        # Probing: the session takes one delivery at a time until a fresh one (never delivered
        # before) arrives. A redelivered message may be what killed the last worker: alone, it
        # can kill this one without taking innocent batchmates (and their delivery counts)
        # along. Normal traffic leaves probing at its first message.
        self.prefetch = self.settings.prefetch_count or 2 * self.settings.max_batch_size
        self.probing = True
        self.consumer_tag = ""

    def serve(self) -> None:
        names, settings = self.worker.names, self.settings
        declare(self.channel, names, options_for(settings))
        self.channel.confirm_delivery()
        self.channel.add_on_cancel_callback(self._on_cancelled)
        self._consume(1)
        self.thread.start()
        log.info(
            "consuming %s on %s (prefetch %d after the first fresh request, heartbeat %d s)",
            names.requests, redact_url(settings.rabbitmq_url), self.prefetch,
            settings.heartbeat_s,
        )  # fmt: skip
        last_report = time.monotonic()
        while not self.worker._stop.is_set():
            self.connection.process_data_events(time_limit=0.2)
            self._check_alive()
            if time.monotonic() - last_report >= settings.report_every_s:
                c = self.worker.counters
                log.info(
                    "served %d, errors %d, dead-lettered %d", c.served, c.errors, c.dead_lettered
                )
                last_report = time.monotonic()
        # Stopping: no new deliveries; the batch in hand finishes and is acked below.
        self.channel.basic_cancel(self.consumer_tag)
        while not self.generation_done.is_set():
            self.connection.process_data_events(time_limit=0.2)
        self._check_alive()
        self.connection.process_data_events(time_limit=0)  # run the last acks
        requeued = self.leftover + _drain(self.inbox)
        for delivery in requeued:
            self._release(delivery)
        log.info("finished the batch in hand; requeued %d waiting requests", len(requeued))

    def _consume(self, prefetch: int) -> None:
        self.channel.basic_qos(prefetch_count=prefetch)
        self.consumer_tag = self.channel.basic_consume(
            self.worker.names.requests, on_message_callback=self._on_message
        )

    def _release(self, delivery: Delivery) -> None:
        """Give back a request this worker will not serve (it is stopping) as a fresh copy at
        the queue's tail: a graceful stop is no failure, so it must not count as a delivery
        toward the limit. If the queue refuses the copy (full), it is requeued as it is."""
        # A request that had been redelivered stays a suspect: probing takes it alone.
        prior = _deliveries_before(delivery.properties.headers)
        properties = copy_properties(
            delivery.properties,
            drop=("x-delivery-count",),
            add={PRIOR_DELIVERIES_HEADER: prior} if prior else None,
        )
        try:
            self.channel.basic_publish(
                "", self.worker.names.requests, delivery.body, properties, mandatory=True
            )
            self.channel.basic_ack(delivery.tag)
        except (UnroutableError, NackError):
            self.channel.basic_nack(delivery.tag, requeue=True)

    def _leave_probing(self, properties: Any, redelivered: bool) -> None:
        """On the first fresh delivery, take the full prefetch. Called from the delivery's own
        callback: with a prefetch of 1 nothing else is in flight, so cancelling the probing
        consumer returns nothing to the queue."""
        count = _deliveries_before(properties.headers)
        if count or redelivered:
            log.info("a redelivered request (deliveries before: %s): taken alone", count or "?")
            return
        self.probing = False
        self.channel.basic_cancel(self.consumer_tag)
        self._consume(self.prefetch)

    def _check_alive(self) -> None:
        """The watchdog: a dead generation thread or a cancelled consumer ends the session."""
        if self.failure is not None:
            self.connection.process_data_events(time_limit=0)  # send the replies it finished
            raise WorkerFailed(f"the generation thread died: {_short(self.failure)}")
        if self.cancelled:
            raise ConsumerCancelled("the broker cancelled the consumer (was the queue deleted?)")

    def close(self) -> None:
        self.abort.set()
        if self.thread.is_alive():  # never two batches of one model at once
            self.thread.join()
        _close(self.connection)  # unacked deliveries go back to the queue

    # -- connection thread ---------------------------------------------------------------------

    def _on_cancelled(self, frame: Any) -> None:
        log.warning("the broker cancelled the consumer of %s", self.worker.names.requests)
        self.cancelled = True

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        """Admit one delivery; whatever it holds, it is queued for generation, answered with an
        error and dead-lettered, or (if even that fails) dead-lettered by the broker."""
        try:
            if self.probing:
                self._leave_probing(properties, method.redelivered)
            self._admit(method.delivery_tag, properties, body)
        except CONNECTION_ERRORS:
            raise  # the session ends and reconnects; the broker redelivers
        except Exception:  # nothing a client sends may stop the consumer
            log.exception("could not handle delivery %d", method.delivery_tag)
            self.channel.basic_nack(method.delivery_tag, requeue=False)
            self.worker.counters.dead_lettered += 1
            self.worker.counters.errors += 1

    def _admit(self, tag: int, properties: Any, body: bytes) -> None:
        fault = self.settings.fault_exit_on
        if fault and fault.encode() in body:
            log.critical("fault injection: exiting on a message that holds %r", fault)
            os._exit(EXIT_FAILED)
        fallback_id = f"delivery-{tag}"
        admitted = self.worker.service.admit(body, fallback_id)
        reply_to = properties.reply_to or ""
        correlation_id = properties.correlation_id or ""
        if isinstance(admitted, Reply):
            log.warning(
                "rejected %s: %s", admitted.id, admitted.error.message if admitted.error else ""
            )
            self._dead_letter(tag, reply_to, correlation_id, admitted, body)
            return
        if not reply_to:
            log.warning(
                "rejected %s: no reply_to, the reply could not be routed", admitted.request.id
            )
            error = RequestError("no_reply_to", "the message has no reply_to: nowhere to reply")
            self._dead_letter(
                tag, "", correlation_id, Reply.failure(admitted.request.id, error), body
            )
            return
        self.inbox.put(Delivery(tag, reply_to, correlation_id, admitted, body, properties))

    def _complete(self, deliveries: list[Delivery], replies: list[Reply]) -> None:
        for delivery, reply in zip(deliveries, replies, strict=True):
            try:
                self._complete_one(delivery, reply)
            except CONNECTION_ERRORS:
                raise
            except Exception:  # one bad reply must not stop the others
                log.exception("could not complete request %s", delivery.admitted.request.id)
                self.channel.basic_nack(delivery.tag, requeue=False)
                self.worker.counters.dead_lettered += 1

    def _complete_one(self, delivery: Delivery, reply: Reply) -> None:
        if reply.error is not None:
            self._dead_letter(
                delivery.tag, delivery.reply_to, delivery.correlation_id, reply, delivery.body
            )
            return
        if self._publish(delivery.reply_to, delivery.correlation_id, reply):
            self.channel.basic_ack(delivery.tag)
            self.worker.counters.served += 1
        else:  # the reply queue is gone: keep the request, dead-lettered, not lost
            error = RequestError("reply_undeliverable", f"reply queue {delivery.reply_to} is gone")
            self._dead_letter(delivery.tag, "", "", Reply.failure(reply.id, error), delivery.body)

    def _dead_letter(
        self, tag: int, reply_to: str, correlation_id: str, reply: Reply, body: bytes
    ) -> None:
        """Send the error reply (when it can be routed), then move the message to the
        dead-letter queue with why in its headers, confirmed before the original is acked."""
        if reply_to:
            self._publish(reply_to, correlation_id, reply)
        error = reply.error
        headers = {
            ERROR_TYPE_HEADER: error.type if error else "error",
            ERROR_MESSAGE_HEADER: (error.message if error else "")[:1000],
        }
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            headers=headers,
            correlation_id=correlation_id or None,
            reply_to=reply_to or None,
        )
        names = self.worker.names
        try:
            self.channel.basic_publish(
                names.dead_letter_exchange, names.requests, body, properties, mandatory=True
            )
            self.channel.basic_ack(tag)
        except (UnroutableError, NackError):  # let the broker dead-letter it, without headers
            self.channel.basic_nack(tag, requeue=False)
        self.worker.counters.errors += 1
        self.worker.counters.dead_lettered += 1

    def _publish(self, reply_to: str, correlation_id: str, reply: Reply) -> bool:
        """Publish a reply and wait for the broker's confirm; False if it cannot be routed."""
        properties = pika.BasicProperties(
            content_type="application/json",
            correlation_id=correlation_id or None,
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
        try:
            batcher = self.worker.service.continuous(self.settings)
            if batcher is None:
                self._static_loop()
            else:
                self._continuous_loop(batcher)
        except BaseException as exc:  # the watchdog in serve() ends the worker with it
            log.critical("the generation thread died", exc_info=True)
            self.failure = exc
        finally:
            self.generation_done.set()

    def _running(self) -> bool:
        return not self.abort.is_set() and self.connection.is_open

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
            while not self.worker._stop.is_set() and self._running():
                wait = batcher.seconds_until_due()
                try:
                    delivery = self.inbox.get(timeout=0.2 if wait is None else min(wait, 0.2))
                    for one in [delivery, *_drain(self.inbox)]:
                        self._fault(one)
                        batcher.add(one, one.admitted.request.tokens)
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
            while self._running():
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
                        self._fault(delivery)
                        batcher.add(delivery.admitted.request, delivery)
                done = batcher.step()
                if done:
                    self._reply(done, decoding=len(batcher.running) + len(done))
        finally:
            self.leftover += batcher.take_waiting()

    def _fault(self, delivery: Delivery) -> None:
        fault = self.settings.fault_generation_on
        if fault and fault in delivery.admitted.request.text:
            raise RuntimeError(f"fault injection: the generation thread dies on {fault!r}")

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


def _deliveries_before(headers: dict | None) -> int:
    """How often a message was delivered before: the broker's count, plus what an earlier
    graceful stop carried over when it gave the message back as a fresh copy."""
    headers = headers or {}
    return int(headers.get("x-delivery-count", 0)) + int(headers.get(PRIOR_DELIVERIES_HEADER, 0))


def _close(connection: Any) -> None:
    if connection.is_open:
        try:
            connection.close()
        except CONNECTION_ERRORS:
            pass


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
