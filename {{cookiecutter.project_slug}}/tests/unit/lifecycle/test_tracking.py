"""Tracking without a store: what never needs MLflow, a server or a model."""

from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.lifecycle.registry import log_model
from {{ cookiecutter.package_name }}.lifecycle.tracking import (
    TrackingError,
    settings_params,
    start_run,
    tracking_uri,
)
from {{ cookiecutter.package_name }}.settings import load_settings, redact_url


def test_with_tracking_off_a_job_logs_nothing_and_registering_is_one_clear_error(tmp_path):
    settings = load_settings(tracking=False, tracking_dir=tmp_path / "mlruns")
    with start_run(settings, "batch", {"model": "m"}) as run:
        run.log_metrics({"inputs_per_s": 1.0})
        assert run.where() == ""
        with pytest.raises(TrackingError, match="needs MLflow tracking"):
            log_model(run, Path("unused"), "transformers")
    assert not (tmp_path / "mlruns").exists()


def test_the_local_store_is_sqlite_in_the_tracking_dir_unless_a_server_is_named(tmp_path):
    local = load_settings(tracking_dir=tmp_path / "mlruns", tracking_uri=None)
    assert tracking_uri(local) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    server = load_settings(tracking_uri="http://mlflow.example:5000")
    assert tracking_uri(server) == "http://mlflow.example:5000"


def test_run_params_hold_no_url_or_secret_from_the_settings():
    settings = load_settings(
        rabbitmq_url="amqp://user:hunter2@broker:5672/%2F",
        mlflow_backend_store_uri="mysql+pymysql://root:hunter3@db:3306/mlflow",
    )
    logged = " ".join(f"{k}={v}" for k, v in settings_params(settings).items())
    assert "hunter2" not in logged and "hunter3" not in logged and "amqp" not in logged
    assert redact_url(settings.rabbitmq_url) == "amqp://user:***@broker:5672/%2F"


def test_a_tracking_uri_mlflow_refuses_is_one_line_without_its_password(tmp_path, monkeypatch):
    # MLflow 3 refuses a file: store unless told otherwise; a bad scheme fails the same way.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in (f"file:{tmp_path}/mlruns", "nosuch://user:hunter2@host/x"):
        settings = load_settings(tracking_uri=uri, tracking_dir=tmp_path / "local")
        with pytest.raises(TrackingError, match=r"^MLflow refused") as caught:
            with start_run(settings, "batch"):
                pass
        assert "\n" not in str(caught.value) and "hunter2" not in str(caught.value)
