"""Queue names and their idempotent declaration: declaring twice changes nothing."""

from dataclasses import dataclass
from typing import Any

import pika

REPLY_QUEUE_EXPIRES_MS = 15 * 60 * 1000  # an abandoned client's reply queue goes away


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


def declare(channel: Any, names: Names, max_length: int | None = None) -> None:
    """The durable request queue, dead-lettering into a durable dead-letter queue.

    With `max_length`, a full queue refuses new messages (the publisher's confirm is a nack),
    which pushes back on producers instead of dropping the oldest requests.
    """
    channel.exchange_declare(names.dead_letter_exchange, exchange_type="direct", durable=True)
    channel.queue_declare(names.dead_letters, durable=True)
    channel.queue_bind(names.dead_letters, names.dead_letter_exchange, routing_key=names.requests)
    arguments: dict[str, Any] = {
        "x-dead-letter-exchange": names.dead_letter_exchange,
        "x-dead-letter-routing-key": names.requests,
    }
    if max_length:
        arguments |= {"x-max-length": max_length, "x-overflow": "reject-publish"}
    channel.queue_declare(names.requests, durable=True, arguments=arguments)


def delete(channel: Any, names: Names) -> None:
    """Remove the request and dead-letter queues and the dead-letter exchange of `names`."""
    channel.queue_delete(names.requests)
    channel.queue_delete(names.dead_letters)
    channel.exchange_delete(names.dead_letter_exchange)


def declare_reply_queue(channel: Any, name: str) -> None:
    """Durable, so replies survive a broker restart; it expires once its client is gone."""
    channel.queue_declare(name, durable=True, arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})


def connection_parameters(url: str, heartbeat_s: int) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    parameters.heartbeat = heartbeat_s
    parameters.blocked_connection_timeout = max(60, 4 * heartbeat_s)
    parameters.connection_attempts = 1  # the caller retries with backoff
    return parameters
