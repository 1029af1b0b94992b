"""The command line: one module per command group, each a thin layer over the package.

`app.py` holds the command tree and what commands share; `models.py` the model lifecycle,
`serve.py` the queue and batch surfaces, `api.py` the HTTP API, `config.py` `config show`,
`bench.py` the benchmark{% if cookiecutter.include_finetuning == "yes" %}, `finetune.py` LoRA fine-tuning{% endif %}.
`main` is the console entry point: an error a user can fix is one line on stderr, exit code 2.
"""

from ..cli import (
    api,
    bench,
    config{% if cookiecutter.include_finetuning == "yes" %},
    finetune{% endif %},
    models,
    serve,
)
from ..errors import ModelSourceError
from ..lifecycle.tracking import TrackingError
from ..messages import RequestError
from ..serving.queue.client import QueueFullError
from ..serving.queue.topology import TopologyError
from ..serving.replies import OutputError
from ..settings import SettingsError
from .app import app

__all__ = ["api", "app", "bench", "config"{% if cookiecutter.include_finetuning == "yes" %}, "finetune"{% endif %}, "main", "models", "serve"]

# Errors a user can fix: printed as one line, never as a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,  # the broker is unreachable (BrokerUnavailableError says how to start it)
    QueueFullError,
    TopologyError,
    OutputError,
    ModelSourceError,
    SettingsError,
    RequestError,
    TrackingError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    import typer

    errors: tuple[type[Exception], ...] = USER_ERRORS
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    from ..lifecycle.quantize import QualityGateError

    errors += (QualityGateError,)
{%- endif %}
    try:
        app()
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
