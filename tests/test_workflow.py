"""The fullest bake's own GitHub workflow, run here step by step: its first push is green.

Each step of `.github/workflows/ci.yml` is carried out as GitHub would: `actions/checkout` is
a fresh copy of the bake, `actions/setup-python` the interpreter of the version it names,
`actions/cache` a hit on the shared model cache, and every `run:` step runs in bash with the
job's environment (CI=true: a missing service fails, never skips). The job's service containers
are this machine's RabbitMQ and MariaDB, on the ports the job maps. The one difference: torch
comes from this machine's wheel, not from download.pytorch.org, which is unreachable here.

This bake (CTranslate2, Ray, an MLflow server on MySQL with S3 artifacts, names with unicode
and quotes) is where every non-default option's integration tests run: the real model, the
real broker, a real local Ray, real `mlflow server`s on MariaDB and on a local S3 server.
"""

import fnmatch
import os
import shutil
import socket
import subprocess
from pathlib import Path

import yaml

from combinations import AWKWARD_NAMES, DEFAULTS, FULLEST
from conftest import (
    MODEL_CACHE,
    assert_all_ran,
    keep_suite_log,
    mypy_cache,
    package_of,
    suite_env,
)

BAKE = FULLEST | AWKWARD_NAMES
QUEUE_TESTS = "tests/integration/serving/test_queue.py::"
HTTP_TESTS = "tests/integration/serving/test_http.py::"
FINETUNE_TESTS = "tests/integration/lifecycle/test_finetune.py::"
# What the default bake's install test (tests/test_install.py) runs, left out here (pytest's
# --deselect takes node id prefixes). Two kinds:
# - tests pinned to the transformers engine (the HTTP tests' transformers server, the queue's
#   continuous variants, LoRA training itself), whose code is the same in both bakes;
# - the queue tests of the client and of how the worker takes signals, its delivery limit
#   and a broker restart. Here they would run on CTranslate2, there on transformers; what they
#   test is the queue's code, the same in both. The CTranslate2 engine under the worker is
#   tested here by the rest of test_queue.py (volume, a kill, hostile messages, SIGTERM, a dead
#   generation thread and heartbeats on static batches, the gateway), the whole finetune
#   command (conversion included) by test_finetune.py.
# SAME_CODE: the files those tests exercise that must stay the same for this to hold.
SHARED_WITH_DEFAULT = [
    *(QUEUE_TESTS + name for name in (
        "test_a_dead_generation_thread_ends_the_worker_and_its_requests_are_redelivered[continuous]",
        "test_generation_longer_than_three_heartbeats_keeps_the_connection[continuous]",
        "test_sigterm_finishes_the_requests_in_hand_and_requeues_the_rest[continuous]",
        "test_a_message_that_kills_workers_is_dead_lettered_after_the_delivery_limit",
        "test_a_second_sigterm_exits_at_once_and_loses_nothing",
        "test_the_worker_and_client_reconnect_after_a_broker_restart",
        "test_an_interrupted_submit_resumes_with_every_id_exactly_once",
        "test_submit_writes_every_reply_in_input_order",
        "test_submit_waits_out_a_full_queue_then_says_so",
    )),
    *(f"{HTTP_TESTS}{name}[transformers" for name in (
        "test_ready_is_503_while_the_model_loads_then_200",
        "test_the_openai_client_chats_streams_completes_and_lists",
        "test_a_bad_request_is_a_bad_request_error",
        "test_concurrent_streams_keep_their_own_limits",
        "test_an_unknown_model_is_404",
        "test_the_sse_stream_is_framed_as_openai_frames_it",
        "test_tokens_are_streamed_as_they_are_decoded",
        "test_a_client_that_leaves_stops_its_request_and_not_the_others",
        "test_metrics_parse_and_count_a_known_set_of_requests",
        "test_bench_loads_the_server_closed_and_open_loop",
    )),
    *(FINETUNE_TESTS + name for name in (
        "test_the_question_is_not_in_the_training_data_and_the_base_model_gets_it_wrong",
        "test_a_run_is_reproducible_and_a_far_too_high_learning_rate_does_not_improve",
    )),
]  # fmt: skip
SAME_CODE = ["tests/integration/serving/test_queue.py", "src/PKG/serving/queue/*.py",
             "src/PKG/serving/http/*.py", "src/PKG/engine/hf.py", "src/PKG/engine/continuous.py",
             "src/PKG/engine/service.py", "src/PKG/engine/streaming.py",
             "src/PKG/lifecycle/finetune/train.py",
             "src/PKG/lifecycle/finetune/data.py"]  # fmt: skip


def code_of(project: Path) -> dict[str, str]:
    """SAME_CODE's files of a bake, its package and slug replaced by placeholders."""
    package = package_of(project)
    slug = project.name
    return {
        str(path.relative_to(project)).replace(package, "PKG"): path.read_text()
        .replace(package, "PKG")
        .replace(slug, "SLUG")
        for pattern in SAME_CODE
        for path in sorted(project.glob(pattern.replace("PKG", package)))
    }


def test_what_the_workflow_run_leaves_to_the_default_bake_is_the_same_code_there(bake):
    fullest, default = code_of(bake(BAKE)), code_of(bake(DEFAULTS))
    for pattern in SAME_CODE:  # each names files that exist
        assert any(fnmatch.fnmatch(name, pattern) for name in fullest), pattern
    assert fullest == default
    for node in SHARED_WITH_DEFAULT:  # each names a test of both bakes
        path, name = node.split("::")
        for project in (bake(BAKE), bake(DEFAULTS)):
            assert f"def {name.split('[')[0]}(" in (project / path).read_text(), node


def reachable(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_fullest_bakes_workflow_passes_here_step_by_step(bake, tmp_path):
    source = bake(BAKE)
    job = yaml.safe_load((source / ".github/workflows/ci.yml").read_text())["jobs"]["test"]
    for name, service in job["services"].items():
        port = int(str(service["ports"][0]).split(":")[0])
        assert reachable(port), f"the job's {name} service: nothing listens on 127.0.0.1:{port}"

    # A fresh HOME of 90+ characters: Ray's socket paths must fit whatever the home's length.
    home = tmp_path / ("home-" + "h" * max(0, 92 - len(str(tmp_path))))
    home.mkdir()
    env = suite_env(source, *(f"--deselect={node}" for node in SHARED_WITH_DEFAULT))
    env |= {k: str(v) for k, v in job["env"].items()} | {"HOME": str(home)}
    env["TORCH_INDEX_URL"] = ""  # this machine's torch wheel (see the module docstring)
    env["PIP_CACHE_DIR"] = str(Path.home() / ".cache" / "pip")  # setup-python's `cache: pip`
    # Not a step of the workflow: mypy's cache, kept as the model is (conftest.MYPY_CACHE).
    env["MYPY_CACHE_DIR"] = str(mypy_cache(tmp_path / "mypy-cache"))
    checkout = tmp_path / "checkout"
    outputs: dict[str, str] = {}
    for step in job["steps"]:
        uses = step.get("uses", "").split("@")[0]
        if uses == "actions/checkout":
            shutil.copytree(source, checkout)
        elif uses == "actions/setup-python":
            version = step["with"]["python-version"]
            python = shutil.which(f"python{version}")
            assert python, f"no python{version} on this machine"
            env["PATH"] = f"{Path(python).parent}{os.pathsep}{env['PATH']}"
        elif uses == "actions/cache":
            cached = Path(step["with"]["path"].replace("~", str(home), 1))
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.symlink_to(MODEL_CACHE, target_is_directory=True)  # a cache hit
        elif "run" in step:
            result = subprocess.run(
                ["bash", "-eo", "pipefail", "-c", step["run"]], cwd=checkout, env=env,
                capture_output=True, text=True, timeout=3000,
            )  # fmt: skip
            output = f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
            assert result.returncode == 0, f"step {step.get('name', step['run'])!r}:\n{output}"
            outputs[step["run"]] = result.stdout
            keep_suite_log(f"fullest-bake-{step['run'].replace(' ', '-')}", result.stdout)
        else:
            raise AssertionError(f"a step this test does not know how to run: {step}")
    assert outputs.keys() == {"make lint", "make test"}
    assert "Success: no issues found" in outputs["make lint"]
    assert_all_ran(outputs["make test"])
