"""The worker's broker session: one connection's channel, consumer, acks and dead letters.

It declares the topology and consumes (probing: one delivery at a time until a fresh one
arrives), admits each delivery into its inbox for the generation thread (generation.py), and
completes what comes back: the reply confirmed by the broker before the request is acked, or an
error reply and the request dead-lettered with why in its headers. It gives back what a
stopping worker did not serve and notices when the broker cancels its consumer. All of it runs
on the connection's thread, except `complete_soon`, which hands the work over to it.
"""

import functools
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, NackError, UnroutableError

from ...engine.service import Admitted
from ...messages import Reply, RequestError
from ...serving.queue.topology import (
    ERROR_MESSAGE_HEADER,
    ERROR_TYPE_HEADER,
    Names,
    copy_properties,
    declare,
    options_for,
)
from ...settings import Settings

log = logging.getLogger(__name__)
CONNECTION_ERRORS = (AMQPConnectionError, AMQPChannelError, ConnectionError, OSError)
PRIOR_DELIVERIES_HEADER = "x-prior-deliveries"


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


Admit = Callable[[bytes, str], Admitted | Reply]  # a message body, its fallback id


class Session:
    """One connection's channel, consumer and unacked deliveries.

    `admit` turns a message body into a request (or an error reply); what it admits waits in
    `inbox` for the generation thread, which hands its replies back with `complete_soon`.
    """

    def __init__(
        self, connection: Any, settings: Settings, names: Names, counters: Counters, admit: Admit
    ) -> None:
        self.settings = settings
        self.names = names
        self.counters = counters
        self.admit = admit
        self.connection = connection
        self.channel = connection.channel()
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.cancelled = False
        # Probing: the session takes one delivery at a time until a fresh one (never delivered
        # before) arrives. A redelivered message may be what killed the last worker: alone, it
        # can kill this one without taking innocent batchmates (and their delivery counts)
        # along. Normal traffic leaves probing at its first message.
        self.prefetch = self.settings.prefetch_count or 2 * self.settings.max_batch_size
        self.probing = True
        self.consumer_tag = ""

    def open(self) -> None:
        """Declare the topology and start consuming, one delivery at a time (probing)."""
        declare(self.channel, self.names, options_for(self.settings))
        self.channel.confirm_delivery()
        self.channel.add_on_cancel_callback(self._on_cancelled)
        self._consume(1)

    def stop_consuming(self) -> None:
        """No new deliveries: the ones in hand are finished or given back."""
        self.channel.basic_cancel(self.consumer_tag)

    def give_back(self, leftover: list[Delivery]) -> None:
        """Run the last acks, then give back what was not served: `leftover` and the inbox."""
        self.connection.process_data_events(time_limit=0)  # run the last acks
        requeued = leftover + drain(self.inbox)
        for delivery in requeued:
            self._release(delivery)
        log.info("finished the batch in hand; requeued %d waiting requests", len(requeued))

    def complete_soon(self, deliveries: list[Delivery], replies: list[Reply]) -> None:
        """From the generation thread: complete `deliveries` on the connection's thread."""
        callback = functools.partial(self._complete, deliveries, replies)
        try:
            self.connection.add_callback_threadsafe(callback)
        except CONNECTION_ERRORS:  # the connection died: the broker redelivers these requests
            log.warning("connection closed before replies could be sent; they will be redelivered")

    def _consume(self, prefetch: int) -> None:
        self.channel.basic_qos(prefetch_count=prefetch)
        self.consumer_tag = self.channel.basic_consume(
            self.names.requests, on_message_callback=self._on_message
        )

    def _release(self, delivery: Delivery) -> None:
        """Give back a request this worker will not serve (it is stopping) as a fresh copy at
        the queue's tail: a graceful stop is no failure, so it must not count as a delivery
        toward the limit. If the queue refuses the copy (full), it is requeued as it is."""
        # A request that had been redelivered stays a suspect: probing takes it alone.
        prior = deliveries_before(delivery.properties.headers)
        properties = copy_properties(
            delivery.properties,
            drop=("x-delivery-count",),
            add={PRIOR_DELIVERIES_HEADER: prior} if prior else None,
        )
        try:
            self.channel.basic_publish(
                "", self.names.requests, delivery.body, properties, mandatory=True
            )
            self.channel.basic_ack(delivery.tag)
        except (UnroutableError, NackError):
            self.channel.basic_nack(delivery.tag, requeue=True)

    def _leave_probing(self, properties: Any, redelivered: bool) -> None:
        """On the first fresh delivery, take the full prefetch. Called from the delivery's own
        callback: with a prefetch of 1 nothing else is in flight, so cancelling the probing
        consumer returns nothing to the queue."""
        count = deliveries_before(properties.headers)
        if count or redelivered:
            log.info("a redelivered request (deliveries before: %s): taken alone", count or "?")
            return
        self.probing = False
        self.channel.basic_cancel(self.consumer_tag)
        self._consume(self.prefetch)

    def _on_cancelled(self, frame: Any) -> None:
        log.warning("the broker cancelled the consumer of %s", self.names.requests)
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
            self.counters.dead_lettered += 1
            self.counters.errors += 1

    def _admit(self, tag: int, properties: Any, body: bytes) -> None:
        fallback_id = f"delivery-{tag}"
        admitted = self.admit(body, fallback_id)
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
                self.counters.dead_lettered += 1

    def _complete_one(self, delivery: Delivery, reply: Reply) -> None:
        if reply.error is not None:
            self._dead_letter(
                delivery.tag, delivery.reply_to, delivery.correlation_id, reply, delivery.body
            )
            return
        if self._publish(delivery.reply_to, delivery.correlation_id, reply):
            self.channel.basic_ack(delivery.tag)
            self.counters.served += 1
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
        names = self.names
        try:
            self.channel.basic_publish(
                names.dead_letter_exchange, names.requests, body, properties, mandatory=True
            )
            self.channel.basic_ack(tag)
        except (UnroutableError, NackError):  # let the broker dead-letter it, without headers
            self.channel.basic_nack(tag, requeue=False)
        self.counters.errors += 1
        self.counters.dead_lettered += 1

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


def deliveries_before(headers: dict | None) -> int:
    """How often a message was delivered before: the broker's count, plus what an earlier
    graceful stop carried over when it gave the message back as a fresh copy."""
    headers = headers or {}
    return int(headers.get("x-delivery-count", 0)) + int(headers.get(PRIOR_DELIVERIES_HEADER, 0))


def close_connection(connection: Any) -> None:
    """Close `connection` if it is open; unacked deliveries go back to the queue."""
    if connection.is_open:
        try:
            connection.close()
        except CONNECTION_ERRORS:
            pass


def drain(inbox: "queue.Queue[Delivery]") -> list[Delivery]:
    """Everything waiting in `inbox`, without blocking."""
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items
