"""MLflow tracking against a real store and a real `mlflow server`: runs, the registry, secrets."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from {{ cookiecutter.package_name }}.settings import DEFAULT_QUEUE_PREFIX, ENV_PREFIX

pytestmark = pytest.mark.integration
PROJECT_ROOT = Path(__file__).resolve().parents[3]
PACKAGE = "{{ cookiecutter.package_name }}"
QUESTIONS = [
    {"id": "france", "prompt": "What is the capital of France?", "max_new_tokens": 24},
    {"id": "color", "prompt": "Name a primary color.", "max_new_tokens": 12},
    {"id": "bad", "prompt": "x", "max_new_tokens": 100000000},
]
# Values that must never reach MLflow or a log line, set wherever a user would put them.
SECRETS = {
    f"{ENV_PREFIX}RABBITMQ_URL": "amqp://guest:rabbit-s3cret-4711@127.0.0.1:5672/%2F",
    "AWS_SECRET_ACCESS_KEY": "aws-s3cret-4712",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-s3cret-4713",
    "HF_TOKEN": "hf_s3cret4714",
}


def cli(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", PACKAGE, *args],
        cwd=PROJECT_ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def write_questions(tmp_path: Path) -> Path:
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return source


def runs_of(client: MlflowClient, kind: str) -> list:
    experiment = client.get_experiment_by_name(DEFAULT_QUEUE_PREFIX)
    assert experiment is not None, "no experiment was created"
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.kind = '{kind}'")


def check_batch_run(client: MlflowClient, target: Path, tmp_path: Path) -> None:
    """The batch job's run holds its params, metrics and results file, read back via MLflow."""
    (run,) = runs_of(client, "batch")
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["model"] and params["backend"] and params["max_batch_size"] == "32"
    assert params["temperature"] == "0.0" and params["input_file"] == "questions.jsonl"
    assert params["engine_device"] == "cpu" and params["compute_type"]
    assert (metrics["inputs"], metrics["errors"]) == (3, 1)
    assert metrics["inputs_per_s"] > 0 and metrics["tokens_per_s"] > 0
    assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p95_ms"] <= metrics["latency_p99_ms"]
    assert metrics["batch_size_max"] == 2
    local = client.download_artifacts(run.info.run_id, "results", str(tmp_path / "back"))
    assert (Path(local) / target.name).read_text() == target.read_text()


def test_a_batch_run_is_tracked_in_the_local_store_without_a_server(tmp_path, model_dir):
    store = tmp_path / "mlruns"
    target = tmp_path / "replies.jsonl"
    result = cli(
        "batch", str(write_questions(tmp_path)), str(target),
        env={f"{ENV_PREFIX}TRACKING_DIR": str(store)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracked as MLflow run" in result.stdout
    assert (store / "mlflow.db").is_file()
    check_batch_run(MlflowClient(f"sqlite:///{store / 'mlflow.db'}"), target, tmp_path)


def test_the_local_store_has_a_registry_too(tmp_path, model_dir):
    env = {f"{ENV_PREFIX}TRACKING_DIR": str(tmp_path / "mlruns")}
    registered = cli("model", "register", env=env)
    assert registered.returncode == 0, registered.stderr[-3000:]
    champion = {f"{ENV_PREFIX}MODEL": f"models:/{DEFAULT_QUEUE_PREFIX}@champion"}
    served = cli("generate", "What is the capital of France?", env=env | champion)
    assert served.returncode == 0, served.stderr[-3000:]
    assert "Paris" in served.stdout


def test_a_batch_run_is_tracked_by_a_real_mlflow_server(mlflow_server, tmp_path, model_dir):
    uri = mlflow_server()
    target = tmp_path / "replies.jsonl"
    env = {"MLFLOW_TRACKING_URI": uri}
    result = cli("batch", str(write_questions(tmp_path)), str(target), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    check_batch_run(MlflowClient(uri), target, tmp_path)


def test_an_unreachable_tracking_server_is_one_line_before_any_work(tmp_path):
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    target = tmp_path / "replies.jsonl"
    env = {"MLFLOW_TRACKING_URI": uri}
    result = cli("batch", str(write_questions(tmp_path)), str(target), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: the MLflow tracking server at {uri} is unreachable (Connection refused); start "
        "it with `make mlflow-server`, or unset MLFLOW_TRACKING_URI to track into the local store"
    ]
    assert not target.exists()


def test_the_registered_champion_is_what_the_batch_job_serves(
    mlflow_server, tmp_path, model_dir, settings
):
    """Register the served model, alias it champion, then serve models:/<name>@champion."""
    uri = mlflow_server()
    env = {"MLFLOW_TRACKING_URI": uri, f"{ENV_PREFIX}CACHE_DIR": str(settings.cache_dir)}
    registered = cli("model", "register", env=env)
    assert registered.returncode == 0, registered.stderr[-3000:]
    name = DEFAULT_QUEUE_PREFIX
    assert registered.stdout.strip().endswith(f"models:/{name}@champion points to it")
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1"

    # Served from a fresh cache: the model comes out of the registry, not the bundled copy.
    fresh = tmp_path / "fresh-cache"
    (fresh / "models").mkdir(parents=True)
    for item in (settings.cache_dir / "models").iterdir():  # keep only the bundled source
        if item.name != "registry":
            (fresh / "models" / item.name).symlink_to(item)
    serve_env = env | {
        f"{ENV_PREFIX}MODEL": f"models:/{name}@champion",
        f"{ENV_PREFIX}CACHE_DIR": str(fresh),
    }
    target = tmp_path / "replies.jsonl"
    served = cli("batch", str(write_questions(tmp_path)), str(target), env=serve_env)
    assert served.returncode == 0, served.stderr[-3000:]
    replies = {r["id"]: r for r in map(json.loads, target.read_text().splitlines())}
    assert "Paris" in replies["france"]["text"]
    assert [p.name[:3] for p in (fresh / "models" / "registry" / name).iterdir()] == ["v1-"]
    batch_run = runs_of(client, "batch")[0]
    assert batch_run.data.params["model"] == f"models:/{name}@champion"
    assert "registry" in batch_run.data.params["model_dir"]

    unknown = cli("batch", str(write_questions(tmp_path)), str(target),
                  env=serve_env | {f"{ENV_PREFIX}MODEL": f"models:/{name}@nobody"})  # fmt: skip
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    last_line = unknown.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: model 'models:/{name}@nobody' is not in the registry")
{%- if cookiecutter.inference_backend == "ctranslate2" %}

    # The CTranslate2 model is an MLflow pyfunc (logged from a code file): it loads and answers.
    # Downloaded first: mlflow.set_tracking_uri would export the URI to later tests' children.
    import mlflow.artifacts
    import mlflow.pyfunc

    local = mlflow.artifacts.download_artifacts(
        client.get_model_version_download_uri(name, champion.version),
        dst_path=str(tmp_path / "pyfunc"),
        tracking_uri=uri,
    )
    pyfunc = mlflow.pyfunc.load_model(local)
    assert "Paris" in pyfunc.predict(["What is the capital of France?"])[0]
{%- endif %}


@pytest.mark.rabbitmq
def test_the_worker_logs_its_metrics_every_interval(tmp_path, broker, prefix, model_dir):
    store = tmp_path / "mlruns"
    env = {
        **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
        f"{ENV_PREFIX}TRACKING_DIR": str(store),
        f"{ENV_PREFIX}QUEUE_PREFIX": prefix,
        f"{ENV_PREFIX}WORKER_METRICS_EVERY_S": "1",
        f"{ENV_PREFIX}RABBITMQ_URL": broker,
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", PACKAGE, "worker"],
            cwd=PROJECT_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        source = write_questions(tmp_path)
        submitted = cli("submit", str(source), str(tmp_path / "replies.jsonl"), env=env)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        time.sleep(2.5)  # at least two reports after the last reply
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
    assert worker.returncode == 0, log_path.read_text()[-3000:]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = runs_of(client, "worker")
    assert run.info.status == "FINISHED" and run.data.tags["queue"] == f"{prefix}.requests"
    assert run.data.metrics["total_served"] == 2 and run.data.metrics["total_errors"] == 1
    history = client.get_metric_history(run.info.run_id, "total_served")
    assert len(history) >= 3, "the worker should report every second and once at the end"
    served = client.get_metric_history(run.info.run_id, "inputs_per_s")
    assert any(point.value > 0 for point in served)


def test_no_credential_reaches_mlflow_or_a_log_line(mlflow_server, tmp_path, model_dir):
    uri = mlflow_server(SECRETS)
    env = SECRETS | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "someone"}
    outputs = [
        cli("-v", "batch", str(write_questions(tmp_path)), str(tmp_path / "out.jsonl"), env=env),
        cli("-v", "model", "register", "--no-alias", env=env),
    ]
    for result in outputs:
        assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(DEFAULT_QUEUE_PREFIX)
    runs = client.search_runs([experiment.experiment_id])
    assert {r.data.tags["kind"] for r in runs} == {"batch", "register"}
    recorded = [json.dumps([r.data.params, r.data.tags]) for r in runs]
    recorded += [json.dumps(dict(v.tags)) for v in client.search_model_versions()]
    recorded += [r.stdout + r.stderr for r in outputs]
    recorded += [p.read_text() for p in tmp_path.glob("mlflow-server-*.log")]
    for name, secret in SECRETS.items():
        password = secret.split(":")[2].split("@")[0] if "://" in secret else secret
        leaks = [text[:200] for text in recorded if password in text]
        assert not leaks, f"{name}'s value leaked into: {leaks}"
