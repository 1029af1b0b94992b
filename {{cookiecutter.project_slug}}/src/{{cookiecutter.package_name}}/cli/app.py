"""The command tree and what every command shares: logging, one-line failures, progress bars.

Each `cli` module adds its commands to `app` (or a group of it); `cli/__init__.py` imports them
all and holds `main`, the console entry point. A command parses, builds settings, calls one
function of a lower layer and prints: nothing a test would have to reach through the CLI.
"""

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, NoReturn

import typer

from ..settings import unknown_variables

app = typer.Typer(
    help="Batched LLM inference with MLOps: generate, batch, serve from RabbitMQ, track in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Fetch, register and store the model.", no_args_is_help=True)
app.add_typer(model_app, name="model", rich_help_panel="Model lifecycle")
artifacts_app = typer.Typer(help="Copy model directories to and from S3 or a folder.")
app.add_typer(
    artifacts_app, name="artifacts", no_args_is_help=True, rich_help_panel="Model lifecycle"
)
INTERRUPTED = 130  # the exit status of a job stopped by Ctrl-C or SIGTERM, as a shell reports it


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "alembic", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pika logs every refused connection with a traceback; what went wrong is said in one line
    # by the command itself.
    logging.getLogger("pika").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # A misspelt variable would otherwise be ignored without a word.
    for unknown in unknown_variables(os.environ):
        logging.getLogger(__name__).warning("unknown setting %s is ignored", unknown)


def fail(message: str, status: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `status`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(status)


@contextlib.contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr; yields `update(done, total)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops a job as Ctrl-C does (a KeyboardInterrupt), so that it ends the same way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
