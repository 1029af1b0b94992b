"""Shared fixtures: one real model for the whole session, loaded only by integration tests."""

import os
import tempfile
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.settings import ENV_PREFIX, Settings, load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Tests track into a store of their own: never the project's mlruns/, never a server that the
# shell's MLFLOW_TRACKING_URI names. Child processes inherit this.
for _name in ("MLFLOW_TRACKING_URI", f"{ENV_PREFIX}TRACKING_URI"):
    os.environ.pop(_name, None)
os.environ[f"{ENV_PREFIX}TRACKING_DIR"] = tempfile.mkdtemp(prefix="mlruns-test-")
# The tests compare texts exactly (batched against one at a time, worker against job): float32,
# whose padded batches match one at a time, not `auto` (bfloat16 on a CPU with the
# instructions). tests/integration/lifecycle/test_precision.py tests `auto` itself.
os.environ[f"{ENV_PREFIX}DTYPE"] = "float32"

NO_BF16 = "this CPU has no bfloat16 instructions: `auto` is float32 here, with no gate"
NO_AVX512 = "this CPU has no AVX-512: decode attention in bfloat16 is SDPA's here"
NO_AVX512_BF16 = "this CPU has no AVX-512 BF16: a decode step in bfloat16 is torch's calls here"
# A hardware marker: why it is deselected
ABSENT = {"bf16_cpu": NO_BF16, "avx512_cpu": NO_AVX512, "avx512_bf16_cpu": NO_AVX512_BF16}
DESELECTED = pytest.StashKey[dict[str, int]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the bf16_cpu (avx512_cpu, avx512_bf16_cpu) tests on a CPU without bfloat16
    instructions (AVX-512, AVX-512 BF16), and say so.

    Deselected, not skipped: the hardware is absent, not something the test needs installed,
    and under CI=true a skip means a missing service (see `broker`).
    """
    from {{ cookiecutter.package_name }}.lifecycle.precision import cpu_flags, cpu_has_bf16

    flags = cpu_flags()
    present = {
        "bf16_cpu": cpu_has_bf16(flags),
        "avx512_cpu": "avx512f" in flags,
        "avx512_bf16_cpu": "avx512_bf16" in flags,
    }
    counts: dict[str, int] = {}
    for marker, here in present.items():
        absent = [item for item in items if item.get_closest_marker(marker)]
        if absent and not here:
            config.hook.pytest_deselected(items=absent)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]
            counts[marker] = len(absent)
    config.stash[DESELECTED] = counts


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    for marker, count in config.stash.get(DESELECTED, {}).items():
        terminalreporter.write_line(f"deselected {count} {marker} tests: {ABSENT[marker]}")


@pytest.fixture(scope="session")
def settings() -> Settings:
    # Generation tests compare outputs: the defaults must not sample.
    return load_settings(temperature=0.0, system_prompt=None)


@pytest.fixture(scope="session")
def model_dir(settings: Settings) -> Path:
    from {{ cookiecutter.package_name }}.lifecycle.sources import resolve_for

    return resolve_for(settings)


@pytest.fixture(scope="session")
def backend(settings: Settings, model_dir: Path):
    from {{ cookiecutter.package_name }}.lifecycle.loading import load_backend

    return load_backend(settings)


@pytest.fixture(scope="session")
def service(settings: Settings, backend):
    from {{ cookiecutter.package_name }}.engine.service import InferenceService

    return InferenceService.from_settings(settings, backend)


@pytest.fixture(scope="session")
def broker(settings: Settings) -> str:
    """The RabbitMQ URL, if the broker answers; else skip (or fail under CI=true)."""
    import pika
    from pika.exceptions import AMQPError

    from {{ cookiecutter.package_name }}.serving.queue.topology import (
        connection_parameters,
    )
    from {{ cookiecutter.package_name }}.settings import redact_url

    try:
        pika.BlockingConnection(connection_parameters(settings.rabbitmq_url, 30)).close()
    except (AMQPError, OSError) as exc:
        message = (
            f"RabbitMQ is unreachable at {redact_url(settings.rabbitmq_url)} "
            f"({type(exc).__name__}); start it with `docker compose up -d rabbitmq`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return settings.rabbitmq_url


@pytest.fixture
def prefix(broker: str):
    """A queue prefix of this test's own; its queues are deleted afterwards."""
    import uuid

    import pika

    from {{ cookiecutter.package_name }}.serving.queue.topology import Names, delete

    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    delete(connection.channel(), Names(name))
    connection.close()


def interrupt_halfway(
    command: list[str], out: Path, env: dict[str, str], sig: int, after: int = 8
) -> tuple[int, str, dict]:
    """Run a job writing replies to `out`; send it `sig` once `after` replies are written.

    Returns its exit status, its stderr and the replies it left (by id): a valid JSONL prefix,
    or json.loads fails the test. The job must stop within 30 s of the signal.
    """
    import json
    import subprocess
    import time

    job = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not out.is_file() or len(out.read_text().splitlines()) < after:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.05)
    job.send_signal(sig)
    _, stderr = job.communicate(timeout=30)
    left = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return job.returncode, stderr, left


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process, log_path: Path, timeout_s: float = 120.0) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it dies or times out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"the server exited ({process.returncode}):\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} in {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """start(env) -> the URI of a real `mlflow-server` (this project's command) on a free port.

    `env` sets its stores (backend store URI, artifacts destination, S3 endpoint and keys);
    by default SQLite and artifacts under tmp_path, whatever the rendered defaults are. Every
    server is stopped afterwards.
    """
    import signal
    import subprocess
    import sys

    started = []

    def start(env: dict[str, str] | None = None) -> str:
        port = free_port()
        log_path = tmp_path / f"mlflow-server-{port}.log"
        server_env = {
            **os.environ,
            f"{ENV_PREFIX}TRACKING_DIR": str(tmp_path / f"server-{port}"),
            f"{ENV_PREFIX}MLFLOW_PORT": str(port),
            # SQLite and a folder unless the test names other stores, whatever the defaults.
            f"{ENV_PREFIX}MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/server-{port}.db",
            f"{ENV_PREFIX}MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / f"artifacts-{port}"),
            **(env or {}),
        }
        package = "{{ cookiecutter.package_name }}"
        command = [sys.executable, "-m", package, "mlflow-server"]
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                command, env=server_env, stdout=log_file, stderr=subprocess.STDOUT
            )
        started.append((process, log_path))
        uri = f"http://127.0.0.1:{port}"
        wait_for_http(f"{uri}/health", process, log_path)
        return uri

    yield start
    for process, _ in started:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
