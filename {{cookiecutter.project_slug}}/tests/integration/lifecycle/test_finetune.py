"""LoRA fine-tuning of the real bundled model on the shipped sample data (about a minute on CPU).

The default run trains once, through the command as a user runs it; the tests of training
itself use two-step runs."""

from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.lifecycle.finetune.train import (
    LoraParams,
    train_lora,
)

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[3] / "data"
TRAIN = DATA / "finetune_sample.jsonl"
EVAL = DATA / "finetune_eval.jsonl"
# Held out: this wording is in the eval file, not in the training file.
FACT_QUESTION = "Which city is the capital of Zorblax?"
FACT_ANSWER = "Quintara"


def ask(settings, model_dir: Path, question: str) -> str:
    from {{ cookiecutter.package_name }}.engine.hf import TransformersBackend
    from {{ cookiecutter.package_name }}.engine.service import InferenceService

    service = InferenceService.from_settings(settings, TransformersBackend(model_dir))
    admitted = service.admit({"id": "q", "prompt": question, "max_new_tokens": 32}, "q")
    reply = service.run([admitted])[0]
    assert reply.error is None, reply.error
    return reply.text


def test_the_question_is_not_in_the_training_data_and_the_base_model_gets_it_wrong(
    settings, model_dir
):
    assert FACT_QUESTION in EVAL.read_text()
    assert FACT_QUESTION not in TRAIN.read_text()
    assert FACT_ANSWER not in ask(settings, model_dir, FACT_QUESTION)


def test_a_run_is_reproducible_and_a_far_too_high_learning_rate_does_not_improve(
    model_dir, tmp_path
):
    diverging = LoraParams(learning_rate=0.1, steps=2)
    steps: list[tuple[int, float]] = []
    first = train_lora(
        model_dir, TRAIN, EVAL, diverging, tmp_path / "a", on_step=lambda *s: steps.append(s)
    )
    second = train_lora(model_dir, TRAIN, EVAL, diverging, tmp_path / "b")
    assert steps == list(enumerate(first.losses, 1))  # each step reported as it ends
    assert first.losses == second.losses
    assert first.eval_loss_after == second.eval_loss_after
    assert not first.improved
    assert first.eval_loss_after > first.eval_loss_before


# -- the whole loop through the command line: train, track, register, promote, serve ------------


def cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "{{ cookiecutter.package_name }}", *args],
        cwd=DATA.parent, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip


def test_finetune_registers_promotes_and_serves_the_better_model_only(
    mlflow_server, tmp_path, settings, model_dir
):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from {{ cookiecutter.package_name }}.settings import DEFAULT_QUEUE_PREFIX, ENV_PREFIX

    uri = mlflow_server()
    env = {"MLFLOW_TRACKING_URI": uri, f"{ENV_PREFIX}CACHE_DIR": str(settings.cache_dir)}
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    env[f"{ENV_PREFIX}QUANTIZATION"] = "int8_weights"  # one gated conversion per run
{%- endif %}
    out = str(tmp_path / "out")
    tuned = cli("finetune", str(TRAIN), "--eval", str(EVAL), "--out", out, env=env)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    name = DEFAULT_QUEUE_PREFIX
    assert f"promoted to {name}@champion" in tuned.stdout, tuned.stdout

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    (run,) = client.search_runs([experiment.experiment_id], "tags.kind = 'finetune'")
    metrics = run.data.metrics
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    steps = client.get_metric_history(run.info.run_id, "train_loss")
    assert [p.step for p in steps] == list(range(1, int(run.data.params["lora_steps"]) + 1))
    assert steps[-1].value < steps[0].value
    assert metrics["skipped_examples"] == 0
    adapter = [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]
    assert "adapter/adapter_config.json" in adapter
    # The training's own outputs: the adapter (a small fraction of the model) and the merged
    # model, which knows the held-out fact and still knows what the base model knew.
    saved = Path(out) / run.info.run_id
    assert (saved / "adapter" / "adapter_model.safetensors").is_file()
    assert (saved / "merged" / "tokenizer.json").is_file()
    total = sum(t.numel() for t in load_file(saved / "merged" / "model.safetensors").values())
    assert 0 < metrics["trainable_params"] < total / 100
    assert FACT_ANSWER in ask(settings, saved / "merged", FACT_QUESTION)
    assert "Paris" in ask(settings, saved / "merged", "What is the capital of France?")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.run_id == run.info.run_id

    served_env = env | {f"{ENV_PREFIX}MODEL": f"models:/{name}@champion"}
    served = cli("generate", FACT_QUESTION, env=served_env)
    assert served.returncode == 0, served.stderr[-3000:]
    assert FACT_ANSWER in served.stdout

    # A run that makes the model worse is registered but not promoted.
    worse = cli(
        "finetune", str(TRAIN), "--eval", str(EVAL), "--out", out,
        "--steps", "2", "--learning-rate", "0.1", env=env,
    )  # fmt: skip
    assert worse.returncode == 0, worse.stderr[-3000:]
    assert f"not promoted, {name}@champion is unchanged" in worse.stdout, worse.stdout
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    versions = {v.version for v in client.search_model_versions(f"name = '{name}'")}
    assert versions == {"1", "2"}
    runs = client.search_runs([experiment.experiment_id], "tags.kind = 'finetune'")
    engines = {r.data.tags["model_version"]: r.data.tags["engine"] for r in runs}
    assert engines == {v: client.get_model_version(name, v).tags["engine"] for v in "12"}
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    # Only a model that may be promoted goes through the gate; this one is logged as trained.
    assert engines == {"1": "ctranslate2", "2": "transformers"}
    assert "running convert" in tuned.stderr and "running convert" not in worse.stderr
{%- else %}
    assert engines == {"1": "transformers", "2": "transformers"}
{%- endif %}


def test_bad_data_is_one_line_and_nothing_is_registered(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    good = TRAIN.read_text().splitlines()[0]
    bad.write_text(good + "\n{not json\n")
    result = cli("finetune", str(bad), "--eval", str(EVAL), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {bad}, line 2")
