"""`serve`: the OpenAI-compatible HTTP API (serving/http/)."""

from typing import Annotated

import typer

from ..settings import load_settings
from .app import app, fail


@app.command(rich_help_panel="Serving")
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on [HTTP_HOST]")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="[HTTP_PORT]")] = None,
    via_queue: Annotated[
        bool, typer.Option(help="Send requests through RabbitMQ to the workers; load no model")
    ] = False,
) -> None:
    """Serve the OpenAI API (chat and text completions, streamed or not) until SIGTERM.

    /health answers at once; /ready once the model is loaded and warm. On SIGTERM or Ctrl-C,
    requests in flight finish (DRAIN_TIMEOUT_S) and new ones get 503. With --via-queue it
    loads no model: requests go through RabbitMQ to the workers, which stream back.
    """
    from ..lifecycle.loading import load_service_apart
    from ..lifecycle.sources import check_model
    from ..serving.http.server import serve as run_server

    overrides = {"http_host": host, "http_port": port}
    settings = load_settings(**{k: v for k, v in overrides.items() if v is not None})
    if via_queue:
        status = run_server(settings, None)
    else:
        check_model(settings)
        status = run_server(settings, lambda: load_service_apart(settings))
    if status:
        fail("the server stopped on an error (see the log above)", status)
