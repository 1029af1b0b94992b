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
