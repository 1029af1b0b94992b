"""Convert a model to CTranslate2, quantize it, and publish it only if it passes the quality gate.

A published model lives in `<cache>/ct2/<model>-<quantization>/` with `model_meta.json` (source,
quantization, context window, gate report). Conversion and the gate need torch; serving does not:
`ensure_converted` runs a missing conversion in a child process.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..engine.cores import default_threads
from ..engine.ct2 import META_FILE, Banded
from ..engine.tokenizer import TOKENIZER_FILES
from ..errors import ModelSourceError
from ..settings import ENV_PREFIX, Settings
from .quality import EVAL_DIR, EvalSet, GateReport, Reference, Thresholds, evaluate
from .refusals import forget, refused_before, remember
from .sources import check_model, resolve_for

log = logging.getLogger(__name__)

CPU_SCHEMES = ("int8", "int8_float32", "int16", "int8_weights", "float32")
CUDA_SCHEMES = ("int8_float16", "float16", "bfloat16", "int8", "float32")
# Tried fastest first by quantization=auto (int8_float32 computes as int8 on a CPU).
# int8_weights is a quarter of float32 on disk but served 0.75x its throughput in `bench`.
AUTO_ORDER = {
    "cpu": ("int8", "int16", "float32", "int8_weights"),
    "cuda": ("int8_float16", "float16", "float32"),
}
# Schemes that are not CTranslate2 compute types: (stored quantization, compute type).
# int8_weights stores int8 weights and computes in float32: weight-only quantization, which
# leaves the activations (where int8 hurts small models) in float.
COMPOSITE = {"int8_weights": ("int8", "float32")}


def ct2_types(scheme: str) -> tuple[str, str]:
    """(quantization to store, compute type to run) of a scheme."""
    return COMPOSITE.get(scheme, (scheme, scheme))


class QualityGateError(RuntimeError):
    """A converted model is too far from its reference to be published."""


def model_key(spec: str) -> str:
    """A folder name for a model spec: readable, and unique for local paths."""
    if spec.startswith("bundled:"):
        return spec.removeprefix("bundled:")
    if spec.startswith(("/", "./", "../", "~")):
        path = str(Path(spec).expanduser().resolve())
        return f"{Path(path).name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return re.sub(r"[^\w.-]+", "--", spec)


def published_dir(settings: Settings, scheme: str) -> Path:
    return settings.cache_dir / "ct2" / f"{model_key(settings.model)}-{scheme}"


def auto_pointer(settings: Settings) -> Path:
    return settings.cache_dir / "ct2" / f"{model_key(settings.model)}-auto.json"


def find_published(settings: Settings) -> tuple[Path, str] | None:
    """(directory, scheme) of the published model the settings ask for, if it exists."""
    scheme = settings.quantization
    if scheme == "auto":
        pointer = auto_pointer(settings)
        if not pointer.is_file():
            return None
        scheme = json.loads(pointer.read_text())["scheme"]
    directory = published_dir(settings, scheme)
    return (directory, scheme) if (directory / META_FILE).is_file() else None


def registered_ct2(settings: Settings) -> tuple[Path, str] | None:
    """(directory, scheme) when the settings' model is a registered CTranslate2 model; a
    registered transformers model is converted like any other (`ensure_converted`)."""
    if not settings.model.startswith("models:/"):
        return None
    model_dir = resolve_for(settings)
    if not (model_dir / META_FILE).is_file():
        return None
    return model_dir, json.loads((model_dir / META_FILE).read_text())["quantization"]


def ensure_converted(settings: Settings) -> tuple[Path, str]:
    """The published CTranslate2 model for `settings`, converting it first in a child process.

    The child keeps torch out of this (serving) process. Raises ModelSourceError if it fails.
    """
    if settings.model.startswith("models:/"):  # converted per downloaded version
        settings = settings.model_copy(update={"model": str(resolve_for(settings))})
    found = find_published(settings)
    if found is None:
        check_model(settings)
        log.info("no converted model for %s: running convert", settings.model)
        package = __name__.partition(".")[0]
        # The child converts the model of these settings, whatever the environment says.
        overrides = {"MODEL": settings.model, "QUANTIZATION": settings.quantization}
        child = subprocess.Popen(
            [sys.executable, "-m", package, "convert"],
            env=os.environ | {f"{ENV_PREFIX}{k}": v for k, v in overrides.items()},
            stderr=subprocess.PIPE,
            text=True,
        )
        error = "the model could not be converted to CTranslate2"
        for line in child.stderr or []:  # progress passes through; the error line is ours
            if line.startswith("error: "):
                error = line.removeprefix("error: ").strip()
            else:
                sys.stderr.write(line)
        found = find_published(settings)
        if child.wait() != 0 or found is None:
            raise ModelSourceError(error)
    return found


def convert(
    settings: Settings,
    hf_dir: Path,
    schemes: list[str],
    force: bool = False,
    stop_at_first_pass: bool = False,
) -> list[GateReport]:
    """Convert `hf_dir` with each scheme, gate it against the float reference, publish passes.

    With `force`, failing schemes are published too. Returns the gate reports in order.
    """
    thresholds = Thresholds.from_settings(settings)
    reference: Reference | None = None
    reports = []
    for scheme in schemes:
        report = None
        if not force:
            report = already_published(settings, hf_dir, scheme) or refused_before(
                published_dir(settings, scheme), hf_dir, gate_device(), thresholds
            )
        if report is None:
            if reference is None:
                log.info("computing the float reference on the evaluation set (%s)", EVAL_DIR)
                reference = Reference(hf_dir, EvalSet.load(EVAL_DIR))
            report = convert_one(settings, hf_dir, scheme, reference, thresholds, force)
        reports.append(report)
        if report.passed and stop_at_first_pass:
            break
    if settings.quantization == "auto":
        passed = {r.scheme for r in reports if r.passed}
        best = next((s for s in AUTO_ORDER[gate_device()] if s in passed), None)
        if best is not None:
            auto_pointer(settings).write_text(json.dumps({"scheme": best}) + "\n")
    return reports


def convert_one(
    settings: Settings,
    hf_dir: Path,
    scheme: str,
    reference: Reference,
    thresholds: Thresholds,
    force: bool,
) -> GateReport:
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    target = published_dir(settings, scheme)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion of a model and scheme at a time; each stages in its own folder and swaps
    # it in with renames, so a reader never sees a half-written or missing model.
    with (
        _locked(target.parent / f".{target.name}.lock"),
        tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp,
    ):
        staging = Path(tmp) / "model"
        log.info("[%s] converting %s", scheme, hf_dir)
        copy = [str(hf_dir / f) for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
        converter = TransformersConverter(str(hf_dir), copy_files=copy)
        stored, compute = ct2_types(scheme)
        converter.convert(str(staging), quantization=stored)
        try:
            generator = ctranslate2.Generator(
                str(staging),
                device=gate_device(),
                compute_type=compute,
                intra_threads=settings.intra_threads or default_threads(),
            )
        except ValueError as exc:  # a GPU compute type on a CPU
            raise ModelSourceError(f"cannot run {scheme} here: {exc}") from None
        report = evaluate(
            reference,
            Banded(generator),  # the evaluation prompts' lengths differ (see `length_bands`)
            scheme,
            thresholds,
            on_step=lambda s: log.info("[gate] %s", s),
        )
        del generator
        meta = {
            "source": settings.model,
            "source_dir": str(hf_dir),
            "quantization": scheme,
            "context_window": _context_window(hf_dir),
            "gate": report.to_json(),
            "forced": force and not report.passed,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if not report.passed and not force:
            log.warning("[%s] refused by the quality gate: %s", scheme, report.why())
            remember(target, hf_dir, gate_device(), report)
            return report
        forget(target)
        if target.exists():
            target.rename(Path(tmp) / "old")
        staging.rename(target)
    log.info("[%s] published %s", scheme, target)
    return report


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) while the block runs."""
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def already_published(settings: Settings, hf_dir: Path, scheme: str) -> GateReport | None:
    """The stored gate report of `scheme` if it was published from `hf_dir`, else None."""
    target = published_dir(settings, scheme)
    if not (target / META_FILE).is_file():
        return None
    meta = json.loads((target / META_FILE).read_text())
    if meta.get("source_dir") != str(hf_dir):
        return None
    log.info("[%s] already published in %s (use --force to redo)", scheme, target)
    return GateReport.from_json(meta["gate"])


def gate_device() -> str:
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def schemes_for(quantization: str, everything: bool, device: str) -> list[str]:
    """The schemes `convert` tries. `auto` and `--all` leave out those this device cannot
    compute (int16 needs CPU instructions some x86 CPUs lack); an explicit choice is kept,
    so that its failure is reported."""
    if quantization != "auto" and not everything:
        return [quantization]
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types(device)
    every = (CUDA_SCHEMES if device == "cuda" else CPU_SCHEMES) if everything else None
    candidates = every or AUTO_ORDER[device]
    runnable = [s for s in candidates if ct2_types(s)[1] in supported]
    skipped = [s for s in candidates if s not in runnable]
    if skipped:
        log.info("skipping %s: not computed efficiently on this %s", ", ".join(skipped), device)
    return runnable


def _context_window(hf_dir: Path) -> int:
    config = json.loads((hf_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)
