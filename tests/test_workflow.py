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

import os
import shutil
import socket
import subprocess
from pathlib import Path

import yaml

from combinations import AWKWARD_NAMES, FULLEST
from conftest import MODEL_CACHE, assert_all_ran, parallel_env

BAKE = FULLEST | AWKWARD_NAMES


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
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env |= {k: str(v) for k, v in job["env"].items()} | {"HOME": str(home)}
    env["TORCH_INDEX_URL"] = ""  # this machine's torch wheel (see the module docstring)
    env["PIP_CACHE_DIR"] = str(Path.home() / ".cache" / "pip")  # setup-python's `cache: pip`
    env |= parallel_env(source)
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
        else:
            raise AssertionError(f"a step this test does not know how to run: {step}")
    assert outputs.keys() == {"make lint", "make test"}
    assert "Success: no issues found" in outputs["make lint"]
    assert_all_ran(outputs["make test"])
