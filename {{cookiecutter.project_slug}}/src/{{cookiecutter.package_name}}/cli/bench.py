"""The `bench` command: every engine and the worker on one prompt set (see `bench.run`)."""

from pathlib import Path
from typing import Annotated

import typer

from ..cli.app import app
from ..settings import load_settings


@app.command(rich_help_panel="Benchmark")
def bench(
    prompts: Annotated[Path, typer.Option(help="JSONL of prompts")] = Path(
        "data/bench_prompts.jsonl"
    ),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    modes: Annotated[
        str | None, typer.Option(help="Comma-separated modes; default: every mode available")
    ] = None,
    load: Annotated[
        float, typer.Option(min=0.05, max=1.0, help="Open-loop rate, as a fraction of saturation")
    ] = 0.7,
    out: Annotated[Path, typer.Option(help="Folder for the CSV, JSON and PNG")] = Path("out/bench"),
) -> None:
    """Benchmark every engine and the worker on one prompt set; ratios to the naive baseline."""
    from ..bench.run import run_bench

    chosen = modes.split(",") if modes else None  # an unknown one: a SettingsError, one line
    run_bench(load_settings(), prompts, max_new_tokens, chosen, load, out, typer.echo)
