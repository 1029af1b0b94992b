"""`mlflow-server` stops the whole server it started: `mlflow server` runs uvicorn as a child,
which outlived it (and held the port) when only `mlflow` was signalled."""

import os
import subprocess
import sys
import time

import pytest

from {{ cookiecutter.package_name }}.lifecycle.mlflow_server import stop_group

# A parent with a child of its own, like `mlflow server` and its uvicorn; `stubborn` ignores
# SIGTERM, as a server stuck in a graceful shutdown would.
FAMILY = """
import signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen(["sleep", "300"])
print("ready", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("kind", ["polite", "stubborn"])
def test_the_whole_group_is_gone_when_stop_returns(kind):
    child = subprocess.Popen(
        [sys.executable, "-c", FAMILY, kind], start_new_session=True, stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"  # both are up
    started = time.monotonic()
    stop_group(child, grace_s=0.5)
    assert time.monotonic() - started < 4.0
    with pytest.raises(ProcessLookupError):
        os.killpg(child.pid, 0)
