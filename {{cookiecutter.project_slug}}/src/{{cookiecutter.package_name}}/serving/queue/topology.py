"""Queue names and their idempotent declaration, the same for the worker, the client and the
dead-letter tools: declaring twice changes nothing, and every declarer passes the same arguments.

The request queue is a quorum queue (RabbitMQ's reliability guide: replicated, and with a
delivery limit): a message redelivered more than `delivery_limit` times, because the workers
holding it crashed or were stopped, is dead-lettered instead of killing worker after worker. A
message that cannot be served is dead-lettered by the worker itself, with why in its headers.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pika
from pika.exceptions import ChannelClosedByBroker

if TYPE_CHECKING:
    from ...settings import Settings

# Headers of a dead-lettered message: why it was refused, set by the worker.
ERROR_TYPE_HEADER = "x-error-type"
ERROR_MESSAGE_HEADER = "x-error-message"


class TopologyError(RuntimeError):
    """A queue exists with other arguments than these settings give it; the message says how
    to reconcile them. Not a connection problem: retrying cannot fix it."""


@dataclass(frozen=True)
class Names:
    prefix: str

    @property
    def requests(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.dead"

    def replies(self, client_id: str) -> str:
        return f"{self.prefix}.replies.{client_id}"


@dataclass(frozen=True)
class QueueOptions:
    """The request queue's arguments (QUEUE_MAX_LENGTH, QUEUE_DELIVERY_LIMIT)."""

    max_length: int | None = None
    delivery_limit: int = 3

    def arguments(self, names: Names) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": names.dead_letter_exchange,
            "x-dead-letter-routing-key": names.requests,
        }
        if self.max_length:
            # A full queue refuses new messages (the publisher's confirm is a nack), which
            # pushes back on producers instead of dropping the oldest requests.
            arguments |= {"x-max-length": self.max_length, "x-overflow": "reject-publish"}
        return arguments


def declare(channel: Any, names: Names, options: QueueOptions | None = None) -> None:
    """The durable quorum request queue, dead-lettering into a durable dead-letter queue.

    Raises TopologyError (one line) if a queue exists with other arguments.
    """
    channel.exchange_declare(names.dead_letter_exchange, exchange_type="direct", durable=True)
    _declare(channel, names.dead_letters, {"x-queue-type": "quorum"})
    channel.queue_bind(names.dead_letters, names.dead_letter_exchange, routing_key=names.requests)
    _declare(channel, names.requests, (options or QueueOptions()).arguments(names))


def _declare(channel: Any, name: str, arguments: dict[str, Any]) -> None:
    try:
        channel.queue_declare(name, durable=True, arguments=arguments)
    except ChannelClosedByBroker as exc:
        if exc.reply_code != 406:  # PRECONDITION_FAILED: the queue exists, declared otherwise
            raise
        shown = ", ".join(f"{k}={v}" for k, v in arguments.items() if k != "x-dead-letter-exchange")
        raise TopologyError(
            f"queue {name} already exists with other arguments than these settings ({shown}): "
            f"the broker says {exc.reply_text}; use the settings it was declared with, or drain "
            "and delete it (an older version declared a classic queue)"
        ) from None


def delete(channel: Any, names: Names) -> None:
    """Remove the request and dead-letter queues and the dead-letter exchange of `names`."""
    channel.queue_delete(names.requests)
    channel.queue_delete(names.dead_letters)
    channel.exchange_delete(names.dead_letter_exchange)


def declare_reply_queue(channel: Any, name: str) -> None:
    """Durable, so replies survive a broker restart; deleted 15 minutes after its client left."""
    channel.queue_declare(name, durable=True, arguments={"x-expires": 15 * 60 * 1000})


def connection_parameters(url: str, heartbeat_s: int) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    parameters.heartbeat = heartbeat_s
    parameters.blocked_connection_timeout = max(60, 4 * heartbeat_s)
    parameters.connection_attempts = 1  # the caller retries with backoff
    return parameters


def copy_properties(
    properties: Any, drop: tuple[str, ...] = (), add: dict[str, Any] | None = None
) -> pika.BasicProperties:
    """Persistent properties for publishing a message again as a fresh one: its routing and ids
    kept, the headers in `drop` removed and those in `add` set."""
    headers = {k: v for k, v in (properties.headers or {}).items() if k not in drop} | (add or {})
    return pika.BasicProperties(
        content_type=properties.content_type,
        delivery_mode=pika.DeliveryMode.Persistent,
        correlation_id=properties.correlation_id,
        message_id=properties.message_id,
        reply_to=properties.reply_to,
        headers=headers or None,
    )


def options_for(settings: "Settings") -> QueueOptions:
    """The request queue's arguments as the settings give them: one place for every declarer."""
    return QueueOptions(settings.queue_max_length, settings.queue_delivery_limit)
