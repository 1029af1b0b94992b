"""Bakes are made once per combination and shared by the checks that read them."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from combinations import DEFAULTS

TEMPLATE = Path(__file__).resolve().parents[1]
# One model cache for every bake: the bundled model is fetched and converted once.
MODEL_CACHE = Path(
    os.environ.get("LLMT_CACHE", Path.home() / ".cache" / "llm-service-template")
).expanduser()


@pytest.fixture(scope="session")
def bake(cookies_session):
    """bake(answers) -> Path of the rendered project, baked once per distinct answers."""
    made: dict[tuple, Path] = {}

    def _bake(answers: dict[str, str]) -> Path:
        key = tuple(sorted(answers.items()))
        if key not in made:
            result = cookies_session.bake(extra_context=answers)
            assert result.exception is None, f"{answers}: {result.exception}"
            assert result.exit_code == 0
            made[key] = Path(result.project_path)
        return made[key]

    return _bake


@pytest.fixture(scope="session")
def default_answers() -> dict[str, str]:
    return dict(DEFAULTS)


def project_env(project: Path) -> dict[str, str]:
    """Environment to run a bake's code in the shared test environment, without installing it."""
    package = package_of(project)
    return {
        **os.environ,
        "PYTHONPATH": str(project / "src"),
        f"{package.upper()}_CACHE_DIR": str(MODEL_CACHE),
        "HF_HUB_OFFLINE": "1",
    }


def inputs_digest(project: Path) -> str:
    """A digest of everything a bake's unit tests read when run from the shared environment:
    its code, tests and data, and its pytest settings. Bakes that differ only in a value these
    do not hold (the Python version, the license) have the same digest."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for d in ("src", "tests", "data") for p in (project / d).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes())
    pyproject = (project / "pyproject.toml").read_text()
    digest.update(
        pyproject[pyproject.index("[tool.pytest.ini_options]") :].split("\n[", 1)[0].encode()
    )
    return digest.hexdigest()


# A rendered unit run as `python -m pytest` there. Plugins the fork server imported early
# (hypothesis, anyio) cannot have their asserts rewritten: pytest's warning about it is noise.
UNIT_ARGS = ["-q", "-p", "no:cacheprovider", "-m", "not integration",
             "-W", "ignore::pytest.PytestAssertRewriteWarning", "tests/unit"]  # fmt: skip


class UnitRunner:
    """The client of tests/unit_runner.py, the fork server: one per xdist worker."""

    def __init__(self) -> None:
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
        # No OMP_NUM_THREADS=1 here: measured, it made a forked fullest run 77 s instead of 13.
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("unit_runner.py"))], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        self.reply(timeout=300)

    def reply(self, timeout: float) -> dict:
        import json
        import select

        assert self.process.stdout and self.process.stdin
        if not select.select([self.process.stdout], [], [], timeout)[0]:
            self.close()
            raise AssertionError(f"the unit test fork server gave no answer in {timeout} s")
        line = self.process.stdout.readline()
        assert line, f"the unit test fork server died (exit status {self.process.wait()})"
        return json.loads(line)

    def run(self, project: Path, log: Path) -> int:
        import json

        assert self.process.stdin
        request = {"cwd": str(project), "env": project_env(project), "args": UNIT_ARGS,
                   "log": str(log)}  # fmt: skip
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return int(self.reply(timeout=900)["rc"])

    def close(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="session")
def unit_tests(tmp_path_factory):
    """unit_tests(project) -> (exit status, output) of the bake's unit tests: run once per
    distinct inputs_digest, across xdist workers too, in a fork server (tests/unit_runner.py)
    that has the shared environment's heavy libraries imported already."""
    import json

    from filelock import FileLock  # a dependency of torch, which the environment holds first

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's
    runner: UnitRunner | None = None

    def _run(project: Path) -> tuple[int, str]:
        nonlocal runner
        result = shared / f"unit-{inputs_digest(project)[:20]}.json"
        with FileLock(f"{result}.lock"):
            if not result.is_file():
                log = result.with_suffix(".log")
                try:
                    runner = runner or UnitRunner()
                    returncode = runner.run(project, log)
                except (AssertionError, OSError) as exc:  # the next run gets a new server
                    if runner is not None:
                        runner.close()
                    runner = None
                    tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
                    raise AssertionError(f"{exc}\n{tail}") from None
                output = log.read_text(errors="replace")
                result.write_text(json.dumps({"rc": returncode, "output": output}))
            answer = json.loads(result.read_text())
        return answer["rc"], answer["output"]

    yield _run
    if runner is not None:
        runner.close()


# mypy's incremental cache, kept between runs as pip's is (a CI keeps it with its cache
# action): every bake checks the same torch, transformers and mlflow, 40 of a cold run's 42 s
# (measured). Each run works on a copy of its own, as mypy's SQLite cache is not for processes
# that write it at once; the template's own mypy runs put theirs back for the next ones.
MYPY_CACHE = MODEL_CACHE / "mypy-cache"


def intact(cache: Path) -> bool:
    """Every SQLite file of a mypy cache passes SQLite's quick check (mypy stops with an
    internal error on a damaged one, and would on every later run)."""
    import contextlib
    import sqlite3

    for db in cache.rglob("*.db"):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                if conn.execute("PRAGMA quick_check").fetchone() != ("ok",):
                    return False
        except sqlite3.DatabaseError:
            return False
    return True


def mypy_cache(private: Path) -> Path:
    """`private`, holding a copy of the kept mypy cache if there is one and it is intact (a
    damaged one is dropped): a run's cache dir."""
    import shutil

    from filelock import FileLock

    with FileLock(f"{MYPY_CACHE}.lock"):
        if MYPY_CACHE.is_dir() and not intact(MYPY_CACHE):
            shutil.rmtree(MYPY_CACHE)
        if MYPY_CACHE.is_dir():
            shutil.copytree(MYPY_CACHE, private, dirs_exist_ok=True)
    private.mkdir(parents=True, exist_ok=True)
    return private


def keep_mypy_cache(private: Path) -> None:
    """Make the cache of a run that passed, `private`, the kept one."""
    import shutil

    from filelock import FileLock

    with FileLock(f"{MYPY_CACHE}.lock"):
        staged = MYPY_CACHE.with_name(f"{MYPY_CACHE.name}.{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(private, staged)
        shutil.rmtree(MYPY_CACHE, ignore_errors=True)
        staged.rename(MYPY_CACHE)


def package_of(project: Path) -> str:
    (package,) = [p.name for p in (project / "src").iterdir() if p.is_dir()]
    return package


def cpu_flags() -> set[str]:
    """This machine's CPU flags, as /proc/cpuinfo lists them (none where it cannot be read)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_bf16() -> bool:
    """This machine's CPU has bfloat16 instructions (the rendered `precision` module's oracle)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())


def cpu_has_avx512() -> bool:
    """This machine's CPU has AVX-512 (the rendered decode attention kernel's condition)."""
    return "avx512f" in cpu_flags()


def cpu_has_avx512_bf16() -> bool:
    """This machine's CPU has AVX-512 BF16 (the rendered fused decode step's condition)."""
    return "avx512_bf16" in cpu_flags()


def assert_all_ran(output: str) -> None:
    """A rendered test run: passed, nothing failed or skipped, and the tests that need absent
    hardware deselected with their reason printed (exactly when the hardware is absent)."""
    assert " passed" in output and " failed" not in output, output[-3000:]
    assert "skipped" not in output, output[-3000:]
    said = "bf16_cpu tests: this CPU has no bfloat16 instructions" in output
    assert said is not cpu_has_bf16(), output[-3000:]
    said = "avx512_cpu tests: this CPU has no AVX-512" in output
    assert said is not cpu_has_avx512(), output[-3000:]
    said = "avx512_bf16_cpu tests: this CPU has no AVX-512 BF16" in output
    assert said is not cpu_has_avx512_bf16(), output[-3000:]


# The two runs of a rendered project's whole suite (the default bake installed by its README's
# commands, the fullest bake's workflow) take most of the time. Under pytest-xdist's worksteal
# scheduling (`make test`) worker k starts with the k-th slice of the collection: each heavy run
# leads a slice of its own, and the other workers take the light tests around them.
HEAVY = (
    "test_workflow.py::test_the_fullest_bakes_workflow_passes_here_step_by_step",
    "test_install.py::test_the_default_bake_installs_into_a_clean_venv_and_its_readme_commands_pass",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from test_shipping import docker_absent

    absent = [item for item in items if item.get_closest_marker("docker")]
    if absent and docker_absent():
        # Deselected, not skipped: the tool is absent here; pytest_terminal_summary says why.
        config.hook.pytest_deselected(items=absent)
        items[:] = [item for item in items if item not in absent]
    heavy = [
        next(i for i in items if key in i.nodeid)
        for key in HEAVY
        if any(key in i.nodeid for i in items)
    ]
    if len(heavy) < 2:
        return
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    light = [item for item in items if item not in heavy]
    for k, item in enumerate(heavy):
        light.insert(min(len(light), k * len(items) // max(workers, len(heavy))), item)
    if workers == len(heavy) + 1:
        # mypy first in the third worker's share (worksteal deals out len // workers remaining
        # to each in turn): the cache it keeps is the one the suites' `make lint` starts from.
        early = [item for item in light if "test_mypy_is_clean" in item.nodeid]
        light = [item for item in light if item not in early]
        first_share = len(items) // workers
        start = first_share + (len(items) - first_share) // (workers - 1)
        light[start:start] = early
    items[:] = light


# Where the two whole-suite runs leave their output, durations included: .ci/run prints their
# slowest tests, so each phase of CI can be measured (pytest shows a passing test's output
# nowhere, and not at all from an xdist worker).
SUITE_LOGS = TEMPLATE / "build" / "suite-logs"
SUITE_DURATIONS = "--durations=25"


def keep_suite_log(name: str, output: str) -> None:
    SUITE_LOGS.mkdir(parents=True, exist_ok=True)
    (SUITE_LOGS / f"{name}.log").write_text(output)


# Variables of this run that a user's shell would not have: the shared environment's, and
# make's own (`make test PYTEST_ARGS=...` here would reach the bake's `make test` through them).
OUTSIDE = {"PYTHONPATH", "VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}


def make_command_line_variables() -> set[str]:
    """The variables given on the template's make command line (`make test PYTEST_ARGS=...`):
    make exports them to its recipes, so they are in this environment as well as MAKEFLAGS,
    after its ` -- `, each word with its whitespace and backslashes escaped by a backslash."""
    import re

    flags = f" {os.environ.get('MAKEFLAGS', '')} "
    if " -- " not in flags:
        return set()
    words = re.findall(r"(?:\\.|\S)+", flags.split(" -- ", 1)[1])
    return {found[1] for word in words if (found := re.match(r"([^\s:=]+):*=", word))}


def parallel_env(project: Path) -> dict[str, str]:
    """For a whole rendered suite run beside another (under xdist): one thread per engine, so
    two suites on two cores do not oversubscribe them (torch's OpenMP threads spin)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return {}
    import json

    prefix = package_of(project).upper()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", f"{prefix}_NUM_THREADS": "1"}
    answers = json.loads((project / ".cookiecutter.json").read_text())
    if answers["inference_backend"] == "ctranslate2":
        env[f"{prefix}_INTRA_THREADS"] = "1"
    return env


def suite_env(project: Path, *pytest_args: str) -> dict[str, str]:
    """The environment of a whole rendered suite run: a user's shell (no OUTSIDE variables),
    one thread per engine beside the other run, its slowest tests reported, and `pytest_args`."""
    outside = OUTSIDE | make_command_line_variables()
    env = {k: v for k, v in os.environ.items() if k not in outside} | parallel_env(project)
    env["PYTEST_ADDOPTS"] = " ".join([SUITE_DURATIONS, *pytest_args])
    return env


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Said by the process that reports (under xdist, not the one that collected)."""
    from test_shipping import docker_absent

    if why := docker_absent():
        terminalreporter.write_line(f"deselected the docker tests: {why}")
