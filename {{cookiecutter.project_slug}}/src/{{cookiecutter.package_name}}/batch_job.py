"""The main job: a JSONL file of requests through the dynamic batcher to a JSONL file of replies."""

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from {{ cookiecutter.package_name }}.batching import DynamicBatcher
from {{ cookiecutter.package_name }}.messages import Reply
from {{ cookiecutter.package_name }}.service import Admitted, InferenceService
from {{ cookiecutter.package_name }}.settings import Settings
from {{ cookiecutter.package_name }}.stats import Summary, summarize


def read_requests(path: Path) -> list[tuple[str, bytes]]:
    """(fallback id, raw line) for each non-blank line; raises FileNotFoundError if missing."""
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with path.open("rb") as lines:
        return [(f"line-{n}", line) for n, line in enumerate(lines, 1) if line.strip()]


def run_batch_file(
    service: InferenceService,
    settings: Settings,
    source: Path,
    target: Path,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[list[Reply], Summary]:
    """Serve every request in `source`, write replies to `target` in input order.

    Bad lines get error replies in place; they do not stop the job. `on_progress(done, total)`
    is called after each batch. Returns the replies and the throughput summary.
    """
    raw = read_requests(source)
    sizes: list[int] = []
    started = time.perf_counter()
    replies = serve_lines(service, settings, raw, on_progress, sizes)
    return replies, finish(target, replies, time.perf_counter() - started, sizes)


def serve_lines(
    service: InferenceService,
    settings: Settings,
    raw: list[tuple[str, bytes]],
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    batch_sizes: list[int] | None = None,
) -> list[Reply]:
    """Replies to (fallback id, raw request) pairs, in their order, batched as the settings say.

    The size of each batch run is appended to `batch_sizes` when one is given.
    """
    replies: list[Reply | None] = [None] * len(raw)
    batcher: DynamicBatcher[tuple[int, Admitted]] = DynamicBatcher(
        max_batch_size=settings.max_batch_size,
        max_wait_s=0.0,  # every request is already here: nothing is worth waiting for
        max_batch_tokens=settings.max_batch_tokens,
        sort_by_length=settings.sort_by_length,
    )
    for position, (fallback_id, line) in enumerate(raw):
        admitted = service.admit(line, fallback_id)
        if isinstance(admitted, Reply):
            replies[position] = admitted
        else:
            batcher.add((position, admitted), admitted.request.tokens)
    done = sum(r is not None for r in replies)
    on_progress(done, len(raw))
    for batch in batcher.drain():
        for (position, _), reply in zip(batch, service.run([a for _, a in batch]), strict=True):
            replies[position] = reply
        if batch_sizes is not None:
            batch_sizes.append(len(batch))
        done += len(batch)
        on_progress(done, len(raw))
    return [r for r in replies if r is not None]


def finish(
    target: Path, replies: list[Reply], seconds: float, batch_sizes: Sequence[int] = ()
) -> Summary:
    """Write the replies and summarize the job's throughput and latency."""
    write_replies(target, replies)
    served = [r for r in replies if r.error is None]
    return summarize(
        seconds,
        [r.latency_ms for r in served],
        sum(r.usage.completion_tokens for r in served),
        errors=len(replies) - len(served),
        batch_sizes=batch_sizes,
    )


def write_replies(target: Path, replies: list[Reply]) -> None:
    """Write JSONL atomically: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with partial.open("w", encoding="utf-8") as out:
        for reply in replies:
            out.write(reply.model_dump_json() + "\n")
    os.replace(partial, target)
