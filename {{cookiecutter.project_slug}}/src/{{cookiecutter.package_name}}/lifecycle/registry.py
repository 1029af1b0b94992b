"""The Model Registry: log the served model as an MLflow model, register it, move its aliases,
and fetch a registered version (`models:/<name>@<alias>` or `models:/<name>/<version>`) into the
cache as a directory the engines load.

A transformers model is logged with the transformers flavor.
{%- if cookiecutter.inference_backend == "ctranslate2" %} A CTranslate2 model is logged
as a pyfunc from a code file (`ct2_pyfunc.py`: a `Generator` cannot be pickled), with the
package's code.
{%- endif %}
"""

import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..errors import ModelSourceError, one_line
from ..settings import ENV_PREFIX, redact_url
from .cache import COMPLETE_MARKER
from .tracking import Run, TrackingError

log = logging.getLogger(__name__)
{%- if cookiecutter.inference_backend == "ctranslate2" %}
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole package, logged with a pyfunc
{%- endif %}
MODEL_URI = re.compile(r"^models:/(?P<name>[\w.-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    model_uri: str  # models:/<name>/<version>


def pinned(*packages: str) -> list[str]:
    """`name==version` of each installed package (local builds such as +cpu dropped)."""
    found = []
    for package in packages:
        try:
            found.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return found


def log_model(run: Run, model_dir: Path, engine: str) -> str:
    """Log the model in `model_dir` to `run` as an MLflow model; return its model URI.

{%- if cookiecutter.inference_backend == "ctranslate2" %}
    `engine` is "transformers" (a Hugging Face directory) or "ctranslate2" (a converted one).
{%- else %}
    `engine` is "transformers" (a Hugging Face directory).
{%- endif %}
    Raises TrackingError when tracking is off: a registered model needs its run.
    """
    if not run.run_id:
        raise TrackingError(
            f"registering a model needs MLflow tracking; unset {ENV_PREFIX}TRACKING=false"
        )
    import mlflow

    mlflow.set_tracking_uri(run.client.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
{%- if cookiecutter.inference_backend == "ctranslate2" %}
        if engine == "ctranslate2":
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PACKAGE_DIR / "lifecycle" / "ct2_pyfunc.py"),
                artifacts={"model": str(model_dir)},
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pinned("ctranslate2", "tokenizers", "jinja2", "numpy", "pydantic"),
            )
        else:
            info = _log_transformers(model_dir)
{%- else %}
        info = _log_transformers(model_dir)
{%- endif %}
    return info.model_uri


def _log_transformers(model_dir: Path) -> Any:
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The dict form: logging from a checkpoint path fails in MLflow 3.17 with transformers 5.
    # No torchvision in pip_requirements: MLflow would look for it.
    components = {
        "model": AutoModelForCausalLM.from_pretrained(model_dir),
        "tokenizer": AutoTokenizer.from_pretrained(model_dir),
    }
    return mlflow.transformers.log_model(
        components,
        name="model",
        task="text-generation",
        pip_requirements=pinned("transformers", "torch", "accelerate", "safetensors"),
    )


def register(tracking_uri: str, model_uri: str, name: str) -> Registered:
    """Register `model_uri` as a new version of `name` (created on first use); return it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    created = mlflow.register_model(model_uri, name, await_registration_for=300)
    log.info("registered %s as %s version %s", model_uri, name, created.version)
    return Registered(name, str(created.version), f"models:/{name}/{created.version}")


def set_alias(tracking_uri: str, name: str, alias: str, model_version: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(name, alias, model_version)
    log.info("%s@%s -> version %s", name, alias, model_version)


def alias_version(tracking_uri: str, name: str, alias: str) -> Any | None:
    """The ModelVersion `name@alias` points to, or None when the alias (or model) is unset."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    baseline_loss: float
    baseline: str  # what the candidate was compared with, in words


def champion_baseline(
    tracking_uri: str, name: str, alias: str, eval_digest: str, base_loss: float
) -> tuple[float, str]:
    """(eval loss, in words) that a candidate must beat to take `name@alias`: the holder's
    `eval_loss` tag on the same eval data (`eval_digest`); for a holder without one, or no holder
    at all, the base model's loss (`base_loss`)."""
    holder = alias_version(tracking_uri, name, alias)
    tags = dict(holder.tags) if holder is not None else {}
    if holder is not None and tags.get("eval_data") == eval_digest and "eval_loss" in tags:
        return float(tags["eval_loss"]), f"{name}@{alias} (version {holder.version})"
    unmeasured = f" ({name}@{alias} has no eval loss on this data)" if holder else ""
    return base_loss, f"the base model{unmeasured}"


def promote_if_better(
    tracking_uri: str,
    candidate: Registered,
    alias: str,
    eval_loss: float,
    eval_digest: str,
    base_loss: float,
    engine: str,
    eligible: bool = True,
) -> Promotion:
    """Point `alias` at `candidate` only if it is `eligible` and its eval loss beats
    `champion_baseline`'s, read now. Tags the candidate with its loss and engine either way."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags = {"eval_loss": f"{eval_loss:.6f}", "eval_data": eval_digest, "engine": engine}
    for key, value in tags.items():
        client.set_model_version_tag(candidate.name, candidate.version, key, value)
    baseline_loss, baseline = champion_baseline(
        tracking_uri, candidate.name, alias, eval_digest, base_loss
    )
    promoted = eligible and eval_loss < baseline_loss
    if promoted:
        set_alias(tracking_uri, candidate.name, alias, candidate.version)
    return Promotion(promoted, baseline_loss, baseline)


def fetch_registered(spec: str, models_dir: Path, tracking_uri: str) -> Path:
    """A local directory holding the registered model `spec` names, downloaded once per version.

    Raises ModelSourceError for a malformed URI, an unknown name, alias or version, an
    unreachable registry or a model that no engine of this project can serve.
    """
    match = MODEL_URI.match(spec)
    if match is None:
        raise ModelSourceError(
            f"model {spec!r} is not models:/<name>@<alias> or models:/<name>/<version>"
        )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from .tracking import TrackingError, check_server

    name = match["name"]
    try:
        check_server(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if match["alias"]:
            found = client.get_model_version_by_alias(name, match["alias"])
        else:
            found = client.get_model_version(name, match["version"])
    except TrackingError as exc:
        raise ModelSourceError(str(exc)) from None
    except MlflowException as exc:
        first = one_line(exc, 200)
        raise ModelSourceError(
            f"model {spec!r} is not in the registry at {redact_url(tracking_uri)}: {first}"
        ) from None
    # Versions are numbered per registry: the key names the registry and what was registered.
    origin = hashlib.sha256(f"{tracking_uri}\n{found.source}".encode()).hexdigest()[:10]
    target = models_dir / "registry" / name / f"v{found.version}-{origin}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    log.info("downloading %s (version %s) from the registry", spec, found.version)
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".registry.") as tmp:
        import mlflow.artifacts

        downloaded = Path(
            mlflow.artifacts.download_artifacts(
                # Not models:/...: MLflow resolves that in the default registry, whatever
                # registry_uri says. The version's own location, from this registry's client.
                client.get_model_version_download_uri(name, found.version),
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
        )
        staged = _servable(downloaded, spec)
        (staged / COMPLETE_MARKER).write_text(json.dumps({"model_uri": spec}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(target)
    return target


def _servable(downloaded: Path, spec: str) -> Path:
    """The engine directory inside a downloaded MLflow model."""
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    # A pyfunc keeps each artifact under artifacts/<the logged directory's name>.
    ct2 = [d for d in (downloaded / "artifacts").glob("*") if (d / "model.bin").is_file()]
    if ct2:
        return ct2[0]
{%- endif %}
    weights, tokenizer = downloaded / "model", downloaded / "components" / "tokenizer"
    if (weights / "config.json").is_file():
        for item in tokenizer.glob("*") if tokenizer.is_dir() else []:
            shutil.copy2(item, weights / item.name)
        return weights
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    raise ModelSourceError(f"{spec} is neither a transformers nor a CTranslate2 model")
{%- else %}
    raise ModelSourceError(f"{spec} is not a transformers model")
{%- endif %}
