from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.settings import (
    DEFAULT_MODEL,
    ENV_PREFIX,
    SettingsError,
    load_settings,
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
