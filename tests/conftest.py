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


def package_of(project: Path) -> str:
    (package,) = [p.name for p in (project / "src").iterdir() if p.is_dir()]
    return package


def cpu_has_bf16() -> bool:
    """This machine's CPU has bfloat16 instructions (the rendered `precision` module's oracle)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(cpuinfo.split()))


def assert_all_ran(output: str) -> None:
    """A rendered test run: passed, nothing failed or skipped, and the tests that need absent
    hardware deselected with their reason printed (exactly when the hardware is absent)."""
    assert " passed" in output and " failed" not in output, output[-3000:]
    assert "skipped" not in output, output[-3000:]
    said = "bf16_cpu tests: this CPU has no bfloat16 instructions" in output
    assert said is not cpu_has_bf16(), output[-3000:]


# The two runs of a rendered project's whole suite (the default bake installed by its README's
# commands, the fullest bake's workflow) take most of the time. Under pytest-xdist's worksteal
# scheduling (`make test`) worker k starts with the k-th slice of the collection: each heavy run
# leads a slice of its own, and the other workers take the light tests around them.
HEAVY = ("test_workflow.py::", "test_install.py::")


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
    items[:] = light


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


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Said by the process that reports (under xdist, not the one that collected)."""
    from test_shipping import docker_absent

    if why := docker_absent():
        terminalreporter.write_line(f"deselected the docker tests: {why}")
