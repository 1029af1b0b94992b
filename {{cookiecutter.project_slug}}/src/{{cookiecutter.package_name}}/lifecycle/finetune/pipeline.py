"""The fine-tuning job: settings in; a tracked LoRA run, a registered model, a promotion out.

`run_finetune` builds the LoRA parameters from the settings, trains (`train.py`) inside an MLflow
run that records the parameters, every step's loss and the eval losses, logs the adapter,
registers the merged model and moves the champion alias to it only if its eval loss beats the
champion's on the same eval file. The `finetune` command is its thin caller.
"""

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...lifecycle.finetune.train import LoraParams, TrainResult, train_lora
from ...lifecycle.registry import Promotion, Registered, log_model, promote_if_better, register
from ...lifecycle.sources import resolve_for
from ...lifecycle.tracking import Run, settings_params, start_run, tracking_uri
from ...settings import Settings


@dataclass(frozen=True)
class FinetuneOutcome:
    """What a fine-tuning job did; `registered` and `promotion` are None if it registered none."""

    result: TrainResult
    registered: Registered | None = None
    promotion: Promotion | None = None
    champion: str = ""  # "<registered model>@<champion alias>"


def lora_params(settings: Settings) -> LoraParams:
    """The LoRA run the settings describe (LORA_* and FINETUNE_* variables)."""
    return LoraParams(
        rank=settings.lora_rank,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=tuple(settings.lora_target_modules),
        learning_rate=settings.finetune_learning_rate,
        steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size,
        max_seq_len=settings.finetune_max_seq_len,
    )


def run_finetune(
    settings: Settings,
    data: Path,
    eval_data: Path,
    out: Path,
    *,
    skip_long: bool = False,
    register_model: bool = True,
    on_trained: Callable[[TrainResult], None] | None = None,
) -> FinetuneOutcome:
    """Fine-tune the settings' model on `data`, tracked as a `finetune` run; register the merged
    model and promote it if it is better, unless `register_model` is False.

    The adapter and the merged model go to out/<run id> (out/<timestamp> with tracking off).
    `on_trained(result)` is called when training is done, before anything is registered.
    Raises FileNotFoundError for a missing data file, DatasetError for bad data (the run ends
    FAILED, as it does for any error), and what `train_lora`, the tracking server{% if cookiecutter.inference_backend == "ctranslate2" %}, the
    registry or the CTranslate2 quality gate raise.{% else %} or the
    registry raise.{% endif %}
    """
    params = lora_params(settings)
    for path in (data, eval_data):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
    digest = hashlib.sha256(eval_data.read_bytes()).hexdigest()[:16]
    run_params = settings_params(settings) | {"train_data": data.name, "eval_data": eval_data.name}
    run_params |= {f"lora_{k}": v for k, v in dataclasses.asdict(params).items()}
    base_dir = resolve_for(settings)
    with start_run(settings, "finetune", run_params | {"eval_digest": digest}) as run:
        result = train_lora(
            base_dir,
            data,
            eval_data,
            params,
            out / (run.run_id or time.strftime("%Y%m%d-%H%M%S")),
            on_step=lambda step, loss: run.log_metrics({"train_loss": loss}, step=step),
            device=settings.device,
            skip_long=skip_long,
        )
        _log_result(run, result)
        if on_trained is not None:
            on_trained(result)
        if not register_model:
            return FinetuneOutcome(result)
        registered, promotion = _register_and_promote(settings, run, result, digest)
    champion = f"{registered.name}@{settings.champion_alias}"
    return FinetuneOutcome(result, registered, promotion, champion)


def _log_result(run: Run, result: TrainResult) -> None:
    run.log_metrics(
        {
            "eval_loss_before": result.eval_loss_before,
            "eval_loss_after": result.eval_loss_after,
            "seconds_per_step": result.seconds_per_step,
            "train_seconds": result.seconds,
            "trainable_params": result.trainable_params,
            "train_examples": result.train_examples,
            "skipped_examples": result.skipped_examples,
        }
    )
    run.log_artifact(result.adapter_dir, "adapter")


def _register_and_promote(
    settings: Settings, run: Run, result: TrainResult, eval_digest: str
) -> tuple[Registered, Promotion]:
    """Register the merged model as a new version; move the champion alias if it is better."""
    engine, served_dir = _tuned_model_dir(settings, result.merged_dir)
    uri = tracking_uri(settings)
    candidate = register(uri, log_model(run, served_dir, engine), settings.registered_model)
    promotion = promote_if_better(
        uri,
        candidate,
        settings.champion_alias,
        result.eval_loss_after,
        eval_digest,
        result.eval_loss_before,
    )
    run.set_tags({"model_version": candidate.version, "promoted": promotion.promoted})
    return candidate, promotion


def _tuned_model_dir(settings: Settings, merged_dir: Path) -> tuple[str, Path]:
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    """(engine, directory) to register for a merged model: converted through the quality gate
    when the engine is CTranslate2 (a refused conversion raises and registers nothing)."""
    if settings.backend == "ctranslate2":
        from ...lifecycle.quantize import ensure_converted

        tuned = settings.model_copy(update={"model": str(merged_dir)})
        return "ctranslate2", ensure_converted(tuned)[0]
{%- else %}
    """(engine, directory) to register for a merged model: the merged model itself."""
{%- endif %}
    return "transformers", merged_dir
