"""The worker's generation thread: it batches what the session admitted and runs the engine.

Batching is continuous where the engine has a scheduler of its own (`backend.continuous`: on
transformers, requests join and leave the running batch between decode steps, see
engine/continuous.py), else in whole dynamic batches. Replies go back
to the connection's thread (`Session.complete_soon`), so heartbeats flow during a long batch.
On `stop` (the worker's) the batch in hand finishes and the rest is left in `leftover` for the
session to give back. If the thread dies, `failure` says why: the worker's watchdog ends it."""

import logging
import queue
import threading
import time
from collections.abc import Callable

from ...engine.batching import DynamicBatcher
from ...engine.service import InferenceService
from ...engine.streaming import Scheduler, TextStream, eos_ids_of
from ...messages import Reply
from .session import Delivery, Session, drain

log = logging.getLogger(__name__)
Record = Callable[[list[Reply], int | None], None]  # replies that finished together, batch size


class Generation:
    """One session's generation thread; `record` takes replies for the metrics window."""

    def __init__(
        self, session: Session, service: InferenceService, stop: threading.Event, record: Record
    ) -> None:
        self.session, self.service, self.stop, self.record = session, service, stop, record
        self.settings, self.inbox = session.settings, session.inbox
        self.leftover: list[Delivery] = []  # taken, never run: the session gives them back
        self.abort = threading.Event()  # the session ends without finishing its batch
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._generate_loop, name="generation", daemon=True)
        self.chunks = Chunks(session, service)

    def close(self) -> None:
        """Abort, and wait for the thread: never two batches of one model at once."""
        self.abort.set()
        if self.thread.is_alive():
            self.thread.join()

    def _generate_loop(self) -> None:
        try:
            if (batcher := self.service.continuous(self.settings)) is None:
                self._static_loop()
            else:
                self._continuous_loop(batcher)
        except BaseException as exc:  # the worker's watchdog ends the worker with it
            log.critical("the generation thread died", exc_info=True)
            self.failure = exc

    def _running(self) -> bool:
        return not self.abort.is_set() and self.session.connection.is_open

    def _static_loop(self) -> None:
        """Whole batches from the dynamic batcher, each run to completion and then acked."""
        s = self.settings
        batcher: DynamicBatcher[Delivery] = DynamicBatcher(
            s.max_batch_size, s.max_wait_ms / 1000.0, s.max_batch_tokens, s.sort_by_length
        )
        try:
            while not self.stop.is_set() and self._running():
                wait = batcher.seconds_until_due()
                try:
                    delivery = self.inbox.get(timeout=0.2 if wait is None else min(wait, 0.2))
                    for one in [delivery, *drain(self.inbox)]:
                        self._fault(one)
                        batcher.add(one, one.admitted.request.tokens)
                except queue.Empty:
                    pass
                if batch := batcher.pop_batch():
                    log.info("generating a batch of %d", len(batch))
                    started = time.perf_counter()
                    heard = lambda i, token, batch=batch: self.chunks.token(batch[i], token)  # noqa: E731
                    replies = self.service.run([d.admitted for d in batch], heard)
                    self.chunks.done(batch)
                    log.info("batch of %d in %.2f s", len(batch), time.perf_counter() - started)
                    self.record(replies, None)
                    self.session.complete_soon(batch, replies)
        finally:
            self.leftover = [d for b in batcher.drain() for d in b]

    def _continuous_loop(self, batcher: Scheduler[Delivery]) -> None:
        """Requests are acked one by one as they finish. Stopping takes no new ones: the running
        ones finish, the waiting ones are requeued."""
        log.info("continuous batching: up to %d requests decode together", batcher.max_batch_size)
        batcher.on_token = self.chunks.token
        try:
            stopping = False
            while self._running():
                if self.stop.is_set():
                    if not stopping:
                        log.info(
                            "stopping after %d served: %d requests in hand finish, %d waiting",
                            self.session.counters.served, len(batcher.running),
                            len(batcher.waiting),
                        )  # fmt: skip
                        stopping = True
                    self.leftover += batcher.take_waiting()
                    if not batcher.running:
                        break
                else:
                    arrived = drain(self.inbox)
                    if not arrived and not len(batcher):
                        try:
                            arrived = [self.inbox.get(timeout=0.2)]
                        except queue.Empty:
                            continue
                    for delivery in arrived:
                        self._fault(delivery)
                        batcher.add(delivery.admitted.request, delivery)
                done = batcher.step()
                self.chunks.flush()
                if done:  # recorded with how many requests decoded together
                    self.chunks.done([d for d, _ in done])
                    replies = [self.service.reply(d.admitted, result) for d, result in done]
                    self.record(replies, len(batcher.running) + len(done))
                    self.session.complete_soon([d for d, _ in done], replies)
        finally:
            self.leftover += batcher.take_waiting()
            close = getattr(batcher, "close", None)
            if close is not None:  # batches on threads of their own: stopped before we go
                close()

    def _fault(self, delivery: Delivery) -> None:
        fault = self.settings.fault_generation_on
        if fault and fault in delivery.admitted.request.text:
            raise RuntimeError(f"fault injection: the generation thread dies on {fault!r}")


class Chunks:
    """The text of requests that asked to stream (`stream: true`), published to their reply_to
    as it is decoded: grouped, at most every CHUNK_EVERY_S, on the connection's thread."""

    CHUNK_EVERY_S = 0.02

    def __init__(self, session: Session, service: InferenceService) -> None:
        self.session, self.tokenizer = session, service.backend.tokenizer
        self.eos_ids = eos_ids_of(service.backend, self.tokenizer)
        self.texts: dict[int, TextStream] = {}  # by delivery tag
        self.pending: list[tuple[Delivery, int, str]] = []
        self.flushed = time.monotonic()
        self.lock = threading.Lock()  # an engine may call back from a thread of its own

    def token(self, delivery: Delivery, token: int) -> bool:
        """Hear one decoded token; never stops the request (a worker serves it to the end)."""
        if not delivery.admitted.request.stream:
            return False
        with self.lock:
            text = self.texts.get(delivery.tag)
            if text is None:
                stops = delivery.admitted.request.params.stop
                text = self.texts[delivery.tag] = TextStream(self.tokenizer, stops, self.eos_ids)
            offset = len(text.sent)
            if delta := text.push(token):
                self.pending.append((delivery, offset, delta))
        if time.monotonic() - self.flushed > self.CHUNK_EVERY_S:
            self.flush()
        return False

    def flush(self) -> None:
        with self.lock:  # handed on under the lock: batches that flush at once keep their order
            pending, self.pending = self.pending, []
            self.flushed = time.monotonic()
            if pending:
                self.session.stream_soon(pending)

    def done(self, deliveries: list[Delivery]) -> None:
        """Publish what is pending, and forget these requests (their replies complete the text)."""
        self.flush()
        with self.lock:
            for delivery in deliveries:
                self.texts.pop(delivery.tag, None)
