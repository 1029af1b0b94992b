"""Ray replicas of the worker and the batch job: a real local Ray instance, the real broker."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.settings import ENV_PREFIX

from .test_queue import Collector, numbered

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path) -> Path:
    """A fresh HOME: Ray must leave nothing in the user's home."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def start_replicas(prefix: str, home: Path, log: Path, count: int) -> subprocess.Popen:
    env = {**os.environ, "HOME": str(home), f"{ENV_PREFIX}QUEUE_PREFIX": prefix}
    env |= {f"{ENV_PREFIX}MAX_BATCH_SIZE": "8", f"{ENV_PREFIX}RAY_NUM_CPUS": str(count)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "worker"]
    process = subprocess.Popen(
        [*command, "--replicas", str(count)],
        cwd=PROJECT_ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for(log, process, r"consuming", count)
    return process


def wait_for(log: Path, process: subprocess.Popen, pattern: str, count: int = 1) -> None:
    deadline = time.monotonic() + 300
    while len(re.findall(pattern, log.read_text(errors="replace"))) < count:
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)


def replica_pids(log: Path) -> dict[int, int]:
    """Replica index -> its latest process id, from the replicas' "ready" lines."""
    found = re.findall(r"replica (\d+) ready \(pid (\d+)\)", log.read_text(errors="replace"))
    return {int(index): int(pid) for index, pid in found}


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=300)


def test_two_replicas_answer_every_request_once_and_leave_home_clean(
    broker, prefix, home, tmp_path
):
    log = tmp_path / "driver.log"
    driver = start_replicas(prefix, home, log, 2)
    collector = Collector(broker, prefix, numbered(60, max_new_tokens=16)).start()
    collector.join()
    collector.assert_each_answered_once()
    assert stop(driver) == 0
    text = log.read_text()
    served = [int(n) for n in re.findall(r"replica \d: \{'served': (\d+)", text)]
    assert len(served) == 2 and sum(served) == 60
    assert all(n > 0 for n in served), f"one replica did all the work: {served}"
    assert list(home.iterdir()) == [], "Ray wrote into the user's home"


def test_a_killed_replica_is_restarted_and_no_request_is_lost(broker, prefix, home, tmp_path):
    log = tmp_path / "driver.log"
    driver = start_replicas(prefix, home, log, 2)
    collector = Collector(broker, prefix, numbered(48, max_new_tokens=24)).start()
    collector.wait_for_replies(8)
    victim = replica_pids(log)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(log, driver, r"replica 0 ready", 2)  # Ray started it again
    assert replica_pids(log)[0] != victim
    collector.join()
    collector.assert_each_answered_once()
    assert stop(driver) == 0


def test_the_batch_job_on_ray_equals_the_plain_one_in_order(tmp_path, home, model_dir):
    env = {**os.environ, "HOME": str(home), f"{ENV_PREFIX}RAY_NUM_CPUS": "2"}
    env.pop("RAY_ADDRESS", None)
    outputs = {}
    for name, extra in {"plain": [], "ray": ["--replicas", "2"]}.items():
        out = tmp_path / f"{name}.jsonl"
        command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "batch"]
        result = subprocess.run(
            [*command, "data/sample_prompts.jsonl", str(out), *extra],
            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        assert "inputs/s" in result.stdout
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [
        (p["id"], p["text"], r["id"], r["text"]) for p, r in zip(*outputs.values(), strict=True)
    ]
    assert all(pid == rid and ptext == rtext for pid, ptext, rid, rtext in pairs)
    assert list(home.iterdir()) == []
