"""The batch job and the command line, run as a user runs them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.errors import ModelSourceError
from {{ cookiecutter.package_name }}.lifecycle.cache import COMPLETE_MARKER
from {{ cookiecutter.package_name }}.lifecycle.sources import resolve_model
from {{ cookiecutter.package_name }}.serving.batch_job import run_job
from {{ cookiecutter.package_name }}.settings import ENV_PREFIX

from ...conftest import interrupt_halfway

PROJECT_ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_bad_lines_in_a_batch_file_do_not_fail_the_others(settings, tmp_path, backend):
    lines = [
        json.dumps({"id": "good-1", "prompt": "What is the capital of France?"}),
        "{this is not json",
        json.dumps({"id": "bad-role", "messages": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"id": "too-long", "prompt": "many words " * backend.context_window}),
        "",
        json.dumps({"id": "good-2", "prompt": "Name a primary color.", "max_new_tokens": 16}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    target = tmp_path / "out.jsonl"
    summary = run_job(settings.model_copy(update={"tracking": False}), source, target).summary
    written = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in written] == [
        "good-1",
        "line-2",
        "bad-role",
        "too-long",
        "good-2",
        "line-7",
    ]
    errors = {r["id"]: r["error"]["type"] for r in written if r["error"]}
    assert errors == {
        "line-2": "invalid_json",
        "bad-role": "invalid_request",
        "too-long": "context_length_exceeded",
        "line-7": "invalid_encoding",
    }
    assert "Paris" in written[0]["text"]
    assert written[4]["text"]
    assert (summary.inputs, summary.errors) == (6, 4)


def test_the_main_job_prints_answers_and_a_throughput_line(tmp_path, model_dir):
    result = cli("batch", "data/sample_prompts.jsonl", str(tmp_path / "replies.jsonl"), "--show")
    assert result.returncode == 0, result.stderr
    assert "capital-france: " in result.stdout and "Paris" in result.stdout
    assert "inputs/s" in result.stdout and "tokens/s" in result.stdout and "p95" in result.stdout
    replies = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    sample = (PROJECT_ROOT / "data" / "sample_prompts.jsonl").read_text().splitlines()
    assert [r["id"] for r in replies] == [json.loads(line)["id"] for line in sample]
    assert all(r["error"] is None and r["text"] for r in replies)


@pytest.mark.parametrize("pipeline", [False, True], ids=["generate", "pipeline"])
def test_generate_answers_one_prompt(pipeline, model_dir):
    args = ["generate", "What is the capital of France?", *(["--pipeline"] if pipeline else [])]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_reports_a_bad_request_in_one_line(model_dir):
    result = cli("generate", "hi", "--max-new-tokens", "100000000")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: max_new_tokens_too_large")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("./no/such/model", "does not exist"),
        ("bundled:NoSuchModel", "unknown bundled model"),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "not in the Hugging Face cache"),
    ],
)
def test_a_missing_model_is_one_clear_line(model, words, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = cli("generate", "hi", env=env | {f"{ENV_PREFIX}MODEL": model})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert words in result.stderr


def test_a_missing_input_file_is_one_clear_line(tmp_path):
    result = cli("batch", str(tmp_path / "absent.jsonl"), str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: input file {tmp_path / 'absent.jsonl'} does not exist"


def test_the_bundled_model_is_converted_once_and_reused(model_dir, settings):
    assert (model_dir / COMPLETE_MARKER).is_file()
    assert (model_dir / "model.safetensors").is_file()
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(settings.model, settings.models_dir) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        resolve_model(str(tmp_path), tmp_path / "models")


def test_a_hub_id_loads_offline_from_the_hugging_face_cache(model_dir, tmp_path):
    """Lay the bundled model out as a cached Hub snapshot; the Hub path must find it offline."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.is_file() and not item.name.startswith("."):
            (snapshot / item.name).symlink_to(item)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    # The transformers engine reads the snapshot as it is (no conversion step on the way).
    model_env = {f"{ENV_PREFIX}MODEL": "acme/tiny-chat", f"{ENV_PREFIX}BACKEND": "transformers"}
    result = cli("generate", "What is the capital of France?", env=env | model_env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_model_pull_prints_the_model_directory(model_dir):
    result = cli("model", "pull")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == model_dir


def batch_runs() -> dict[str, str]:
    """run id -> status of the batch runs in the tests' tracking store."""
    from mlflow import MlflowClient

    store = Path(os.environ[f"{ENV_PREFIX}TRACKING_DIR"]).resolve() / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.kind = 'batch'"
    )
    return {run.info.run_id: run.info.status for run in runs}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
def test_an_interrupted_batch_resumes_with_every_id_exactly_once(sig, tmp_path, model_dir):
    ids = [f"q{i:02d}" for i in range(40)]
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": i, "prompt": f"Say {i} in words.", "max_new_tokens": 10}) + "\n"
            for i in ids
        )
    )
    out = tmp_path / "out.jsonl"
    env = {**os.environ, f"{ENV_PREFIX}MAX_BATCH_SIZE": "4"}
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "batch"]
    command.append(str(source))
    runs_before = batch_runs()
    code, stderr, before = interrupt_halfway([*command, str(out)], out, env, sig)
    if sig == signal.SIGTERM:
        assert code == 130
        assert "run the same command with --resume" in stderr.strip().splitlines()[-1]
    else:
        assert code == -signal.SIGKILL
    assert 8 <= len(before) < 40
    result = cli("batch", str(source), str(out), "--resume", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {len(before)} of 40 already answered" in result.stdout
    assert f"{40 - len(before)} inputs" in result.stdout  # nothing answered twice
    replies = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in replies] == ids
    assert all(r["error"] is None and r["text"] for r in replies)
    assert all(replies[ids.index(i)] == reply for i, reply in before.items())
    statuses = [s for run, s in batch_runs().items() if run not in runs_before]
    assert sorted(statuses) == ["FINISHED", "KILLED"], statuses  # never left RUNNING
