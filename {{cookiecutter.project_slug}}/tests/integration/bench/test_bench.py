"""The benchmark command, run small: it must produce its table, CSV, PNG and ratios."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

{% if cookiecutter.inference_backend != "ctranslate2" -%}
from {{ cookiecutter.package_name }}.lifecycle.precision import cpu_has_bf16
{% endif -%}
from {{ cookiecutter.package_name }}.settings import ENV_PREFIX

pytestmark = pytest.mark.integration
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def bench(tmp_path: Path, modes: str, env: dict | None = None) -> tuple[str, list[dict]]:
    prompts = tmp_path / "prompts.jsonl"
    lines = (PROJECT_ROOT / "data" / "bench_prompts.jsonl").read_text().splitlines()
    prompts.write_text("\n".join(lines[:4]) + "\n")
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "bench"]
    options = ["--modes", modes, "--prompts", str(prompts), "--max-new-tokens", "8"]
    result = subprocess.run(
        [*command, *options, "--out", str(out)],
        cwd=PROJECT_ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "results.csv").open() as f:
        return result.stdout, list(csv.DictReader(f))


def test_bench_reports_each_mode_against_the_naive_baseline(tmp_path, model_dir):
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    # The engine this project serves against the baseline. The other transformers modes run
    # the same code as the baseline's in a transformers bake, whose test runs them all.
    modes = ["naive", "ct2-float32"]
{%- else %}
    modes = ["naive", "batched", "continuous", *(["batched-bf16"] if cpu_has_bf16() else [])]
{%- endif %}
    stdout, rows = bench(tmp_path, ",".join(modes))
    assert [r["mode"] for r in rows] == modes
    assert float(rows[0]["x_naive"]) == 1.0
    for row in rows:
        assert int(row["inputs"]) == 4 and int(row["errors"]) == 0
        assert float(row["inputs_per_s"]) > 0 and float(row["peak_rss_mib"]) > 100
    assert "| naive |" in stdout and f"| {modes[1]} |" in stdout and "GB/s" in stdout

    # The same numbers, the CSV and the plot are in an MLflow run.
    from mlflow import MlflowClient

    from {{ cookiecutter.package_name }}.settings import DEFAULT_QUEUE_PREFIX

    run_id = stdout.rsplit("tracked as MLflow run ", 1)[1].split()[0]
    client = MlflowClient(f"sqlite:///{os.environ[f'{ENV_PREFIX}TRACKING_DIR']}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.tags["kind"] == "bench" and run.data.params["modes"] == ",".join(modes)
    assert client.get_experiment(run.info.experiment_id).name == DEFAULT_QUEUE_PREFIX
    for row in rows:
        logged = run.data.metrics[f"{row['mode']}.inputs_per_s"]
        assert abs(logged - float(row["inputs_per_s"])) < 1e-9
    files = {a.path for a in client.list_artifacts(run_id, "bench")}
    assert {"bench/results.csv", "bench/results.json", "bench/bench.png"} <= files


def test_an_unknown_mode_is_one_line_before_anything_runs(tmp_path):
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "bench"]
    options = ["--modes", "naive,fast", "--out", str(tmp_path)]
    result = subprocess.run(
        [*command, *options], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown bench mode 'fast'; modes: batched")
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.rabbitmq
def test_bench_measures_the_worker_closed_idle_and_open_loop(tmp_path, broker, model_dir):
    _, rows = bench(tmp_path, "worker", env={f"{ENV_PREFIX}RABBITMQ_URL": broker})
    assert [r["mode"] for r in rows] == ["worker", "worker-idle", "worker-open"]
    assert [int(r["inputs"]) for r in rows] == [4, 4, 4]  # idle sends the first 8: there are 4
    assert all(int(r["errors"]) == 0 for r in rows)
    assert "Poisson" in rows[2]["note"]
