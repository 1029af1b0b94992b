"""What a reader of any bake relies on: small modules, thin commands, docs that name what exists,
and no trace of an engine the options left out."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from combinations import CODE_AXES, DEFAULTS, FULLEST, combo_id
from conftest import keep_mypy_cache, mypy_cache, package_of

MAX_MODULE_LINES = 300
MAX_COMMAND_LINES = 40
# A backticked path to a Python file, as the docs name modules (`engine/prompts.py`).
PY_PATH = re.compile(r"`([\w./-]+\.py)`")
DOC_BAKES = [DEFAULTS, FULLEST, DEFAULTS | {"include_finetuning": "no"}]
CODE_BAKES = [
    DEFAULTS | {"inference_backend": b, "worker_runtime": r, "include_finetuning": f}
    for b in CODE_AXES["inference_backend"]
    for r in CODE_AXES["worker_runtime"]
    for f in CODE_AXES["include_finetuning"]
]


def modules(project: Path) -> list[Path]:
    return sorted((project / "src" / package_of(project)).rglob("*.py"))


def only_a_docstring(path: Path) -> bool:
    """A package's `__init__.py` that only says what the package is (named by its folder)."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
    )


def docs_of(project: Path) -> list[Path]:
    return [project / "README.md", *sorted((project / "docs").glob("*.md"))]


@pytest.mark.parametrize("combo", CODE_BAKES, ids=combo_id)
def test_no_module_is_over_300_lines(combo, bake):
    project = bake(combo)
    long = {
        str(path.relative_to(project)): count
        for path in modules(project)
        if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


@pytest.mark.parametrize("combo", CODE_BAKES, ids=combo_id)
def test_no_command_function_is_over_40_lines(combo, bake):
    project = bake(combo)
    long = []
    for path in (project / "src" / package_of(project) / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = node.end_lineno - node.lineno + 1 - len(node.decorator_list)
                if count > MAX_COMMAND_LINES:
                    long.append(f"cli/{path.name}:{node.lineno} {node.name}: {count} lines")
    assert long == []


@pytest.mark.parametrize("code", CODE_BAKES, ids=combo_id)
def test_mypy_is_clean(code, bake, tmp_path):
    """mypy, as `make lint` runs it (its config is the bake's pyproject.toml), finds nothing.
    It starts from the kept cache (conftest.MYPY_CACHE): the modules bakes share are checked
    once."""
    project = bake(code)
    cache = mypy_cache(tmp_path / "mypy-cache")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache)],
        cwd=project, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    keep_mypy_cache(cache)


@pytest.mark.parametrize("combo", DOC_BAKES, ids=combo_id)
def test_every_module_the_docs_name_exists(combo, bake):
    project = bake(combo)
    package = project / "src" / package_of(project)
    missing = [
        f"{doc.relative_to(project)}: `{name}`"
        for doc in docs_of(project)
        for name in PY_PATH.findall(doc.read_text())
        if not ((package / name).is_file() or (project / name).is_file())
    ]
    assert missing == []


@pytest.mark.parametrize("combo", DOC_BAKES, ids=combo_id)
def test_the_architecture_page_names_every_module(combo, bake):
    project = bake(combo)
    package = project / "src" / package_of(project)
    named = set(PY_PATH.findall((project / "docs" / "architecture.md").read_text()))
    unnamed = [
        str(path.relative_to(package))
        for path in modules(project)
        if str(path.relative_to(package)) not in named and not only_a_docstring(path)
    ]
    assert unnamed == []


def test_docs_are_linked_from_the_readme(bake):
    project = bake(FULLEST)
    readme = (project / "README.md").read_text()
    unlinked = [doc.name for doc in docs_of(project)[1:] if f"docs/{doc.name}" not in readme]
    assert unlinked == []


@pytest.mark.parametrize("finetuning", ["yes", "no"])
def test_a_transformers_bake_has_no_ctranslate2_outside_its_docs(finetuning, bake):
    project = bake(DEFAULTS | {"include_finetuning": finetuning})
    found = [
        f"{path.relative_to(project)}:{number}: {line.strip()}"
        for path in sorted(project.rglob("*"))
        if path.is_file() and path.suffix != ".md"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"ctranslate2|\bct2", line, re.IGNORECASE)
    ]
    assert found == []
