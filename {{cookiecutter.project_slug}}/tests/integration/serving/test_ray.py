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

from {{ cookiecutter.package_name }}.settings import ENV_PREFIX, load_settings

from .test_queue import Collector, numbered

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]
PROJECT_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def home(tmp_path) -> Path:
    """A fresh HOME, over 90 characters long: Ray must leave nothing in the user's home, and
    its socket paths must fit whatever the home's length."""
    path = tmp_path / "home"
    path = path.with_name(path.name + "-" + "h" * max(0, 92 - len(str(path))))
    path.mkdir()
    assert len(str(path)) >= 90
    return path


def ray_env(home: Path, **settings: object) -> dict[str, str]:
    """The environment of a command run with `home` as HOME; the model cache stays where it
    is (a fresh home would fetch the model again)."""
    env = {**os.environ, "HOME": str(home)}
    env[f"{ENV_PREFIX}CACHE_DIR"] = str(load_settings().cache_dir.expanduser().resolve())
    env |= {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in settings.items()}
    env.pop("RAY_ADDRESS", None)
    return env


def start_replicas(
    prefix: str, home: Path, log: Path, count: int, **settings: object
) -> subprocess.Popen:
    env = ray_env(home, queue_prefix=prefix, max_batch_size=8, ray_num_cpus=count, **settings)
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
    # A fresh SQLite tracking store: created once, before both replicas open their runs.
    driver = start_replicas(prefix, home, log, 2, tracking_dir=tmp_path / "fresh-mlruns")
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


def test_replicas_that_cannot_be_placed_fail_in_one_line(prefix, home, tmp_path):
    env = ray_env(home, queue_prefix=prefix, ray_num_cpus=2, ray_start_timeout_s=15)
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "worker"]
    result = subprocess.run(
        [*command, "--replicas", "3"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 replicas asking for 1 CPU") and "did not start" in last
    assert "of 2 CPUs" in last


def test_the_batch_job_on_ray_equals_the_plain_one_in_order(tmp_path, home, model_dir):
    env = ray_env(home, ray_num_cpus=2)
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
