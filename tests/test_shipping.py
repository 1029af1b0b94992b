"""What a user ships beside the code works as shipped: compose, the image, the workflow.

Each file is checked by the tool its ecosystem uses (hadolint, actionlint, zizmor,
check-jsonschema), on the default and the fullest bake, and for what those tools cannot see:
the ownership of what compose mounts, ports, pins and secrets.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from combinations import DEFAULTS, FULLEST, combo_id

BAKES = [DEFAULTS, FULLEST]
BIN = Path(sys.executable).parent
ROOT = "0"
SECRET = re.compile(r"PASSWORD|SECRET|USER|KEY")
VERSION_TAG = re.compile(r"^\d+\.\d+")
WORKFLOW = ".github/workflows/ci.yml"


@pytest.fixture(params=BAKES, ids=combo_id)
def shipped(request, bake) -> Path:
    return bake(request.param)


def tool(name: str, *args: str, cwd: Path) -> None:
    """Run a linter from the test environment: zero findings, or fail with what it printed."""
    result = subprocess.run(
        [str(BIN / name), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{name} {' '.join(args)}\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize(
    "command",
    [
        ["hadolint", "Dockerfile"],
        ["actionlint", WORKFLOW],
        ["zizmor", "--offline", WORKFLOW],
        ["check-jsonschema", "--builtin-schema", "vendor.github-workflows", WORKFLOW],
        ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        ["check-jsonschema", "--builtin-schema", "vendor.dependabot", ".github/dependabot.yml"],
        ["pre-commit", "validate-config", ".pre-commit-config.yaml"],
    ],
    ids=lambda c: c[0] + ("-" + c[2].split(".")[-1] if c[0] == "check-jsonschema" else ""),
)  # fmt: skip
def test_the_ecosystem_linters_find_nothing(command, shipped):
    tool(*command, cwd=shipped)


def image_model(dockerfile: str) -> tuple[dict[str, str], str]:
    """(owner uid of each directory the image's RUN lines create, the uid its containers run as).

    Reads what this template's Dockerfile uses: `useradd [--uid]`, `install -d -o`, `mkdir`,
    `chown`; a RUN line runs as the USER in force, root (0) until the first USER line.
    """
    uids = {"root": ROOT}
    owners: dict[str, str] = {}
    user = ROOT
    for line in re.sub(r"\\\n", " ", dockerfile).splitlines():
        instruction, _, args = line.strip().partition(" ")
        if instruction == "USER":
            user = uids.get(name := args.split(":")[0].strip(), name)
        elif instruction == "RUN":
            for command in re.split(r"&&|;", args):
                words = shlex.split(command)
                if not words:
                    continue
                paths = [w for w in words[1:] if w.startswith("/")]
                if words[0] == "useradd":  # Debian gives the first user 1000
                    uids[words[-1]] = (
                        words[words.index("--uid") + 1] if "--uid" in words else "1000"
                    )
                elif words[0] == "install" and "-d" in words:
                    owner = words[words.index("-o") + 1] if "-o" in words else user
                    owners |= dict.fromkeys(paths, uids.get(owner, owner))
                elif words[0] == "mkdir":
                    owners |= dict.fromkeys(paths, user)
                elif words[0] == "chown":
                    owner = next(w for w in words[1:] if not w.startswith("-")).split(":")[0]
                    owners |= dict.fromkeys(paths, uids.get(owner, owner))
    return owners, user


def test_the_image_owns_every_volume_compose_mounts_so_its_user_can_write(shipped):
    """A named volume starts as a copy of the image's directory, owner included; one the image
    lacks starts root-owned. Made here as Docker would make it, then written as the service's
    user: the MLflow server's /mlflow was root-owned, so its store could never be created."""
    owners, user = image_model((shipped / "Dockerfile").read_text())
    assert user != ROOT, "the containers run as root"
    services = yaml.safe_load((shipped / "docker-compose.yml").read_text())["services"]
    mounts = [
        (name, *mount.split(":")[:2])
        for name, service in services.items()
        if "build" in service
        for mount in service.get("volumes", [])
    ]
    assert {target for *_, target in mounts} >= {"/mlflow", "/cache"}
    root = Path(tempfile.mkdtemp(prefix="volumes-"))
    root.chmod(0o755)
    try:
        for name, source, target in mounts:
            if source.startswith((".", "/", "~")):
                continue  # a bind mount is the host's folder, not the image's
            owner = owners.get(target, ROOT)
            volume = root / source
            volume.mkdir(exist_ok=True)
            volume.chmod(0o755)
            if os.geteuid() == 0:  # as on CI: make it as Docker would, write as the service
                os.chown(volume, int(owner), int(owner))
                write = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
                result = subprocess.run([*write, "touch", str(volume / "probe")], text=True,
                                        capture_output=True)  # fmt: skip
                assert result.returncode == 0, f"{name}: {target}: {result.stderr.strip()}"
            assert owner == user, f"{name} writes {target}, which the image leaves to uid {owner}"
    finally:
        shutil.rmtree(root)


def test_compose_binds_to_localhost_pins_its_images_and_requires_its_secrets(shipped):
    text = (shipped / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        tag = service["image"].rpartition(":")[2]
        if "build" not in service:  # the app's own image is built here, with a local tag
            assert VERSION_TAG.match(tag), f"{name}: {service['image']} is not pinned to a version"
    built = [(s["image"], s["build"]) for s in services.values() if "build" in s]
    assert len(built) == 3 and len(set(built)) == 1, "the app services must share one image"

    variables = re.findall(r"\$\{(\w+)(:?[-?]?)", text)
    example = (shipped / ".env.example").read_text()
    for variable, operator in variables:
        if SECRET.search(variable):
            assert operator == ":?", f"${{{variable}}} must be required, never defaulted"
            assert re.search(rf"^{variable}=$", example, re.M), f"{variable} not in .env.example"
    if "mysql" in services:
        mysql = services["mysql"]["environment"]
        assert mysql["MYSQL_USER"] != "root"
        store = [v for k, v in services["mlflow"]["environment"].items() if "BACKEND_STORE" in k]
        assert store[0].startswith(f"mysql+pymysql://{mysql['MYSQL_USER']}:")


def test_the_workflow_starts_exactly_the_services_its_options_need(shipped):
    import json

    answers = json.loads((shipped / ".cookiecutter.json").read_text())
    workflow = yaml.safe_load((shipped / ".github/workflows/ci.yml").read_text())
    job = workflow["jobs"]["test"]
    wanted = {"rabbitmq"} | ({"mysql"} if answers["tracking_backend"] == "mysql" else set())
    assert set(job["services"]) == wanted
    assert workflow["permissions"] == {"contents": "read"} and workflow["concurrency"]
    assert job["env"]["CI"] == "true"
    for step in job["steps"]:
        if "uses" in step:
            assert re.fullmatch(r"[\w-]+/[\w-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
    text = (shipped / ".github/workflows/ci.yml").read_text()
    for line in re.findall(r"^\s*(?:- )?uses: .*$", text, re.M):
        assert re.search(r"@[0-9a-f]{40}  # v\d+\.\d+\.\d+$", line), f"no version comment: {line}"
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["persist-credentials"] is False


def test_the_pre_commit_hooks_install_and_pass_on_a_fresh_repository(bake, tmp_path):
    """Each hook's environment is built from PyPI (cached in ~/.cache/pre-commit) and run on
    every file of the fullest bake. mypy, which needs the project's venv, is tested on its own
    (tests/test_structure.py)."""
    project = tmp_path / "project"
    shutil.copytree(bake(FULLEST), project)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    result = subprocess.run(
        [str(BIN / "pre-commit"), "run", "--all-files"], cwd=project, capture_output=True,
        text=True, timeout=600, env=os.environ | {"SKIP": "mypy"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count("Passed") == 5, result.stdout


def docker_absent() -> str | None:
    """Why `docker compose` cannot run here, or None when it can (config needs no daemon)."""
    if shutil.which("docker") is None:
        return "no docker client"
    result = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    return None if result.returncode == 0 else "no docker compose plugin"


@pytest.mark.docker
def test_docker_compose_config_resolves_and_the_image_builds_where_docker_runs(shipped, tmp_path):
    """With the .env a user writes from .env.example, compose resolves every file; where a
    daemon answers, the one image builds. Without Docker this is deselected, with the reason."""
    project = tmp_path / "project"
    shutil.copytree(shipped, project)
    example = (project / ".env.example").read_text()
    required = re.findall(r"^(\w+)=$", example, re.M)
    (project / ".env").write_text(
        "".join(f"{name}=test-{name.lower()}-4711\n" for name in required)
    )
    subprocess.run(["docker", "compose", "config", "--quiet"], cwd=project, check=True)
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        subprocess.run(["docker", "compose", "build"], cwd=project, check=True, timeout=3000)
