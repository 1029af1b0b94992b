"""Every combination of options bakes into a clean, linted project whose unit tests pass."""

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

from combinations import (
    AWKWARD_NAMES,
    CODE_AXES,
    LONG_NAME,
    all_combinations,
    combo_id,
)
from conftest import package_of, project_env

COMBINATIONS = all_combinations()
# (A GitHub Actions expression, `${{ ... }}`, is not template syntax.)
UNRENDERED = re.compile(r"(?<!\$)\{\{|\{%|cookiecutter\.")
RUFF = [sys.executable, "-m", "ruff"]

BASE_FILES = {
    ".cookiecutter.json",
    ".dockerignore",
    ".editorconfig",
    ".pre-commit-config.yaml",
    ".github/dependabot.yml",
    "Dockerfile",
    "docker-compose.yml",
    ".env.example",
    ".github/workflows/ci.yml",
    ".gitignore",
    "LICENSE",
    "Makefile",
    "README.md",
    "data/bench_prompts.jsonl",
    "docs/architecture.md",
    "docs/benchmarks.md",
    "docs/http-api.md",
    "docs/operations.md",
    "docs/precision.md",
    "docs/requests.md",
    "docs/settings.md",
    "data/sample_prompts.jsonl",
    "pyproject.toml",
    "src/{pkg}/__init__.py",
    "src/{pkg}/__main__.py",
    "src/{pkg}/errors.py",
    "src/{pkg}/messages.py",
    "src/{pkg}/settings.py",
    "src/{pkg}/stats.py",
    "src/{pkg}/engine/__init__.py",
    "src/{pkg}/engine/backend.py",
    "src/{pkg}/engine/batching.py",
    "src/{pkg}/engine/continuous.py",
    "src/{pkg}/engine/hf.py",
    "src/{pkg}/engine/prompts.py",
    "src/{pkg}/engine/service.py",
    "src/{pkg}/engine/streaming.py",
    "src/{pkg}/lifecycle/__init__.py",
    "src/{pkg}/lifecycle/artifacts.py",
    "src/{pkg}/lifecycle/cache.py",
    "src/{pkg}/lifecycle/evalset/heldout.txt",
    "src/{pkg}/lifecycle/evalset/prompts.jsonl",
    "src/{pkg}/lifecycle/loading.py",
    "src/{pkg}/lifecycle/mlflow_server.py",
    "src/{pkg}/lifecycle/precision.py",
    "src/{pkg}/lifecycle/publish.py",
    "src/{pkg}/lifecycle/quality.py",
    "src/{pkg}/lifecycle/registry.py",
    "src/{pkg}/lifecycle/sources.py",
    "src/{pkg}/lifecycle/tracking.py",
    "src/{pkg}/lifecycle/wheels.py",
    "src/{pkg}/serving/__init__.py",
    "src/{pkg}/serving/batch_job.py",
    "src/{pkg}/serving/replies.py",
    "src/{pkg}/serving/queue/__init__.py",
    "src/{pkg}/serving/queue/client.py",
    "src/{pkg}/serving/queue/dead_letters.py",
    "src/{pkg}/serving/queue/generation.py",
    "src/{pkg}/serving/http/__init__.py",
    "src/{pkg}/serving/http/app.py",
    "src/{pkg}/serving/http/generation.py",
    "src/{pkg}/serving/http/metrics.py",
    "src/{pkg}/serving/http/openai_api.py",
    "src/{pkg}/serving/http/server.py",
    "src/{pkg}/serving/http/queue_gateway.py",
    "src/{pkg}/serving/queue/session.py",
    "src/{pkg}/serving/queue/submit.py",
    "src/{pkg}/serving/queue/topology.py",
    "src/{pkg}/serving/queue/worker.py",
    "src/{pkg}/bench/__init__.py",
    "src/{pkg}/bench/child.py",
    "src/{pkg}/bench/http_load.py",
    "src/{pkg}/bench/against.py",
    "src/{pkg}/engine/kv_cache.py",
    "src/{pkg}/engine/llama_step.py",
    "src/{pkg}/engine/packing.py",
    "src/{pkg}/engine/decode_attention.py",
    "src/{pkg}/engine/decode_attention.c",
    "src/{pkg}/engine/decode_step.py",
    "src/{pkg}/engine/decode_step.c",
    "src/{pkg}/engine/prefill.py",
    "src/{pkg}/engine/sampling.py",
    "src/{pkg}/engine/cores.py",
    "src/{pkg}/bench/modes.py",
    "src/{pkg}/bench/run.py",
    "src/{pkg}/cli/__init__.py",
    "src/{pkg}/cli/app.py",
    "src/{pkg}/cli/bench.py",
    "src/{pkg}/cli/models.py",
    "src/{pkg}/cli/serve.py",
    "src/{pkg}/cli/api.py",
    "src/{pkg}/cli/config.py",
    "src/{pkg}/py.typed",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/integration/__init__.py",
    "tests/integration/bench/__init__.py",
    "tests/integration/engine/__init__.py",
    "tests/integration/lifecycle/__init__.py",
    "tests/integration/serving/__init__.py",
    "tests/unit/engine/__init__.py",
    "tests/unit/lifecycle/__init__.py",
    "tests/unit/serving/__init__.py",
    "tests/integration/bench/test_bench.py",
    "tests/integration/engine/test_generation.py",
    "tests/integration/serving/test_jobs.py",
    "tests/integration/lifecycle/test_precision.py",
    "tests/integration/serving/test_queue.py",
    "tests/integration/serving/test_http.py",
    "tests/integration/serving/conftest.py",
    "tests/integration/lifecycle/test_tracking.py",
    "tests/unit/__init__.py",
    "tests/unit/chat_templates.py",
    "tests/unit/lifecycle/test_artifacts.py",
    "tests/unit/serving/test_replies.py",
    "tests/unit/serving/test_openai_api.py",
    "tests/unit/engine/test_batching.py",
    "tests/unit/engine/test_continuous.py",
    "tests/unit/engine/test_kv_cache.py",
    "tests/unit/engine/test_decode_attention.py",
    "tests/unit/engine/test_decode_step.py",
    "tests/unit/engine/test_cores.py",
    "tests/unit/bench/__init__.py",
    "tests/unit/bench/test_reports.py",
    "tests/unit/engine/test_streaming.py",
    "tests/unit/test_messages.py",
    "tests/unit/lifecycle/test_precision.py",
    "tests/unit/engine/test_prompts.py",
    "tests/unit/test_layers.py",
    "tests/unit/test_cli.py",
    "tests/unit/test_settings.py",
    "tests/unit/lifecycle/test_tracking.py",
    "tests/unit/lifecycle/test_wheels.py",
    "tests/unit/lifecycle/test_mlflow_server.py",
}


CTRANSLATE2_FILES = {
    "docs/ctranslate2.md",
    "scripts/README.md",
    "scripts/diagnose_int8.py",
    "src/{pkg}/engine/ct2.py",
    "src/{pkg}/engine/tokenizer.py",
    "src/{pkg}/engine/waves.py",
    "src/{pkg}/lifecycle/ct2_pyfunc.py",
    "src/{pkg}/lifecycle/quantize.py",
    "src/{pkg}/lifecycle/refusals.py",
    "tests/integration/lifecycle/test_ctranslate2.py",
    "tests/unit/engine/test_ct2.py",
    "tests/unit/engine/test_waves.py",
    "tests/unit/lifecycle/test_refusals.py",
}


FINETUNING_FILES = {
    "src/{pkg}/cli/finetune.py",
    "src/{pkg}/lifecycle/finetune/__init__.py",
    "src/{pkg}/lifecycle/finetune/data.py",
    "src/{pkg}/lifecycle/finetune/pipeline.py",
    "src/{pkg}/lifecycle/finetune/train.py",
    "data/finetune_sample.jsonl",
    "data/finetune_eval.jsonl",
    "tests/unit/lifecycle/test_finetune_data.py",
    "tests/integration/lifecycle/test_finetune.py",
}


def expected_files(combo: dict[str, str], package: str) -> set[str]:
    paths = set(BASE_FILES)
    if combo["inference_backend"] == "ctranslate2":
        paths |= CTRANSLATE2_FILES
    if combo["worker_runtime"] == "ray":
        paths |= {
            "src/{pkg}/serving/distributed.py",
            "tests/integration/serving/test_ray.py",
            "tests/unit/serving/test_distributed.py",
        }
    if combo["tracking_backend"] == "mysql":
        paths.add("tests/integration/lifecycle/test_tracking_mysql.py")
    if combo["artifact_store"] == "s3":
        paths.add("tests/integration/lifecycle/test_artifacts_s3.py")
    if combo["include_finetuning"] == "yes":
        paths |= FINETUNING_FILES
    return {path.format(pkg=package) for path in paths}


def files_of(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}


def run(
    command: list[str], project: Path, timeout: float = 900, **env: str
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=project, env=project_env(project) | env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(params=COMBINATIONS, ids=combo_id)
def project(request, bake) -> Path:
    return bake(request.param)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_the_bake_has_exactly_the_expected_files(combo, bake):
    project = bake(combo)
    assert files_of(project) == expected_files(combo, package_of(project))


def test_no_template_syntax_is_left_in_any_file(project):
    leftovers = []
    for path in project.rglob("*"):
        if path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if UNRENDERED.search(line):
                    leftovers.append(f"{path.relative_to(project)}:{number}: {line.strip()}")
    assert not leftovers, "\n".join(leftovers)


def test_ruff_check_and_format_pass(project):
    run([*RUFF, "check", "--no-cache", "."], project)
    run([*RUFF, "format", "--check", "--no-cache", "."], project)


CODE_COMBINATIONS = [
    dict(zip(CODE_AXES, values, strict=True)) for values in itertools.product(*CODE_AXES.values())
]


@pytest.mark.parametrize("names", [AWKWARD_NAMES, LONG_NAME], ids=["awkward", "longest"])
@pytest.mark.parametrize("code", CODE_COMBINATIONS, ids=combo_id)
def test_unusual_names_still_pass_ruff(names, code, bake, default_answers):
    project = bake(default_answers | names | code)
    run([*RUFF, "check", "--no-cache", "."], project)
    run([*RUFF, "format", "--check", "--no-cache", "."], project)


def test_docker_compose_runs_the_broker_with_a_healthcheck_and_the_worker(project):
    import yaml

    compose = yaml.safe_load((project / "docker-compose.yml").read_text())
    broker, worker = compose["services"]["rabbitmq"], compose["services"]["worker"]
    assert (
        "management" in broker["image"] and "rabbitmq-diagnostics" in broker["healthcheck"]["test"]
    )
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert worker["command"] == ["worker"]
    gateway = compose["services"]["gateway"]
    assert gateway["command"][:2] == ["serve", "--via-queue"]
    assert "/ready" in gateway["healthcheck"]["test"][-1]
    assert gateway["ports"] == ["127.0.0.1:8000:8000"] and gateway["build"] == worker["build"]
    dockerfile = (project / "Dockerfile").read_text()
    assert f'ENTRYPOINT ["{project.name}"]' in dockerfile


def test_docker_compose_has_the_mlflow_server_and_the_stores_the_options_ask_for(project):
    import json

    import yaml

    answers = json.loads((project / ".cookiecutter.json").read_text())
    services = yaml.safe_load((project / "docker-compose.yml").read_text())["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"][0] == "mlflow-server"
    assert "/health" in mlflow["healthcheck"]["test"][-1]
    environment = " ".join(f"{k}={v}" for k, v in mlflow["environment"].items())
    stores = {
        "mysql": answers["tracking_backend"] == "mysql",
        "s3": answers["artifact_store"] == "s3",
    }
    for store, wanted in stores.items():
        assert (store in services) == wanted, f"{store} service: expected {wanted}"
        if wanted:
            assert services[store]["healthcheck"]["test"]
            assert mlflow["depends_on"][store]["condition"] == "service_healthy"
    assert ("mysql+pymysql://" in environment) == stores["mysql"]
    assert ("MLFLOW_S3_ENDPOINT_URL=http://s3:8333" in environment) == stores["s3"]


def test_the_rendered_unit_tests_pass(project, unit_tests):
    """Run once per distinct test inputs (see conftest.unit_tests): a bake that only changes,
    say, the license reuses its twin's run."""
    returncode, output = unit_tests(project)
    assert returncode == 0, output[-4000:]
    assert " passed" in output and " failed" not in output and "skipped" not in output, output


def test_awkward_names_are_rendered_safely(bake, default_answers):
    project = bake(default_answers | AWKWARD_NAMES)
    assert project.name == "unicode-llm-bot-2"
    assert package_of(project) == "unicode_llm_bot_2"
    import tomllib

    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert meta["authors"][0]["name"] == AWKWARD_NAMES["author_name"]
    assert meta["description"] == AWKWARD_NAMES["description"]
    assert meta["scripts"] == {"unicode-llm-bot-2": "unicode_llm_bot_2.cli:main"}


def test_the_answers_are_recorded_for_re_rendering(bake, default_answers):
    import json

    project = bake(default_answers)
    recorded = json.loads((project / ".cookiecutter.json").read_text())
    assert recorded["project_slug"] == "llm-service"
    assert recorded["model_id"] == "bundled:SmolLM2-135M-Instruct"
    assert "_output_dir" not in recorded


@pytest.mark.parametrize(
    ("license", "first_line"),
    [
        ("MIT", "MIT License"),
        ("Apache-2.0", "Apache License"),
        ("BSD-3-Clause", "BSD 3-Clause License"),
        ("Proprietary", "Copyright (c) "),
    ],
)
def test_the_license_answer_is_the_license_file_and_the_package_metadata(
    license, first_line, bake, default_answers
):
    import datetime
    import tomllib

    project = bake(default_answers | AWKWARD_NAMES | {"license": license})
    text = (project / "LICENSE").read_text()
    assert text.strip().startswith(first_line) and "{" not in text
    year = str(datetime.datetime.now(datetime.UTC).year)
    assert (
        license == "Apache-2.0"
        or f"{year}{',' if license.startswith('BSD') else ''} " + (AWKWARD_NAMES["author_name"])
        in text
    )
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert meta["license"] == (license if license != "Proprietary" else "LicenseRef-Proprietary")
    assert meta["license-files"] == ["LICENSE"]
    assert ("Private :: Do Not Upload" in meta.get("classifiers", [])) == (license == "Proprietary")


def test_the_model_answer_becomes_the_default_setting(bake, default_answers):
    project = bake(default_answers | {"model_id": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"})
    settings = (project / "src" / package_of(project) / "settings.py").read_text()
    assert 'DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"' in settings


# Answers that would be code, shell or markup if pasted raw into a file. (Jinja markers are not
# among them: cookiecutter renders answers as templates before any hook sees them.)
HOSTILE_ANSWERS = {
    "project_name": "Evil \"\"\" ''' $(touch PWNED) `touch PWNED` \\ name",
    "author_name": '"; import os; os.system("touch PWNED") #',
    "description": '"""; __import__(\'os\').system(\'touch PWNED\'); """ \\',
    "model_id": "./models/a+b@v1",
}


def test_hostile_answers_are_rendered_as_literals_and_never_run(bake, default_answers, tmp_path):
    import tomllib

    project = bake(default_answers | HOSTILE_ANSWERS)
    package = package_of(project)
    run([*RUFF, "check", "--no-cache", "."], project)
    check = (
        f"from {package}.settings import DEFAULT_MODEL; import {package}.cli; print(DEFAULT_MODEL)"
    )
    result = run([sys.executable, "-c", check], project)
    assert result.stdout.strip() == HOSTILE_ANSWERS["model_id"]
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert meta["description"] == HOSTILE_ANSWERS["description"]
    assert meta["authors"][0]["name"] == HOSTILE_ANSWERS["author_name"]
    assert not list(project.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()


def test_the_docker_build_context_leaves_out_models_secrets_and_history(project):
    ignored = set((project / ".dockerignore").read_text().split())
    assert {".git", ".env", ".venv", "mlruns", "mlartifacts", "out"} <= ignored
