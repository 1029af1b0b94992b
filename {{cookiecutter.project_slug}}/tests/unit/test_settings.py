from pathlib import Path
from typing import Literal

import pytest

from {{ cookiecutter.package_name }}.settings import (
    DEFAULT_MODEL,
    ENV_PREFIX,
    Settings,
    SettingsError,
    effective_settings,
    load_settings,
    unknown_variables,
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No variable of ours and no .env from the developer's shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_work_offline_with_the_bundled_model():
    settings = load_settings()
    assert settings.model == DEFAULT_MODEL
    assert settings.temperature == 0.0
    assert settings.models_dir == settings.cache_dir / "models"


def test_the_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_BATCH_SIZE", "7")
    monkeypatch.setenv(f"{ENV_PREFIX}CACHE_DIR", "/tmp/elsewhere")
    settings = load_settings()
    assert settings.max_batch_size == 7
    assert settings.cache_dir == Path("/tmp/elsewhere")


def test_a_dotenv_file_is_read_and_the_environment_wins_over_it(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text(f"{ENV_PREFIX}MAX_WAIT_MS=5\n{ENV_PREFIX}NUM_THREADS=1\n")
    monkeypatch.setenv(f"{ENV_PREFIX}NUM_THREADS", "2")
    settings = load_settings()
    assert settings.max_wait_ms == 5.0
    assert settings.num_threads == 2


def test_a_home_relative_path_in_dotenv_is_expanded(monkeypatch, tmp_path):
    """No shell expands `~` in .env: the settings do, or the cache lands in a folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dotenv = f"{ENV_PREFIX}CACHE_DIR=~/models\n{ENV_PREFIX}TRACKING_DIR=~/runs\n"
    (tmp_path / ".env").write_text(dotenv)
    settings = load_settings()
    assert settings.cache_dir == tmp_path / "home" / "models"
    assert settings.tracking_dir == tmp_path / "home" / "runs"
    (tmp_path / ".env").write_text(f"{ENV_PREFIX}CACHE_DIR=~no-such-user-here/models\n")
    with pytest.raises(SettingsError, match=r"CACHE_DIR.*no such home directory"):
        load_settings()


def test_explicit_overrides_win_and_none_means_not_given(monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}MODEL", "./from-env")
    assert load_settings(model=None).model == "./from-env"
    assert load_settings(model="./given").model == "./given"


def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_BATCH_SIZE", "zero")
    monkeypatch.setenv(f"{ENV_PREFIX}DEVICE", "tpu")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert f"{ENV_PREFIX}MAX_BATCH_SIZE" in message
    assert f"{ENV_PREFIX}DEVICE" in message


# Fields whose every string is a valid value: nothing to refuse at load time (a bad URL or
# model spec is refused where it is used, in one line, by the tests of those parts).
FREE_TEXT = {
    "model", "cache_dir", "system_prompt", "rabbitmq_url", "tracking_uri", "tracking_dir",
    "experiment", "mlflow_host", "http_host", "mlflow_allowed_hosts", "mlflow_backend_store_uri",
    "mlflow_artifacts_destination", "s3_endpoint_url", "ray_address",
}  # fmt: skip


def bad_value(name: str) -> str | None:
    """A value the field must refuse, chosen from its type and constraints."""
    import typing

    field = Settings.model_fields[name]
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if args and typing.get_origin(annotation) is not Literal else annotation
    if typing.get_origin(annotation) is Literal:
        return "no-such-choice"
    if typing.get_origin(annotation) is list:
        return "[not json"
    if kind in (int, float):
        return "-1e999" if kind is float else "twelve"
    if kind is bool:
        return "maybe"
    if field.metadata and any(getattr(m, "pattern", None) for m in field.metadata):
        return "bad value with spaces!"
    if any(getattr(m, "min_length", None) for m in field.metadata):
        return "short"
    return None


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_refuses_a_bad_value_in_one_line_naming_it(name, monkeypatch):
    value = bad_value(name)
    if value is None:
        assert name in FREE_TEXT, f"{name}: give it a constraint or list it as free text"
        return
    monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"{ENV_PREFIX}{name.upper()}" in message and "\n" not in message


def test_a_misspelt_variable_is_named_with_the_setting_it_was_meant_for(tmp_path):
    environ = {
        f"{ENV_PREFIX}MAX_BATCH_SIZ": "4",  # a typo
        f"{ENV_PREFIX}MAX_BATCH_SIZE": "4",
        f"{ENV_PREFIX}TRACKING_URI": "http://x",  # a setting's alias
        "MLFLOW_TRACKING_URI": "http://x",  # another prefix: not ours to judge
    }
    (tmp_path / ".env").write_text(f"{ENV_PREFIX}ZZZ_NOTHING_LIKE_IT=1\n")
    assert unknown_variables(environ, tmp_path / ".env") == [
        f"{ENV_PREFIX}MAX_BATCH_SIZ (did you mean {ENV_PREFIX}MAX_BATCH_SIZE?)",
        f"{ENV_PREFIX}ZZZ_NOTHING_LIKE_IT",
    ]
    assert unknown_variables({f"{ENV_PREFIX}MODEL": "x"}, tmp_path / "absent") == []


def test_a_dotenv_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / ".env").write_bytes(f"{ENV_PREFIX}MAX_BATCH_SIZE=\xff\xfe\n".encode("latin-1"))
    with pytest.raises(SettingsError, match=r"\.env is not UTF-8: invalid start byte"):
        unknown_variables({}, tmp_path / ".env")


def test_the_effective_settings_mask_every_secret(monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}API_KEY", "sk-very-secret-4711")
    monkeypatch.setenv(f"{ENV_PREFIX}RABBITMQ_URL", "amqp://app:rabbit-pw-4711@broker:5672/%2F")
    shown = dict(effective_settings(load_settings()))
    assert len(shown) == len(Settings.model_fields)
    assert shown[f"{ENV_PREFIX}API_KEY"] == "***"
    assert shown[f"{ENV_PREFIX}RABBITMQ_URL"] == "amqp://app:***@broker:5672/%2F"
    assert "4711" not in repr(shown)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://app:Ab/cD+9x=@rabbitmq:5672/%2F",  # a raw / ends a parser's authority
        "mysql+pymysql://mlflow:p#ss?w@rd@127.0.0.1:3306/db",
        "amqp://app:plain-4711-pw@broker:5672/%2F",
    ],
)
def test_a_password_is_masked_whatever_characters_it_holds(url):
    from {{ cookiecutter.package_name }}.settings import redact_url

    masked = redact_url(url)
    assert "***@" in masked and not any(secret in masked for secret in ("Ab/", "p#ss", "4711"))
    assert redact_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_config_show_prints_the_settings_and_warns_of_unknown_variables(monkeypatch, tmp_path):
    import os
    import subprocess
    import sys

    package = "{{ cookiecutter.package_name }}"
    env = os.environ | {
        f"{ENV_PREFIX}API_KEY": "sk-very-secret-4711",
        f"{ENV_PREFIX}MAX_NEW_TOKEN": "8",
        f"{ENV_PREFIX}MAX_NEW_TOKENS": "9",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    result = subprocess.run(
        [sys.executable, "-m", package, "config", "show"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{ENV_PREFIX}MAX_NEW_TOKENS=9\n" in result.stdout
    assert f"{ENV_PREFIX}API_KEY=***\n" in result.stdout and "4711" not in result.stdout
    assert f"unknown setting {ENV_PREFIX}MAX_NEW_TOKEN (did you mean" in result.stderr
