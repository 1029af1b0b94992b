"""Serving commands: `generate` (one prompt), `batch` (a file, in process{% if cookiecutter.worker_runtime == "ray" %} or on Ray{% endif %}), `worker`
(RabbitMQ), `submit` (a file through the workers) and `dead-letters`."""

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ..serving.replies import JobInterrupted
from ..settings import load_settings
from .app import INTERRUPTED, app, fail, progress, sigterm_interrupts

log = logging.getLogger(__name__)
Source = Annotated[Path, typer.Argument(help="JSONL of requests (id, prompt or messages, ...)")]
Target = Annotated[Path, typer.Argument(help="JSONL of replies, in input order when done")]
{%- if cookiecutter.worker_runtime == "ray" %}
Replicas = Annotated[int | None, typer.Option(min=0, help="Ray replicas, each with its model")]
{%- endif %}


@app.command(rich_help_panel="Serving")
def generate(
    prompt: str,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, max=2.0)] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable)")] = None,
    pipeline: Annotated[
        bool, typer.Option(help="Use transformers.pipeline('text-generation') (quick path)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole reply as JSON")] = False,
) -> None:
    """Answer one prompt."""
    from ..lifecycle.loading import answer_one, pipeline_answer

    settings = load_settings(system_prompt=system)
    raw: dict[str, object] = {
        "id": "cli",
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "stop": stop or [],
    }
    raw |= {"temperature": temperature, "top_p": top_p, "seed": seed}
    raw = {k: v for k, v in raw.items() if v is not None}
    if pipeline:
        typer.echo(pipeline_answer(settings, raw))
        return
    reply = answer_one(settings, raw)
    if as_json:
        typer.echo(reply.model_dump_json())
    elif reply.error is not None:
        fail(f"{reply.error.type}: {reply.error.message}")
    else:
        typer.echo(reply.text)


@app.command(rich_help_panel="Serving")
def batch(
    source: Source,
    target: Target,
    show: Annotated[bool, typer.Option(help="Print each prompt's answer")] = False,
    resume: Annotated[
        bool, typer.Option(help="Keep the replies already in TARGET; answer only the rest")
    ] = False,
{%- if cookiecutter.worker_runtime == "ray" %}
    replicas: Replicas = None,
{%- endif %}
) -> None:
    """Run a file of requests through the dynamic batcher; print a throughput summary.

    Each reply is written as soon as it is known: an interrupted job is finished by running
    the same command with --resume.
    """
    from ..serving.batch_job import run_job
{% if cookiecutter.worker_runtime == "ray" %}
    settings = load_settings(replicas=replicas)
{%- else %}
    settings = load_settings()
{%- endif %}
    try:
        with sigterm_interrupts(), progress("generating") as on_progress:
            done = run_job(settings, source, target, resume, on_progress, typer.echo)
    except JobInterrupted as exc:
        _stopped(exc)
    if show:
        for reply in done.replies:
            answer = reply.text if reply.error is None else f"[error] {reply.error.message}"
            typer.echo(f"{reply.id}: {' '.join(answer.split())}")
    typer.echo(done.summary.line())
    typer.echo(f"replies written to {target}{done.where}")


@app.command(rich_help_panel="Serving")
{%- if cookiecutter.worker_runtime == "ray" %}
def worker(replicas: Replicas = None) -> None:
{%- else %}
def worker() -> None:
{%- endif %}
    """Serve requests from RabbitMQ until SIGTERM or Ctrl-C (the batch in hand is finished;
    a second signal exits at once)."""
    from ..lifecycle.loading import load_service_apart
    from ..serving.queue.worker import EXIT_FAILED, Worker, WorkerFailed, run_tracked
{% if cookiecutter.worker_runtime == "ray" %}
    settings = load_settings(replicas=replicas)
{%- else %}
    settings = load_settings()
{%- endif %}
    stopping = _stop_on_signals()
    try:
{%- if cookiecutter.worker_runtime == "ray" %}
        if settings.replicas:
            from ..serving.distributed import run_workers

            for index, counters in enumerate(run_workers(settings, settings.replicas, stopping)):
                typer.echo(f"replica {index}: {counters}")
            return
{%- endif %}
        served = Worker(load_service_apart(settings), settings)

        def stop_when_asked() -> None:
            stopping.wait()
            served.stop()

        threading.Thread(target=stop_when_asked, daemon=True).start()
        run_tracked(served)
    except WorkerFailed as exc:  # exit non-zero: the supervisor restarts a fresh worker
        fail(f"{exc}; exiting so that the worker is restarted", EXIT_FAILED)


def _stop_on_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT; a second one exits at once."""
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():  # a second signal: no more waiting for the batch in hand
            log.warning("%s again: exiting now; the requests in hand go back to the queue", name)
            os._exit(128 + signum)
        log.info("%s: stopping (again to exit at once)", name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return stopping


def _stopped(exc: JobInterrupted) -> NoReturn:
    """What an interrupted job says (how to finish it) and its exit status."""
    typer.echo(str(exc), err=True)
    raise typer.Exit(INTERRUPTED)


@app.command(rich_help_panel="Serving")
def submit(
    source: Source,
    target: Target,
    window: Annotated[int | None, typer.Option(min=1, help="Requests in flight")] = None,
    timeout: Annotated[float | None, typer.Option(min=0.1, help="Seconds per request")] = None,
    resume: Annotated[
        bool, typer.Option(help="Keep the replies already in TARGET; send only the rest")
    ] = False,
) -> None:
    """Send a file of requests to the workers through RabbitMQ; write their replies as they come.

    Lines that are not valid requests are answered here and not sent. An interrupted run is
    finished by running the same command with --resume.
    """
    from ..serving.queue.submit import submit_file

    settings = load_settings(client_window=window, reply_timeout_s=timeout)
    try:
        with sigterm_interrupts(), progress("waiting for replies") as on_progress:
            done = submit_file(settings, source, target, resume, on_progress)
    except JobInterrupted as exc:
        _stopped(exc)
    stats = done.stats
    typer.echo(done.summary.line())
    typer.echo(
        f"{stats.duplicates} duplicate replies dropped, {stats.timeouts} timed out, "
        f"{stats.reconnects} reconnects; replies written to {target}"
    )


@app.command("dead-letters", rich_help_panel="Serving")
def dead_letters_command(
    replay: Annotated[
        bool, typer.Option(help="Send them back to the workers as fresh requests")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first")] = 100,
) -> None:
    """List the refused requests in the dead-letter queue and why; --replay sends them back."""
    from ..serving.queue.dead_letters import dead_letters

    found = dead_letters(load_settings(), limit, replay)
    for letter in found:
        typer.echo(f"{letter.id}\t{letter.reason}\t{letter.message}")
    verb = "replayed to the request queue" if replay else "in the dead-letter queue (kept)"
    typer.echo(f"{len(found)} dead-lettered requests {verb}", err=True)
