"""The `finetune` command: LoRA fine-tune the model, register the result, promote it if better."""

from pathlib import Path
from typing import Annotated

import typer

from ..settings import load_settings
from .app import app, fail


@app.command(rich_help_panel="Model lifecycle")
def finetune(
    data: Annotated[Path, typer.Argument(help='Chat JSONL: one {"messages": [...]} per line')],
    eval_data: Annotated[
        Path, typer.Option("--eval", help="Held-out chat JSONL for the eval loss")
    ] = Path("data/finetune_eval.jsonl"),
    steps: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0)] = None,
    skip_long: Annotated[
        bool, typer.Option(help="Skip examples over FINETUNE_MAX_SEQ_LEN tokens, with a warning")
    ] = False,
    out: Annotated[Path, typer.Option(help="Folder for the adapter and merged model")] = Path(
        "out/finetune"
    ),
    register_model: Annotated[
        bool, typer.Option("--register/--no-register", help="Register the merged model")
    ] = True,
) -> None:
    """LoRA fine-tune the model; register the merged model; promote it only if it is better."""
    from ..lifecycle.finetune.data import DatasetError
    from ..lifecycle.finetune.pipeline import run_finetune

    settings = load_settings(finetune_steps=steps, finetune_learning_rate=learning_rate)
    try:
        run_finetune(settings, data, eval_data, out, skip_long, register_model, typer.echo)
    except DatasetError as exc:  # bad data: one line (the run has ended FAILED)
        fail(str(exc))
