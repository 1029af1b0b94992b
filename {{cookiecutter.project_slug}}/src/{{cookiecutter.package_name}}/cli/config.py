"""`config show`: the settings a command run here would use, secrets masked."""

import json
from typing import Annotated

import typer

from ..settings import effective_settings, load_settings
from .app import app

config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
app.add_typer(config_app, name="config", rich_help_panel="Settings")


@config_app.command("show")
def show(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Print every setting's effective value (defaults, .env, environment), secrets masked."""
    shown = effective_settings(load_settings())
    if as_json:
        typer.echo(json.dumps(dict(shown), indent=2))
        return
    for name, value in shown:
        typer.echo(f"{name}={value}")
