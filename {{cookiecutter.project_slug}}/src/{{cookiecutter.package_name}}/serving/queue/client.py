"""The client: send requests to the workers and collect their replies (RPC over RabbitMQ).

A bounded window of requests is in flight; each is published persistent under publisher
confirms to the durable request queue, with a generated correlation id (never the user's id,
which may be any JSON value) and a durable reply queue of this client's own as `reply_to`. The
client survives a broker restart (it reconnects and re-sends what was not confirmed), waits out
a full queue up to a deadline (QueueFullError), gives up on a request after its timeout, and
drops duplicate replies (delivery is at-least-once) by correlation id.
"""

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, NackError, UnroutableError

from ...errors import one_line
from ...messages import ErrorInfo, Reply
from ...serving.queue.topology import (
    Names,
    QueueOptions,
    connection_parameters,
    declare,
    declare_reply_queue,
    options_for,
)
from ...settings import Settings, redact_url

log = logging.getLogger(__name__)
CONNECTION_ERRORS = (AMQPConnectionError, AMQPChannelError, ConnectionError, OSError)
Inflight = dict[str, tuple[dict[str, Any], float]]  # correlation id -> (request, sent at)


@dataclass
class ClientStats:
    sent: int = 0
    replies: int = 0
    duplicates: int = 0
    timeouts: int = 0
    reconnects: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class BrokerUnavailableError(ConnectionError):
    """RabbitMQ cannot be reached; the message says where and how to start it."""


class QueueFullError(RuntimeError):
    """The request queue refused new requests (QUEUE_MAX_LENGTH) for longer than the deadline."""


@dataclass(eq=False, repr=False)  # no repr: the url may hold a password
class Client:
    url: str
    prefix: str
    window: int = 64
    timeout_s: float = 300.0
    heartbeat_s: int = 30
    connect_timeout_s: float = 30.0
    options: QueueOptions = field(default_factory=QueueOptions)
    queue_full_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.options = self.options or QueueOptions()  # an untyped caller may pass None
        self.names = Names(self.prefix)
        self.reply_queue = self.names.replies(uuid.uuid4().hex[:12])
        self.stats = ClientStats()
        self._connection: Any = None
        self._channel: Any = None
        self._consumer = ""

    @classmethod
    def from_settings(
        cls, settings: Settings, prefix: str | None = None, window: int | None = None
    ) -> "Client":
        """A client with the settings' broker, timeouts and the workers' queue arguments."""
        return cls(
            settings.rabbitmq_url,
            prefix or settings.queue_prefix,
            window=window or settings.client_window,
            timeout_s=settings.reply_timeout_s,
            heartbeat_s=settings.heartbeat_s,
            connect_timeout_s=settings.connect_timeout_s,
            options=options_for(settings),
            queue_full_timeout_s=settings.queue_full_timeout_s,
        )

    def submit(
        self,
        requests: Iterable[dict[str, Any]],
        on_reply: Callable[[Reply], None],
        arrivals: list[float] | None = None,
    ) -> ClientStats:
        """Send every request (each a dict with an "id") and call `on_reply` once per request,
        with a reply that carries the request's own id. With `arrivals` (seconds from the start,
        one per request), each request is sent no earlier than its arrival (an open-loop load)
        and its latency counts from that moment. A request with no reply within the timeout
        gets an error reply of type "timeout". Raises BrokerUnavailableError if the broker stays
        unreachable, QueueFullError if the queue stays full past `queue_full_timeout_s`."""
        pending = list(requests)[::-1]  # popped from the end: input order
        due = list(arrivals or [])[::-1]
        inflight: Inflight = {}  # sent at: the moment its latency counts from
        answered: set[str] = set()

        def received(correlation_id: str, reply: Reply) -> None:
            if correlation_id in answered or correlation_id not in inflight:
                self.stats.duplicates += 1
                return
            request, sent_at = inflight.pop(correlation_id)
            answered.add(correlation_id)
            self.stats.replies += 1
            self.stats.latencies_ms.append((time.monotonic() - sent_at) * 1000.0)
            on_reply(reply.model_copy(update={"id": request["id"]}))

        self._connect(received)
        started = time.monotonic()
        try:
            while pending or inflight:
                try:
                    while pending and len(inflight) < self.window:
                        arrival = started + due[-1] if due else time.monotonic()
                        if arrival > time.monotonic():
                            break
                        request = pending[-1]
                        correlation_id = uuid.uuid4().hex
                        self._publish(request, correlation_id)
                        pending.pop()
                        if due:
                            due.pop()
                        inflight[correlation_id] = (request, arrival)
                        self.stats.sent += 1
                    until_next = started + due[-1] - time.monotonic() if due else 0.1
                    self._connection.process_data_events(time_limit=min(0.1, max(0.0, until_next)))
                except CONNECTION_ERRORS as exc:
                    log.warning("connection lost (%s); reconnecting",
                                str(exc) or type(exc).__name__)  # fmt: skip
                    self.stats.reconnects += 1
                    self._connect(received)
                self._expire(inflight, on_reply)
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        try:
            if self._channel is not None and self._channel.is_open:
                self._channel.basic_cancel(self._consumer)
                self._channel.queue_delete(self.reply_queue)
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        except CONNECTION_ERRORS:
            pass

    def _expire(self, inflight: Inflight, on_reply: Callable[[Reply], None]) -> None:
        now = time.monotonic()
        for correlation_id, (request, sent_at) in list(inflight.items()):
            if now - sent_at > self.timeout_s:
                del inflight[correlation_id]
                self.stats.timeouts += 1
                error = ErrorInfo(type="timeout", message=f"no reply within {self.timeout_s:g} s")
                on_reply(Reply(id=request["id"], finish_reason="error", error=error))

    def _publish(self, request: dict[str, Any], correlation_id: str) -> None:
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            correlation_id=correlation_id,
            message_id=correlation_id,
            reply_to=self.reply_queue,
        )
        body, requests = json.dumps(request).encode(), self.names.requests
        deadline: float | None = None
        while True:
            try:
                self._channel.basic_publish("", requests, body, properties, mandatory=True)
                return
            except NackError:  # the queue is full (x-max-length): back off, then retry
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.queue_full_timeout_s
                    log.warning("queue %s is full; retrying for up to %g s", requests,
                                self.queue_full_timeout_s)  # fmt: skip
                elif now > deadline:
                    raise QueueFullError(
                        f"queue {requests} is full (max length "
                        f"{self.options.max_length}) and stayed full for "
                        f"{self.queue_full_timeout_s:g} s; start more workers, or raise "
                        "QUEUE_MAX_LENGTH or QUEUE_FULL_TIMEOUT_S"
                    ) from None
                self._connection.process_data_events(time_limit=0.5)
            except UnroutableError as exc:
                raise AMQPChannelError(f"request queue {requests} missing") from exc

    def _connect(self, received: Callable[[str, Reply], None]) -> None:
        deadline, delay = time.monotonic() + self.connect_timeout_s, 0.5
        if self._connection is not None and self._connection.is_open:
            try:  # a channel-level error leaves the connection, and its consumer, open
                self._connection.close()
            except CONNECTION_ERRORS:
                pass
        while True:
            try:
                params = connection_parameters(self.url, self.heartbeat_s)
                self._connection = pika.BlockingConnection(params)
                self._channel = self._connection.channel()
                declare(self._channel, self.names, self.options)
                declare_reply_queue(self._channel, self.reply_queue)
                self._channel.confirm_delivery()

                def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
                    try:
                        reply = Reply.model_validate_json(body)
                    except ValueError as exc:
                        log.warning("dropped a malformed reply: %s", one_line(exc))
                    else:
                        received(properties.correlation_id or "", reply)
                    finally:
                        channel.basic_ack(method.delivery_tag)

                self._consumer = self._channel.basic_consume(
                    self.reply_queue, on_message_callback=on_message
                )
                return
            except CONNECTION_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise BrokerUnavailableError(
                        f"RabbitMQ is unreachable at {redact_url(self.url)} "
                        f"({str(exc) or type(exc).__name__}); start it with "
                        "`docker compose up -d rabbitmq`"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
