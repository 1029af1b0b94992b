"""`submit`: a JSONL file of requests sent to the workers through RabbitMQ, replies written as
they come (see `serving/replies.py`), resumable; lines that are not valid requests are answered
here and never sent."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...engine.service import limits_of
from ...messages import Reply, RequestError, parse_request, request_id_of
from ...settings import Settings
from ...stats import Summary, summarize
from ..replies import JobInterrupted, Plan, ReplyWriter, plan, read_requests
from .client import Client, ClientStats


@dataclass
class SubmitOutcome:
    summary: Summary  # of the replies the workers sent in this run
    stats: ClientStats  # duplicates dropped, timeouts, reconnects


def submit_file(
    settings: Settings,
    source: Path,
    target: Path,
    resume: bool = False,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> SubmitOutcome:
    """Send every request of `source` not yet answered in `target`; wait for the replies.

    A request that timed out (no worker in time) is sent again on resume. Raises
    JobInterrupted on Ctrl-C or SIGTERM.
    """
    writer = ReplyWriter(target, resume)
    answered = {
        k for k, r in writer.answered.items() if not (r.error and r.error.type == "timeout")
    }
    todo = plan(read_requests(source), answered, settings.max_request_bytes)
    requests = _valid_requests(settings, todo, writer)
    client = Client.from_settings(settings)
    served: list[Reply] = []

    def on_reply(reply: Reply) -> None:
        writer.write(reply)
        served.append(reply)
        on_progress(len(served), len(requests))

    started = time.perf_counter()
    try:
        stats = client.submit(requests, on_reply)
    except KeyboardInterrupt:
        raise JobInterrupted(writer) from None
    seconds = time.perf_counter() - started
    writer.finish(todo.order)
    good = [r for r in served if r.error is None]
    summary = summarize(
        seconds,
        stats.latencies_ms[: len(good)],
        sum(r.usage.completion_tokens for r in good),
        errors=len(served) - len(good),
    )
    return SubmitOutcome(summary, stats)


def _valid_requests(settings: Settings, todo: Plan, writer: ReplyWriter) -> list[dict]:
    """The requests to send; duplicate ids and invalid lines are answered in `writer` now."""
    for duplicate in todo.duplicates:
        writer.write(duplicate)
    requests: list[dict] = []
    for fallback_id, line in todo.todo:
        try:
            request = parse_request(line, fallback_id, limits_of(settings))
        except RequestError as exc:
            reply_id = request_id_of(line, fallback_id, settings.max_request_bytes)
            writer.write(Reply.failure(reply_id, exc))
            continue
        requests.append(request.model_dump(exclude_none=True))
    return requests
