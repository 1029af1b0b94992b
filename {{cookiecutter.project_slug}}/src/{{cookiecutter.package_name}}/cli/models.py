"""Model lifecycle commands: `model pull`, `model register`, `artifacts push|pull`,
`mlflow-server`{% if cookiecutter.inference_backend == "ctranslate2" %}, `convert`{% endif %}."""

from pathlib import Path
from typing import Annotated

import typer

from ..settings import load_settings
from .app import app, artifacts_app, fail, model_app

ModelOption = Annotated[str | None, typer.Option(help="Model spec; default from settings")]


@model_app.command("pull")
def model_pull(model: ModelOption = None) -> None:
    """Fetch (and for the bundled model, convert) the model into the cache; print its directory."""
    from ..lifecycle.sources import resolve_for

    typer.echo(resolve_for(load_settings(model=model)))


@model_app.command("register")
def model_register(
    model: ModelOption = None,
    alias: Annotated[
        str | None, typer.Option(help="Point this alias at the new version; default: champion")
    ] = None,
    no_alias: Annotated[bool, typer.Option("--no-alias", help="Register only")] = False,
) -> None:
    """Log the served model to MLflow, register it as a new version and point the alias at it."""
    from ..lifecycle.publish import register_served

    settings = load_settings(model=model, champion_alias=alias)
    registered = register_served(settings, None if no_alias else settings.champion_alias)
    if no_alias:
        typer.echo(f"registered {registered.model_uri}")
    else:
        pointer = f"models:/{registered.name}@{settings.champion_alias}"
        typer.echo(f"registered {registered.model_uri}; {pointer} points to it")


@app.command("mlflow-server", rich_help_panel="Model lifecycle")
def mlflow_server(
    host: Annotated[str | None, typer.Option(help="Default from settings (127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535)] = None,
) -> None:
    """Run the MLflow tracking server (backend store and artifacts from settings) until Ctrl-C."""
    from ..lifecycle.mlflow_server import ServerSetupError, serve

    settings = load_settings(mlflow_host=host, mlflow_port=port)
    try:
        status = serve(settings)
    except ServerSetupError as exc:
        fail(str(exc))
    raise typer.Exit(status)


@artifacts_app.command("push")
def artifacts_push(
    directory: Annotated[Path, typer.Argument(help="A model or adapter directory")],
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local folder")],
) -> None:
    """Copy a model directory to a store (S3 or a folder)."""
    from ..lifecycle.artifacts import push_dir

    count = push_dir(directory, uri, load_settings().s3_endpoint_url)
    typer.echo(f"{count} files stored at {uri}")


@artifacts_app.command("pull")
def artifacts_pull(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local folder")],
    directory: Annotated[Path, typer.Argument(help="Where to put it (replaced whole)")],
) -> None:
    """Copy a stored model directory from a store (S3 or a folder)."""
    from ..lifecycle.artifacts import pull_dir

    typer.echo(pull_dir(uri, directory, load_settings().s3_endpoint_url))
{%- if cookiecutter.inference_backend == "ctranslate2" %}


@app.command(rich_help_panel="Model lifecycle")
def convert(
    quantization: Annotated[
        str | None, typer.Option(help="int8, int8_float32, int16, float32, float16, ... or auto")
    ] = None,
    model: ModelOption = None,
    force: Annotated[bool, typer.Option(help="Publish even if the quality gate fails")] = False,
    every: Annotated[
        bool, typer.Option("--all", help="Gate every compute type of this device; print the table")
    ] = False,
) -> None:
    """Convert the model to CTranslate2, gate its quality against the float model, publish it."""
    from ..lifecycle.publish import convert_and_gate

    settings = load_settings(model=model, quantization=quantization)
    convert_and_gate(settings, force, every, typer.echo)
{%- endif %}
