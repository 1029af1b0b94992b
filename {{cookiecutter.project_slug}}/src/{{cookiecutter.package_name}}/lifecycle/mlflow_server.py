"""`mlflow-server`: the tracking server this project's jobs log to, started lean.

`mlflow server --backend-store-uri <sqlite or mysql> --artifacts-destination <folder or s3://>
--host --port --workers 1`, with job execution off (two processes, about 0.5 GB, instead of
fifteen and 3 GB). Artifacts are proxied (`--serve-artifacts`), so clients need no S3
credentials. The backend store URI may hold a password: it is passed in the environment, never
on the command line, and logged without it.
"""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..settings import Settings, redact_url
from .tracking import local_store

log = logging.getLogger(__name__)


class ServerSetupError(RuntimeError):
    """The server's stores cannot be prepared; one line says which and why."""


def backend_store_uri(settings: Settings) -> str:
    """The configured store, or the project's local SQLite store (what jobs log to by default)."""
    return settings.mlflow_backend_store_uri or f"sqlite:///{local_store(settings) / 'mlflow.db'}"


def artifacts_destination(settings: Settings) -> str:
    return settings.mlflow_artifacts_destination or str(local_store(settings) / "artifacts")


def server_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """The command line and the environment additions that start the server."""
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.is_file() else "mlflow", "server"]
    command += ["--host", settings.mlflow_host, "--port", str(settings.mlflow_port)]
    command += ["--workers", "1", "--serve-artifacts"]
    command += ["--artifacts-destination", artifacts_destination(settings)]
    if settings.mlflow_allowed_hosts:
        command += ["--allowed-hosts", settings.mlflow_allowed_hosts]
    env = {
        "MLFLOW_BACKEND_STORE_URI": backend_store_uri(settings),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    if settings.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return command, env


def prepare_stores(settings: Settings) -> None:
    """Create what the server needs and cannot create itself: the local folder, the MySQL
    database, the S3 bucket. Raises ServerSetupError with one line when that fails."""
    store = backend_store_uri(settings)
    if store.startswith("sqlite:///"):
        Path(store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif store.startswith("mysql"):
        _create_mysql_database(store)
    destination = artifacts_destination(settings)
    if destination.startswith("s3://"):
        _create_bucket(destination, settings.s3_endpoint_url)
    elif "://" not in destination:
        Path(destination).mkdir(parents=True, exist_ok=True)


def serve(settings: Settings) -> int:
    """Run the server in the foreground until it exits or is interrupted; its exit status."""
    prepare_stores(settings)
    command, env = server_command(settings)
    log.info(
        "MLflow server on http://%s:%d: backend store %s, artifacts %s",
        settings.mlflow_host, settings.mlflow_port,
        redact_url(env["MLFLOW_BACKEND_STORE_URI"]), artifacts_destination(settings),
    )  # fmt: skip
    # A process group of its own: `mlflow server` runs uvicorn as its child, which a signal to
    # `mlflow` alone would leave running. SIGTERM (a supervisor's stop) and Ctrl-C stop both;
    # so does mlflow's own exit, which would leave uvicorn behind.
    child = subprocess.Popen(command, env=os.environ | env, start_new_session=True)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            child.wait()
        for sig in handlers:  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        return stop_group(child)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_group(child: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGTERM to the child's whole process group, SIGKILL to what is left after `grace_s`;
    returns once no process of the group remains. The child's exit status."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    while time.monotonic() < deadline + 2.0:  # after SIGKILL, 2 s more for the kernel
        if child.poll() is not None:  # the leader is reaped first: its status is kept
            with contextlib.suppress(ChildProcessError):  # as PID 1, orphans are ours to reap
                os.waitpid(-child.pid, os.WNOHANG)
        try:
            os.killpg(child.pid, 0)  # raises once the group is empty
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        time.sleep(0.1)
    return child.wait()


def _create_mysql_database(uri: str) -> None:
    try:
        import pymysql
    except ImportError:
        raise ServerSetupError("a MySQL store needs pymysql: `pip install pymysql`") from None

    parts = urlsplit(uri)
    database = parts.path.lstrip("/")
    if not database.replace("_", "").isalnum():
        raise ServerSetupError(f"MySQL database name {database!r} must be letters, digits and _")
    try:
        connection = pymysql.connect(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 3306,
            user=parts.username or "root",
            password=unquote(parts.password or ""),
            connect_timeout=10,
        )
    except pymysql.MySQLError as exc:
        raise ServerSetupError(
            f"MySQL at {redact_url(uri)} is unreachable ({exc.args[-1]}); "
            "start it with `docker compose up -d mysql`"
        ) from None
    with connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{database}` CHARACTER SET utf8mb4")


def _create_bucket(destination: str, endpoint_url: str | None) -> None:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ServerSetupError("S3 artifacts need boto3: `pip install boto3`") from None

    bucket = urlsplit(destination).netloc
    client = boto3.client("s3", endpoint_url=endpoint_url)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        try:
            client.create_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ServerSetupError(f"cannot create the bucket {bucket}: {exc}") from None
    except BotoCoreError as exc:
        raise ServerSetupError(f"S3 at {endpoint_url or 'AWS'} is unreachable: {exc}") from None
