"""Invalid answers stop the bake in the pre-gen hook with one clear line, and render nothing."""

import subprocess
import sys

import pytest

from conftest import TEMPLATE

INVALID = [
    ({"project_slug": "my-project!"}, "project_slug 'my-project!' is not valid"),
    ({"project_slug": "My_Project"}, "project_slug 'My_Project' is not valid"),
    ({"project_slug": "class"}, "package_name 'class' is a Python keyword"),
    ({"project_slug": "json"}, "shadows the standard library module"),
    ({"project_slug": "torch"}, "clashes with a package the project imports"),
    ({"package_name": "9lives"}, "package_name '9lives' is not a valid Python package name"),
    ({"package_name": "my-pkg"}, "package_name 'my-pkg' is not a valid Python package name"),
    ({"project_name": "   ", "project_slug": "fine"}, "project_name must be a non-empty line"),
    ({"email": "not-an-email"}, "email 'not-an-email' is not an email address"),
    ({"model_id": "not a model!!"}, "is neither bundled:<name>, a Hub id"),
    ({"model_id": "bundled:GPT-9"}, "'bundled:GPT-9' is not a bundled model"),
    ({"model_id": "org/" + "x" * 90}, "over 80"),
    ({"model_id": './m"; import os; os.system("id") #'}, "is not a plain local path"),
    ({"model_id": "/models/$(id)"}, "is not a plain local path"),
    ({"description": "one line\nLLM_SERVICE_MODEL=/evil"}, "description must be one line"),
    ({"author_name": "tab\there"}, "author_name must be one line"),
    ({"quantization": "int8"}, "quantization=int8 needs inference_backend=ctranslate2"),
    (
        {"inference_backend": "ctranslate2", "quantization": "int16"},
        "quantization=int16 fails the quality gate on the bundled model",
    ),
]


@pytest.mark.parametrize(("answers", "message"), INVALID, ids=lambda v: str(v)[:40])
def test_invalid_answers_stop_in_the_hook_with_their_message(
    answers, message, cookies, capfd, tmp_path
):
    result = cookies.bake(extra_context=answers)
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "FailedHookException"
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert result.project_path is None
    assert list((tmp_path / "cookies" / "bake00").iterdir()) == []  # pytest-cookies output


@pytest.mark.parametrize(
    ("answers", "allowed"),
    [({"python_version": "2.7"}, "3.11"), ({"inference_backend": "vllm"}, "ctranslate2")],
)
def test_an_unknown_choice_is_refused_before_rendering(answers, allowed, cookies):
    result = cookies.bake(extra_context=answers)
    assert result.exit_code != 0
    (value,) = answers.values()
    assert value in str(result.exception) and allowed in str(result.exception)


@pytest.mark.parametrize("slug", ["my-project!", "class"])
def test_the_command_line_prints_one_error_line_and_renders_nothing(slug, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cookiecutter", str(TEMPLATE), "--no-input", f"project_slug={slug}",
         "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    # Our hook's one line is all of stderr. (cookiecutter 2.7 logs its own FailedHookException,
    # traceback included, to stdout; that is cookiecutter's logging, not ours.)
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("ERROR: ") and slug in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_answers_cannot_inject_code_into_the_hooks(bake, default_answers, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"x''' + __import__('os').system('touch {marker}') + '''"
    answers = {"project_name": payload, "project_slug": "injected", "description": payload}
    project = bake(default_answers | answers)
    assert not marker.exists()
    assert project.is_dir()
