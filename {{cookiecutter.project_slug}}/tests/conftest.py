"""Shared fixtures: one real model for the whole session, loaded only by integration tests."""

import os
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.settings import Settings, load_settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def settings() -> Settings:
    # Generation tests compare outputs: the defaults must not sample.
    return load_settings(temperature=0.0, system_prompt=None)


@pytest.fixture(scope="session")
def model_dir(settings: Settings) -> Path:
    from {{ cookiecutter.package_name }}.model_source import resolve_model

    return resolve_model(settings.model, settings.models_dir)


@pytest.fixture(scope="session")
def backend(settings: Settings, model_dir: Path):
    from {{ cookiecutter.package_name }}.backends import load_backend

    return load_backend(settings)


@pytest.fixture(scope="session")
def service(settings: Settings, backend):
    from {{ cookiecutter.package_name }}.service import InferenceService

    return InferenceService.from_settings(settings, backend)


@pytest.fixture(scope="session")
def broker(settings: Settings) -> str:
    """The RabbitMQ URL, if the broker answers; else skip (or fail under CI=true)."""
    import pika
    from pika.exceptions import AMQPError

    from {{ cookiecutter.package_name }}.queue.topology import (
        connection_parameters,
        redact,
    )

    try:
        pika.BlockingConnection(connection_parameters(settings.rabbitmq_url, 30)).close()
    except (AMQPError, OSError) as exc:
        message = (
            f"RabbitMQ is unreachable at {redact(settings.rabbitmq_url)} ({type(exc).__name__}); "
            "start it with `docker compose up -d rabbitmq`"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return settings.rabbitmq_url


@pytest.fixture
def prefix(broker: str):
    """A queue prefix of this test's own; its queues are deleted afterwards."""
    import uuid

    import pika

    from {{ cookiecutter.package_name }}.queue.topology import Names, delete

    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    delete(connection.channel(), Names(name))
    connection.close()
