"""A rendered project follows the template with `cruft update`, keeping its owner's edits.

Each code-axis combination is rendered with `cruft create` at the previous template commit
(non-default answers), committed, edited as a user would (a line in the README, a module of
their own), then updated to the template as it is now. The update must apply cleanly (no `.rej`
file, no conflict marker) and leave exactly what a fresh render of the current template holds,
plus the user's edits; the unit tests of the updated default and fullest bakes must pass.
"""

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from combinations import CODE_AXES, DEFAULTS, FULLEST, combo_id
from conftest import TEMPLATE, package_of

CODE_COMBINATIONS = [
    DEFAULTS | dict(zip(CODE_AXES, values, strict=True))
    for values in itertools.product(*CODE_AXES.values())
]
ANSWERS = {
    "project_name": "Update Drill Service",
    "author_name": "Ada Lovelace",
    "email": "ada@example.org",
    "license": "Apache-2.0",
}
BIN = Path(sys.executable).parent
USER_NOTE = "\n## Our deployment\n\nRuns on the team's two build machines.\n"
USER_MODULE = '"""Our own helper: the update must leave it alone."""\n\nANSWER = 42\n'
# Files that differ between a cruft render and a plain one by design.
RECORDS = {".cruft.json", ".cookiecutter.json"}


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="session")
def template_commits(tmp_path_factory) -> tuple[str, str, str]:
    """(template repository, previous commit, current commit): a clone of this repository with
    the working tree as it is now committed on top, so uncommitted changes are "current" too."""
    clone = tmp_path_factory.mktemp("template") / "repo"
    git("clone", "--quiet", "--no-local", str(TEMPLATE), str(clone), cwd=TEMPLATE)
    shallow = git("rev-parse", "--is-shallow-repository", cwd=clone) == "true"
    assert not shallow, "a shallow clone has no previous commit: git fetch --unshallow"
    previous = git("rev-parse", "HEAD~1", cwd=clone)
    tracked = git("ls-files", "-co", "--exclude-standard", "-z", cwd=TEMPLATE).split("\0")
    for name in filter(None, tracked):
        source, target = TEMPLATE / name, clone / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git("add", "-A", cwd=clone)
    if git("status", "--porcelain", cwd=clone):
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "working tree",
            cwd=clone)  # fmt: skip
    return str(clone), previous, git("rev-parse", "HEAD", cwd=clone)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


# The template before issue 18 (no license, MinIO, a root-owned /mlflow...): an update across
# many commits at once, as a project that skipped a few template releases would take it.
BASELINE = "bab59cb8f106bef43a39e1ac2b65be727d11ed81"
UPDATES = [(combo, "HEAD~1") for combo in CODE_COMBINATIONS] + [(FULLEST, BASELINE)]


@pytest.mark.parametrize(
    ("combo", "start"), UPDATES, ids=[f"{combo_id(c)}-from-{s[:7]}" for c, s in UPDATES]
)
def test_cruft_update_from_an_earlier_commit_keeps_local_edits(
    combo, start, template_commits, tmp_path, unit_tests
):
    template, head_1, current = template_commits
    previous = head_1 if start == "HEAD~1" else start
    answers = json.dumps(combo | ANSWERS)
    cruft = [str(BIN / "cruft")]
    subprocess.run(
        [*cruft, "create", template, "--checkout", previous, "--no-input",
         "--extra-context", answers, "--output-dir", str(tmp_path / "old")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (project,) = (tmp_path / "old").iterdir()
    assert json.loads((project / ".cruft.json").read_text())["commit"] == previous
    git("init", "-q", cwd=project)
    git("add", "-A", cwd=project)
    identity = ["-c", "user.name=Ada", "-c", "user.email=ada@example.org"]
    git(*identity, "commit", "-qm", "rendered", cwd=project)
    with (project / "README.md").open("a") as readme:
        readme.write(USER_NOTE)
    package = package_of(project)
    (project / "src" / package / "ours.py").write_text(USER_MODULE)
    git("add", "-A", cwd=project)
    git(*identity, "commit", "-qm", "our edits", cwd=project)

    result = subprocess.run(
        [*cruft, "update", "--skip-apply-ask", "--checkout", current],
        cwd=project, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((project / ".cruft.json").read_text())
    assert record["commit"] == current
    # The answers are kept; a question the old template did not ask takes its default.
    recorded = {k: v for k, v in record["context"]["cookiecutter"].items() if k[0] != "_"}
    asked = json.loads(git("show", f"{previous}:cookiecutter.json", cwd=Path(template)))
    given = {k: v for k, v in (combo | ANSWERS).items() if k in asked}
    changed = {k: (v, recorded.get(k)) for k, v in given.items() if recorded.get(k) != v}
    assert not changed, f"answers changed by the update: {changed}"

    context = [f"{k}={v}" for k, v in recorded.items()]
    subprocess.run(
        [str(BIN / "cookiecutter"), template, "--checkout", current, "--no-input",
         "--output-dir", str(tmp_path / "fresh"), *context],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    fresh = files(tmp_path / "fresh" / project.name)
    fresh["README.md"] += USER_NOTE.encode()
    fresh[f"src/{package}/ours.py"] = USER_MODULE.encode()
    updated = files(project)
    leftovers = [n for n in updated if n.endswith((".rej", ".orig"))]
    conflicts = [n for n, b in updated.items() if b"\n<<<<<<< " in b or b"\n>>>>>>> " in b]
    assert not leftovers and not conflicts, f"{leftovers} {conflicts}"
    differ = sorted(
        n for n in (set(fresh) | set(updated)) - RECORDS if fresh.get(n) != updated.get(n)
    )
    assert not differ, f"the update differs from a fresh render in {differ}"

    if combo in (DEFAULTS, FULLEST):
        returncode, output = unit_tests(project)
        assert returncode == 0 and " passed" in output, output[-3000:]
