"""The command line as a user first meets it: `--help` lists every command of this bake."""

from typer.testing import CliRunner

from {{ cookiecutter.package_name }}.cli import app

COMMANDS = [
    "model", "generate", "batch", "worker", "submit", "dead-letters", "bench", "serve",
    "mlflow-server", "artifacts", "config",
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    "convert",
{%- endif %}
{%- if cookiecutter.include_finetuning == "yes" %}
    "finetune",
{%- endif %}
]  # fmt: skip


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    listed = {line.split()[1] for line in result.output.splitlines() if line.startswith("│ ")}
    assert set(COMMANDS) <= listed, result.output


def test_an_unknown_command_is_refused_with_usage():
    result = CliRunner().invoke(app, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.output
