"""The default bake, installed as a user installs it: its declared dependencies are complete."""

import shutil
import subprocess
import sys

from conftest import assert_all_ran, keep_suite_log, mypy_cache, package_of, suite_env


def make(target: str, project, env: dict, timeout: float) -> str:
    result = subprocess.run(
        ["make", target, f"PYTHON={sys._base_executable}"],
        cwd=project, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    output = f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == 0, f"make {target}\n{output}"
    return result.stdout


def test_the_default_bake_installs_into_a_clean_venv_and_its_readme_commands_pass(
    bake, default_answers, tmp_path
):
    project = tmp_path / "project"
    shutil.copytree(bake(default_answers), project)  # the shared bake stays pristine
    env = suite_env(project)
    # A cache of its own: the bundled model is downloaded and converted as on a new machine,
    # with only what the project's own pyproject.toml installed.
    env[f"{package_of(project).upper()}_CACHE_DIR"] = str(tmp_path / "cache")

    make("install", project, env, timeout=1800)
    venv_python = project / ".venv" / "bin" / "python"
    assert venv_python.is_file() and (project / ".venv" / "bin" / "llm-service").is_file()

    env["MYPY_CACHE_DIR"] = str(mypy_cache(tmp_path / "mypy-cache"))  # as a CI would keep it
    make("lint", project, env, timeout=300)
    # About 27 minutes beside the workflow run (two suites on two cores, one thread each).
    tests = make("test", project, env, timeout=3600)
    keep_suite_log("default-bake-make-test", tests)
    assert_all_ran(tests)

    run = make("run", project, env, timeout=900)
    assert "capital-france:" in run and "Paris" in run
    assert "inputs/s" in run and "tokens/s" in run
