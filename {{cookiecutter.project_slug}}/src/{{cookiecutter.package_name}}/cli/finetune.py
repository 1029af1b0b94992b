"""The `finetune` command: LoRA fine-tune the model, register the result, promote it if better.

The job itself is `lifecycle.finetune.pipeline.run_finetune`; this module parses and prints.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..cli.app import app, fail
from ..settings import load_settings

if TYPE_CHECKING:
    from ..lifecycle.finetune import FinetuneOutcome, TrainResult


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
    from ..lifecycle.finetune import DatasetError, run_finetune

    settings = load_settings(finetune_steps=steps, finetune_learning_rate=learning_rate)
    try:
        outcome = run_finetune(
            settings,
            data,
            eval_data,
            out,
            skip_long=skip_long,
            register_model=register_model,
            on_trained=lambda result: typer.echo(_trained(result)),
        )
    except DatasetError as exc:  # bad data: one line (the run has ended FAILED)
        fail(str(exc))
    _echo_promotion(outcome)


def _trained(result: "TrainResult") -> str:
    return (
        f"eval loss {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f} after "
        f"{result.steps} steps ({result.seconds_per_step:.2f} s/step); adapter and merged "
        f"model in {result.adapter_dir.parent}"
    )


def _echo_promotion(outcome: "FinetuneOutcome") -> None:
    """What was registered and whether it became the champion; nothing if nothing was."""
    registered, promotion, champion = outcome.registered, outcome.promotion, outcome.champion
    if registered is None or promotion is None:
        return
    losses = f"eval loss {outcome.result.eval_loss_after:.4f} against {promotion.baseline_loss:.4f}"
    if promotion.promoted:
        verdict = f"promoted to {champion} ({losses} of {promotion.baseline})"
    else:
        verdict = f"not promoted, {champion} is unchanged ({losses} of {promotion.baseline})"
    typer.echo(f"registered {registered.model_uri}, {verdict}")
