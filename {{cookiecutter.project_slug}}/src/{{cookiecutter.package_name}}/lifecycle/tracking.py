"""MLflow tracking: one run per job (batch, bench, worker, finetune) with its params, metrics and
files.

Without a tracking URI the store is local to the project (`tracking_dir/mlflow.db`, artifacts in
`tracking_dir/artifacts`): no server needed. `MLFLOW_TRACKING_URI` points at a server. Runs are
written through `MlflowClient` with an explicit run id, so any thread may log to them. Params are
an explicit list of settings, never a dump of them: URLs with passwords never reach MLflow.
"""

import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import one_line
from ..settings import Settings, redact_url

log = logging.getLogger(__name__)

# MLflow retries an unreachable server for minutes; fail fast instead (checked up front).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or refuses a request; one line says which."""


def tracking_uri(settings: Settings) -> str:
    """The tracking URI: the configured server, or the project's local SQLite store."""
    if settings.tracking_uri:
        return settings.tracking_uri
    return f"sqlite:///{local_store(settings) / 'mlflow.db'}"


def local_store(settings: Settings) -> Path:
    return settings.tracking_dir.expanduser().resolve()


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingError if `uri` is an HTTP tracking server that does not answer /health."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as answer:
            if answer.status == 200:
                return
            reason = f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        cause = getattr(exc, "reason", exc)  # "Connection refused", not "[Errno 111] ..."
        reason = getattr(cause, "strerror", None) or str(cause)
    raise TrackingError(
        f"the MLflow tracking server at {redact_url(uri)} is unreachable ({reason}); start it "
        "with `make mlflow-server`, or unset MLFLOW_TRACKING_URI to track into the local store"
    )


class Run:
    """An open MLflow run; without a client (tracking off) one that logs nothing. NaN metrics
    are skipped (MLflow would store them as NaN)."""

    def __init__(self, client: Any = None, run_id: str = "") -> None:
        self.client = client
        self.run_id = run_id

    def where(self) -> str:
        """The suffix "; tracked as MLflow run <id>" for a job's last line ("" untracked)."""
        return f"; tracked as MLflow run {self.run_id}" if self.client else ""

    def log_params(self, params: Mapping[str, object]) -> None:
        if not self.client:
            return
        from mlflow.entities import Param

        values = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
        self.client.log_batch(self.run_id, params=values)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        self.client.log_batch(self.run_id, metrics=values)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory's contents under `artifact_path`."""
        if not self.client:
            return
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        for key, value in tags.items() if self.client else ():
            self.client.set_tag(self.run_id, key, str(value))


def client_for(settings: Settings) -> Any:
    """An MlflowClient on the settings' tracking URI (checked first when it is a server)."""
    uri = tracking_uri(settings)
    check_server(uri)
    if not settings.tracking_uri:
        local_store(settings).mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:  # e.g. a file: store, which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE=true
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as exc:
        message = one_line(exc).replace(uri, redact_url(uri))
        raise TrackingError(f"MLflow refused {redact_url(uri)}: {message}") from None


def experiment_id(client: Any, settings: Settings) -> str:
    """The id of the settings' experiment, created on first use (artifacts beside a local
    store; a server chooses its own artifact location)."""
    found = client.get_experiment_by_name(settings.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if not settings.tracking_uri:
        location = (local_store(settings) / "artifacts").as_uri()
    return client.create_experiment(settings.experiment, artifact_location=location)


@contextmanager
def start_run(
    settings: Settings, kind: str, params: Mapping[str, object] | None = None
) -> Iterator[Run]:
    """Open a run of `kind` (batch, bench, worker, finetune, register) with `params`; yield it.

    The run ends FINISHED, KILLED if the job was interrupted (Ctrl-C, or SIGTERM turned into
    KeyboardInterrupt), or FAILED if the block raises. With tracking off, yields a run that
    logs nothing. Raises TrackingError when the tracking server is unreachable.
    """
    if not settings.tracking:
        yield Run()
        return
    from mlflow.exceptions import MlflowException

    client = client_for(settings)
    try:
        run = client.create_run(
            experiment_id(client, settings),
            run_name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"kind": kind},
        )
    except MlflowException as exc:
        raise TrackingError(f"MLflow refused to open a run: {one_line(exc)}") from None
    handle = Run(client, run.info.run_id)
    log.info("tracking %s run %s in %s", kind, handle.run_id, redact_url(tracking_uri(settings)))
    if params:
        handle.log_params(params)
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(handle.run_id, status)


def output_tag(path: Path) -> str:
    """A tag value naming a job's output file (a digest: any path is a safe filter value)."""
    import hashlib

    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def end_interrupted_runs(settings: Settings, kind: str, output: Path) -> int:
    """Mark KILLED the runs of `kind` for `output` still RUNNING: their process was killed
    (kill -9, power loss) before it could end them. Returns how many were ended."""
    if not settings.tracking:
        return 0
    client = client_for(settings)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        return 0
    stale = client.search_runs(
        [experiment.experiment_id],
        filter_string=(
            f"tags.kind = '{kind}' and tags.output = '{output_tag(output)}' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    for run in stale:
        client.set_terminated(run.info.run_id, "KILLED")
        log.info("run %s of an interrupted %s ended as KILLED", run.info.run_id, kind)
    return len(stale)


def settings_params(settings: Settings) -> dict[str, object]:
    """The settings a run's results depend on: model, batching and generation. An allow-list:
    anything that may hold a secret (broker and store URLs) is left out by construction."""
    from .cache import model_revision

    params: dict[str, object] = {
        "model": settings.model,
        "model_revision": model_revision(settings.model),
        "device": settings.device,
        "num_threads": settings.num_threads,
        "max_batch_size": settings.max_batch_size,
        "max_wait_ms": settings.max_wait_ms,
        "max_batch_tokens": settings.max_batch_tokens,
        "sort_by_length": settings.sort_by_length,
        "scheduling": settings.scheduling,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "context_window": settings.context_window,
        "system_prompt": settings.system_prompt,
    }
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    params |= {
        "backend": settings.backend,
        "quantization": settings.quantization,
        "inter_threads": settings.inter_threads,
        "intra_threads": settings.intra_threads,
    }
{%- else %}
    params |= {"backend": "transformers", "dtype": settings.dtype}
{%- endif %}
    return params
