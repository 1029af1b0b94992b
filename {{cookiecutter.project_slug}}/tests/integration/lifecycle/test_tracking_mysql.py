"""The MLflow server on MySQL: a fresh database per test run, created by `mlflow-server` itself."""

import json
import os
import uuid
from urllib.parse import quote, unquote, urlsplit

import pytest
from mlflow import MlflowClient

from {{ cookiecutter.package_name }}.settings import (
    DEFAULT_QUEUE_PREFIX,
    ENV_PREFIX,
    redact_url,
)

from ...conftest import PROJECT_ROOT
from .test_tracking import QUESTIONS, check_batch_run, cli, write_questions

pytestmark = [pytest.mark.integration, pytest.mark.mysql]


def server_url() -> str:
    """Where the tests' MySQL (or MariaDB) is; the database itself is made per test run.

    TEST_MYSQL_URL, else root at 127.0.0.1:3306 with `MYSQL_ROOT_PASSWORD` from the environment
    or .env (as `docker compose up -d mysql` runs it), else root with no password (CI's service).
    """
    if url := os.environ.get("TEST_MYSQL_URL"):
        return url
    from dotenv import dotenv_values

    dotenv = dotenv_values(PROJECT_ROOT / ".env")
    password = os.environ.get("MYSQL_ROOT_PASSWORD") or dotenv.get("MYSQL_ROOT_PASSWORD")
    credentials = f"root:{quote(password, safe='')}" if password else "root"
    return f"mysql+pymysql://{credentials}@127.0.0.1:3306"


SERVER_URL = server_url()


def connect(database: str | None = None):
    import pymysql

    parts = urlsplit(SERVER_URL)
    return pymysql.connect(
        host=parts.hostname, port=parts.port or 3306, user=parts.username or "root",
        password=unquote(parts.password or ""), database=database, connect_timeout=5,
    )  # fmt: skip


@pytest.fixture
def mysql_database():
    """The URI of a database that does not exist yet; dropped afterwards."""
    import pymysql

    try:
        connect().close()
    except pymysql.MySQLError as exc:
        message = (
            f"MySQL is unreachable at {redact_url(SERVER_URL)} ({exc.args[-1]}); start it with "
            "`docker compose up -d mysql` (MYSQL_ROOT_PASSWORD in .env) or set TEST_MYSQL_URL"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = f"test_mlflow_{uuid.uuid4().hex[:10]}"
    yield name, f"{SERVER_URL}/{name}"
    with connect() as connection, connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def test_a_batch_run_is_tracked_by_a_server_on_mysql(mlflow_server, mysql_database, tmp_path):
    name, uri = mysql_database
    server = mlflow_server({f"{ENV_PREFIX}MLFLOW_BACKEND_STORE_URI": uri})
    target = tmp_path / "replies.jsonl"
    result = cli(
        "batch", str(write_questions(tmp_path)), str(target), env={"MLFLOW_TRACKING_URI": server}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    check_batch_run(MlflowClient(server), target, tmp_path)

    # The run is in MySQL itself, not in a file beside it.
    with connect(name) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM runs")
        assert cursor.fetchone()[0] == 1
        cursor.execute("SELECT COUNT(*) FROM metrics WHERE `key` = 'inputs_per_s'")
        assert cursor.fetchone()[0] == 1
        cursor.execute("SELECT name FROM experiments WHERE name = %s", (DEFAULT_QUEUE_PREFIX,))
        assert cursor.fetchone() is not None
    replies = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in replies] == [q["id"] for q in QUESTIONS]


def test_an_unreachable_mysql_is_one_line(tmp_path):
    from tests.conftest import free_port

    env = {
        f"{ENV_PREFIX}MLFLOW_BACKEND_STORE_URI": (
            f"mysql+pymysql://root:db-s3cret@127.0.0.1:{free_port()}/nothing"
        ),
        f"{ENV_PREFIX}TRACKING_DIR": str(tmp_path),
    }
    result = cli("mlflow-server", env=env, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: MySQL at mysql+pymysql://root:***@127.0.0.1:")
    assert "db-s3cret" not in result.stderr
