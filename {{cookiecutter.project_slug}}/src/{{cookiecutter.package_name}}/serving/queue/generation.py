"""The worker's generation thread: it batches what the session admitted and runs the engine.

On the transformers engine requests are batched continuously (they join and leave the running
batch between decode steps, see engine/continuous.py); otherwise in whole dynamic batches. The
replies go back to the connection's thread (`Session.complete_soon`), so heartbeats keep
flowing during a long batch. When the worker stops, the batch in hand finishes and what still
waits is left over for the session to give back; if the thread dies, `failure` says why and
the worker's watchdog ends the worker.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...engine.batching import DynamicBatcher
from ...engine.service import InferenceService
from ...messages import Reply
from ...serving.queue.session import Delivery, Session, drain
from ...settings import Settings

if TYPE_CHECKING:
    from ...engine.continuous import ContinuousBatcher

log = logging.getLogger(__name__)
Record = Callable[[list[Reply], int | None], None]  # replies that finished together, batch size


class Generation:
    """One session's generation thread: the requests in the session's inbox become replies.

    `stop` is the worker's (the batch in hand finishes); `record` takes each group of replies
    for the metrics window; `close()` aborts without finishing and waits for the thread.
    """

    def __init__(
        self,
        session: Session,
        service: InferenceService,
        settings: Settings,
        stop: threading.Event,
        record: Record,
    ) -> None:
        self.session = session
        self.service = service
        self.settings = settings
        self.stop = stop
        self.record = record
        self.connection = session.connection
        self.inbox = session.inbox
        self.leftover: list[Delivery] = []  # taken, never run: the session gives them back
        self.done = threading.Event()
        self.abort = threading.Event()  # the session ends without finishing its batch
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._generate_loop, name="generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Abort, and wait for the thread: never two batches of one model at once."""
        self.abort.set()
        if self.thread.is_alive():
            self.thread.join()

    def _generate_loop(self) -> None:
        try:
            batcher = self.service.continuous(self.settings)
            if batcher is None:
                self._static_loop()
            else:
                self._continuous_loop(batcher)
        except BaseException as exc:  # the worker's watchdog ends the worker with it
            log.critical("the generation thread died", exc_info=True)
            self.failure = exc
        finally:
            self.done.set()

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
            while not self.stop.is_set() and self._running():
                wait = batcher.seconds_until_due()
                try:
                    delivery = self.inbox.get(timeout=0.2 if wait is None else min(wait, 0.2))
                    for one in [delivery, *drain(self.inbox)]:
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
        replies = [self.service.reply(d.admitted, result) for d, result in done]
        self.record(replies, decoding)
        self.session.complete_soon(deliveries, replies)

    def _run(self, batch: list[Delivery]) -> None:
        log.info("generating a batch of %d", len(batch))
        started = time.perf_counter()
        replies = self.service.run([d.admitted for d in batch])
        log.info("batch of %d in %.2f s", len(batch), time.perf_counter() - started)
        self.record(replies, None)
        self.session.complete_soon(batch, replies)
