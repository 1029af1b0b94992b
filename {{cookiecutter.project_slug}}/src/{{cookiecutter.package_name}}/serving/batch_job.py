"""The main job: a JSONL file of requests through the dynamic batcher to a JSONL file of replies.

`run_job` is the `batch` command: one MLflow run, the replies written as they come (see
`replies.py`), resumable, on one process or (ray renders) spread over Ray replicas.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..engine.service import serve_lines
from ..lifecycle.loading import load_service
from ..lifecycle.tracking import Run, end_interrupted_runs, output_tag, settings_params, start_run
from ..messages import Reply
from ..settings import Settings
from ..stats import Summary
from .replies import JobInterrupted, ReplyWriter, plan, read_requests, summarize_replies

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class JobOutcome:
    replies: list[Reply]  # every line's reply, in input order
    summary: Summary  # of this run's work (a resumed job counts only what it did)
    where: str  # where the MLflow run is, for the last line the command prints


def run_job(
    settings: Settings,
    source: Path,
    target: Path,
    resume: bool = False,
    on_progress: Progress = lambda done, total: None,
    notify: Callable[[str], None] = log.info,
) -> JobOutcome:
    """Answer every request of `source` into `target` in one MLflow run named `batch`.

    Fails before any model loads on a missing input, an unwritable output or an unreachable
    tracking server. Raises JobInterrupted on Ctrl-C or SIGTERM (the run ends KILLED).
    """
    lines = read_requests(source)
    writer = ReplyWriter(target, resume)
    todo = plan(lines, set(writer.answered), settings.max_request_bytes)
    if resume:
        notify(f"resuming: {len(lines) - len(todo.todo)} of {len(lines)} already answered")
        end_interrupted_runs(settings, "batch", target)
    params = settings_params(settings) | {"input_file": source.name, "resume": resume}
    try:
        with start_run(settings, "batch", params) as run:
            run.set_tags({"output": output_tag(target)})
            for duplicate in todo.duplicates:
                writer.write(duplicate)
            new, seconds, sizes = _serve(settings, todo.todo, on_progress, writer, run)
            replies = writer.finish(todo.order)
            summary = summarize_replies([*todo.duplicates, *new], seconds, sizes)
            run.log_metrics(summary.metrics())
            run.log_artifact(target, "results")
    except KeyboardInterrupt:
        raise JobInterrupted(writer) from None
    return JobOutcome(replies, summary, run.where())


def _serve(
    settings: Settings,
    todo: list[tuple[str, bytes]],
    on_progress: Progress,
    writer: ReplyWriter,
    run: Run,
) -> tuple[list[Reply], float, list[int]]:
    """(new replies, seconds, batch sizes) of serving `todo` here or on Ray replicas."""
{%- if cookiecutter.worker_runtime == "ray" %}
    if settings.replicas:
        from .distributed import run_batch

        new, seconds = run_batch(settings, settings.replicas, todo, on_progress, writer.write)
        return new, seconds, []
{%- endif %}
    service = load_service(settings)
    run.log_params(service.backend.describe())
    sizes: list[int] = []
    started = time.perf_counter()
    new = serve_lines(service, settings, todo, on_progress, sizes, writer.write)
    return new, time.perf_counter() - started, sizes
