"""The fine-tuning job: settings in; a tracked LoRA run, a registered model, a promotion out."""

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from ...settings import Settings
from ..registry import{% if cookiecutter.inference_backend == "ctranslate2" %} champion_baseline,{% endif %} log_model, promote_if_better, register
from ..sources import resolve_for
from ..tracking import settings_params, start_run, tracking_uri
from .train import LoraParams, TrainResult, train_lora


def run_finetune(
    settings: Settings,
    data: Path,
    eval_data: Path,
    out: Path,
    skip_long: bool,
    register_model: bool,
    show: Callable[[str], None],
) -> TrainResult:
    """Fine-tune the settings' model on `data` (LORA_* and FINETUNE_* settings) in a `finetune`
    run that records the parameters, each step's loss and the eval losses and logs the adapter;
    with `register_model`, register the merged model and move the champion alias to it only if
    its eval loss beats the champion's on the same eval file{% if cookiecutter.inference_backend == "ctranslate2" %} (converted to CTranslate2 through
    the quality gate first when it may be promoted){% endif %}. The adapter and merged model go to
    out/<run id> (out/<timestamp> with tracking off). `show` gets a line when training is done,
    before anything is registered, and one on what was registered and promoted. Raises
    FileNotFoundError for a missing data file and DatasetError for bad data (the run then ends
    FAILED, as it does for any error)."""
    params = LoraParams(
        rank=settings.lora_rank,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=tuple(settings.lora_target_modules),
        learning_rate=settings.finetune_learning_rate,
        steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size,
        max_seq_len=settings.finetune_max_seq_len,
    )
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
        show(
            f"eval loss {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f} after "
            f"{result.steps} steps ({result.seconds_per_step:.2f} s/step); adapter and merged "
            f"model in {result.adapter_dir.parent}"
        )
        if not register_model:
            return result
        engine, served = "transformers", result.merged_dir
        uri = tracking_uri(settings)
        eligible = True
{%- if cookiecutter.inference_backend == "ctranslate2" %}
        if settings.backend == "ctranslate2":
            # Through the quality gate (a refusal raises) if it may be promoted; otherwise it
            # is registered as it is (the gate runs if it is ever served) and cannot be
            # promoted, whatever the champion turns out to be by then.
            eligible = _may_be_promoted(settings, result, digest)
        if eligible and settings.backend == "ctranslate2":
            from ..quantize import ensure_converted

            tuned = settings.model_copy(update={"model": str(served)})
            engine, served = "ctranslate2", ensure_converted(tuned)[0]
{%- endif %}
        registered = register(uri, log_model(run, served, engine), settings.registered_model)
        promotion = promote_if_better(
            uri,
            registered,
            settings.champion_alias,
            result.eval_loss_after,
            digest,
            result.eval_loss_before,
            engine,
            eligible,
        )
        run.set_tags(
            {"model_version": registered.version, "promoted": promotion.promoted, "engine": engine}
        )
    champion = f"{registered.name}@{settings.champion_alias}"
    losses = f"eval loss {result.eval_loss_after:.4f} against {promotion.baseline_loss:.4f}"
    if promotion.promoted:
        verdict = f"promoted to {champion} ({losses} of {promotion.baseline})"
    else:
        verdict = f"not promoted, {champion} is unchanged ({losses} of {promotion.baseline})"
    show(f"registered {registered.model_uri}, {verdict}")
    return result
{%- if cookiecutter.inference_backend == "ctranslate2" %}


def _may_be_promoted(settings: Settings, result: TrainResult, eval_digest: str) -> bool:
    baseline_loss, _ = champion_baseline(
        tracking_uri(settings),
        settings.registered_model,
        settings.champion_alias,
        eval_digest,
        result.eval_loss_before,
    )
    return result.eval_loss_after < baseline_loss
{%- endif %}
