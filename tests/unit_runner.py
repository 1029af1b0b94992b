"""A fork server for the bakes' unit test runs: one process imports the heavy libraries every
bake shares (torch, transformers, hypothesis: most of a unit run's 15-20 s is their import),
then forks a child per run, which runs pytest in the bake as `python -m pytest` would there.

Each child starts from the same clean parent, which has run nothing (its libraries' thread
pools, OpenBLAS's included, are fork-safe), so runs cannot leak into one another; only the
shared environment's modules are imported before the fork, never a bake's. The environment
those libraries read as they load is the server's: the same as a run's but for PYTHONPATH and
the bake's cache variable (conftest.UnitRunner), which are read later.
The cold path (a fresh interpreter per project) is still what `make test` runs in the two full
suites (tests/test_install.py, tests/test_workflow.py).

Protocol, one JSON object per line: stdin {"cwd", "env", "args", "log"} -> stdout {"rc"}.
"""

import json
import os
import sys

# Imported before any fork: what the bakes' unit tests import (see the module docstring), the
# lazily loaded parts included (sympy through torch, transformers' tokenizer classes, typer's
# help), measured as a default and a fullest run's new modules. Each leaves the process with
# the one native thread torch's import starts; transformers.modeling_utils would add one more,
# so the models' modules are left to the runs.
SHARED = ("pytest", "hypothesis", "torch", "transformers", "accelerate", "safetensors", "scipy",
          "pydantic_settings", "typer", "rich", "pika", "boto3", "sympy", "tokenizers",
          "transformers.models.auto.tokenization_auto",
          "transformers.tokenization_utils_tokenizers", "ray", "ctranslate2", "requests",
          "markdown_it", "google.protobuf", "anyio", "PIL", "psutil", "jsonschema",
          "rich.console", "typer.rich_utils")  # fmt: skip


def run_in_child(cwd: str, env: dict[str, str], args: list[str], log: str) -> int:
    """Fork; the child runs pytest in `cwd` with `env`, its output to `log`. Its exit status."""
    pid = os.fork()
    if pid == 0:  # the child never returns: whatever happens, it exits here
        code = 70
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # stdin is the server's protocol
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            # As `python -m pytest` with PYTHONPATH would: the working directory, then PYTHONPATH.
            entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[:0] = [cwd, *entries]
            import pytest

            code = int(pytest.main(args))
        except BaseException as exc:  # reported in the log, then the exit status
            print(f"unit_runner: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            import atexit

            atexit._run_exitfuncs()  # as a normal exit would (pytest unlocks its temp dir)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main() -> None:
    sys.path.pop(0)  # this script's folder (the template's tests): a bake's run must not see it
    path = list(sys.path)
    for name in SHARED:
        try:
            __import__(name)
        except ImportError:  # not in this environment: the run imports what it needs itself
            pass
    sys.path[:] = path  # as it was: ray puts its vendored packages first
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        rc = run_in_child(request["cwd"], request["env"], request["args"], request["log"])
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    main()
