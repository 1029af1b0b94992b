"""The worker's broker session: one connection's channel, consumer, acks and dead letters.

A request is acked only after its reply is confirmed by the broker; one that cannot be served
gets an error reply and is dead-lettered with why in its headers. All of it runs on the
connection's thread, except `complete_soon`, which hands the work over to it."""

import json
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, NackError, UnroutableError

from ...engine.service import Admitted
from ...messages import ErrorInfo, Reply, RequestError
from ...settings import Settings
from .topology import ERROR_MESSAGE_HEADER, ERROR_TYPE_HEADER, Names, copy_properties

log = logging.getLogger(__name__)
CONNECTION_ERRORS = (AMQPConnectionError, AMQPChannelError, ConnectionError, OSError)
PRIOR_DELIVERIES_HEADER = "x-prior-deliveries"
CHUNK_TYPE = "chunk"  # the AMQP type of a streamed text chunk; replies have none


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
    """Consumes from its creation on (`channel` has the topology declared): `admit` turns each
    message body into an error reply or a request, which waits in `inbox` for generation."""

    def __init__(self, channel: Any, settings: Settings, counters: Counters, admit: Admit) -> None:
        self.settings, self.counters, self.admit = settings, counters, admit
        self.channel, self.connection = channel, channel.connection
        self.names = Names(settings.queue_prefix)
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.cancelled = False
        # Probing: the session takes one delivery at a time until a fresh one (never delivered
        # before) arrives. A redelivered message may be what killed the last worker: alone, it
        # can kill this one without taking innocent batchmates (and their delivery counts)
        # along. Normal traffic leaves probing at its first message.
        self.prefetch = settings.prefetch_count or 2 * settings.max_batch_size
        self.probing = True
        self.channel.confirm_delivery()
        self.chunk_channel: Any = None  # opened on the first streamed chunk
        self.channel.add_on_cancel_callback(self._on_cancelled)
        self._consume(1)

    def give_back(self, leftover: list[Delivery]) -> None:
        """Run the last acks, then give back what a stopping worker did not serve (`leftover`
        and the inbox) as fresh copies at the queue's tail: a graceful stop is no failure, so it
        must not count toward the delivery limit, but an earlier count is carried over (probing
        takes a suspect alone). A copy the queue refuses (full) is requeued as it is."""
        self.connection.process_data_events(time_limit=0)
        requeued = leftover + drain(self.inbox)
        for delivery in requeued:
            prior = deliveries_before(delivery.properties.headers)
            add = {PRIOR_DELIVERIES_HEADER: prior} if prior else None
            properties = copy_properties(delivery.properties, drop=("x-delivery-count",), add=add)
            try:
                self.channel.basic_publish(
                    "", self.names.requests, delivery.body, properties, mandatory=True
                )
                self.channel.basic_ack(delivery.tag)
            except (UnroutableError, NackError):
                self.channel.basic_nack(delivery.tag, requeue=True)
        log.info("finished the batch in hand; requeued %d waiting requests", len(requeued))

    def complete_soon(self, deliveries: list[Delivery], replies: list[Reply]) -> None:
        """From the generation thread: complete `deliveries` on the connection's thread."""
        try:
            self.connection.add_callback_threadsafe(lambda: self._complete(deliveries, replies))
        except CONNECTION_ERRORS:  # the connection died: the broker redelivers these requests
            log.warning("connection closed before replies could be sent; they will be redelivered")

    def stream_soon(self, chunks: list[tuple[Delivery, int, str]]) -> None:
        """From the generation thread: publish text chunks (delivery, offset, delta) on the
        connection's thread. Best effort: the reply, confirmed, holds the whole text."""
        try:
            self.connection.add_callback_threadsafe(lambda: self._stream(chunks))
        except CONNECTION_ERRORS:
            pass  # the requests go back to the queue; their replies will hold the text

    def _stream(self, chunks: list[tuple[Delivery, int, str]]) -> None:
        if self.chunk_channel is None:  # no publisher confirms: a chunk waits for nothing
            self.chunk_channel = self.connection.channel()
        for delivery, offset, delta in chunks:
            body = {"id": delivery.admitted.request.id, "offset": offset, "delta": delta}
            properties = pika.BasicProperties(
                type=CHUNK_TYPE,
                content_type="application/json",
                correlation_id=delivery.correlation_id or None,
            )
            self.chunk_channel.basic_publish("", delivery.reply_to, json.dumps(body), properties)

    def _consume(self, prefetch: int) -> None:
        self.channel.basic_qos(prefetch_count=prefetch)
        self.consumer_tag = self.channel.basic_consume(
            self.names.requests, on_message_callback=self._on_message
        )

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
        admitted = self.admit(body, f"delivery-{tag}")
        reply_to = properties.reply_to or ""
        correlation_id = properties.correlation_id or ""
        if isinstance(admitted, Reply):
            log.warning("rejected %s: %s", admitted.id,
                        admitted.error.message if admitted.error else "")  # fmt: skip
            self._dead_letter(tag, reply_to, correlation_id, admitted, body)
        elif not reply_to:
            log.warning("rejected %s: no reply_to, the reply could not be routed",
                        admitted.request.id)  # fmt: skip
            error = RequestError("no_reply_to", "the message has no reply_to: nowhere to reply")
            rejected = Reply.failure(admitted.request.id, error)
            self._dead_letter(tag, "", correlation_id, rejected, body)
        else:
            self.inbox.put(Delivery(tag, reply_to, correlation_id, admitted, body, properties))

    def _complete(self, deliveries: list[Delivery], replies: list[Reply]) -> None:
        for d, reply in zip(deliveries, replies, strict=True):
            try:
                if reply.error is not None:
                    self._dead_letter(d.tag, d.reply_to, d.correlation_id, reply, d.body)
                elif self._publish(d.reply_to, d.correlation_id, reply):
                    self.channel.basic_ack(d.tag)
                    self.counters.served += 1
                else:  # the reply queue is gone: keep the request, dead-lettered, not lost
                    error = RequestError("reply_undeliverable", f"reply queue {d.reply_to} is gone")
                    self._dead_letter(d.tag, "", "", Reply.failure(reply.id, error), d.body)
            except CONNECTION_ERRORS:
                raise
            except Exception:  # one bad reply must not stop the others
                log.exception("could not complete request %s", d.admitted.request.id)
                self.channel.basic_nack(d.tag, requeue=False)
                self.counters.dead_lettered += 1

    def _dead_letter(
        self, tag: int, reply_to: str, correlation_id: str, reply: Reply, body: bytes
    ) -> None:
        """Send the error reply (when it can be routed), then move the message to the
        dead-letter queue with why in its headers, confirmed before the original is acked."""
        if reply_to:
            self._publish(reply_to, correlation_id, reply)
        error = reply.error or ErrorInfo(type="error", message="")
        headers = {ERROR_TYPE_HEADER: error.type, ERROR_MESSAGE_HEADER: error.message[:1000]}
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


def drain(inbox: "queue.Queue[Delivery]") -> list[Delivery]:
    """Everything waiting in `inbox`, without blocking."""
    items = []
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items
