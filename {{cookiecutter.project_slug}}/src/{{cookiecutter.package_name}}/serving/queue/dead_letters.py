"""The dead-letter queue: what was refused and why, and sending it back to the workers.

A refused request lands here with why in its headers: the worker's error type and message, or
the broker's reason (`delivery_limit`: it was redelivered too often, its workers died). Replay
republishes each one to the request queue as a fresh message (its delivery count starts over)
and removes it from here once the broker has confirmed the copy.
"""

from dataclasses import dataclass
from typing import Any

import pika
from pika.exceptions import NackError, UnroutableError

from ...messages import request_id_of
from ...settings import Settings
from .client import QueueFullError
from .topology import (
    ERROR_MESSAGE_HEADER,
    ERROR_TYPE_HEADER,
    Names,
    connection_parameters,
    copy_properties,
    declare,
    options_for,
)

# Headers the broker or the worker added on the way in: a replayed copy starts clean.
DEATH_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                 "x-first-death-reason", "x-delivery-count", ERROR_TYPE_HEADER,
                 ERROR_MESSAGE_HEADER)  # fmt: skip


@dataclass
class DeadLetter:
    id: str | int | float
    reason: str
    message: str
    size: int


def dead_letters(settings: Settings, limit: int, replay: bool = False) -> list[DeadLetter]:
    """Up to `limit` dead-lettered requests, oldest first; with `replay`, each is sent back to
    the request queue (confirmed) and removed from the dead-letter queue, else left in place."""
    names = Names(settings.queue_prefix)
    params = connection_parameters(settings.rabbitmq_url, settings.heartbeat_s)
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        declare(channel, names, options_for(settings))
        channel.confirm_delivery()
        found: list[DeadLetter] = []
        held: list[int] = []
        for number in range(1, limit + 1):
            method, properties, body = channel.basic_get(names.dead_letters, auto_ack=False)
            if method is None:
                break
            found.append(_describe(properties, body, number))
            if replay:
                try:
                    fresh = copy_properties(properties, drop=DEATH_HEADERS)
                    channel.basic_publish("", names.requests, body, fresh, mandatory=True)
                except (NackError, UnroutableError):
                    raise QueueFullError(
                        f"the request queue {names.requests} refused a replayed request (full?); "
                        f"{len(found) - 1} were replayed, the rest stay dead-lettered"
                    ) from None
                channel.basic_ack(method.delivery_tag)
            else:
                held.append(method.delivery_tag)
        for tag in held:  # looked at, not taken: back where they were
            channel.basic_nack(tag, requeue=True)
        return found
    finally:
        if connection.is_open:
            connection.close()


def _describe(properties: Any, body: bytes, number: int) -> DeadLetter:
    headers = properties.headers or {}
    reason = headers.get(ERROR_TYPE_HEADER) or headers.get("x-first-death-reason") or "unknown"
    message = headers.get(ERROR_MESSAGE_HEADER, "")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    return DeadLetter(request_id_of(body, f"dead-letter-{number}"), reason, message, len(body))
