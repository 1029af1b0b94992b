"""The dtype the transformers engine computes in: bfloat16 where it is both fast and close enough.

On CUDA, `dtype=auto` is bfloat16 (float16 on GPUs without it), as everywhere. On a CPU,
bfloat16 halves the bytes of weights read per decoding step and, with the AVX512-BF16 or AMX
instructions, doubles the rate of the matrix products; without them torch emulates it slowly.
So `auto` picks bfloat16 only on a CPU with those instructions, and only once the quality gate
has compared it with float32 on the shipped evaluation set (measured once per model directory
and cached); otherwise float32.
"""

import hashlib
import json
import logging
from pathlib import Path

from ..settings import Settings
from .quality import (
    EVAL_DIR,
    EvalSet,
    GateReport,
    Reference,
    Thresholds,
    TorchEngine,
    evaluate,
    judge,
)

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of native bfloat16 matrix products: x86 (AVX512-BF16, AMX), Arm (BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of this CPU ("flags" on x86, "Features" on Arm)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no flags, so no bfloat16 on the CPU
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    return bool(BF16_CPU_FLAGS & (cpu_flags() if flags is None else flags))


def resolve_dtype(settings: Settings, model_dir: Path, device: str) -> str:
    """The dtype to load `model_dir` in on `device` ("cpu" or "cuda") for these settings."""
    if settings.dtype != "auto":
        return settings.dtype
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if not cpu_has_bf16():
        return "float32"
    report = gate(settings, model_dir, "bfloat16")
    if report.passed:
        return "bfloat16"
    log.warning("bfloat16 refused by the quality gate (%s): serving float32", report.why())
    return "float32"


def verdict_file(settings: Settings, model_dir: Path, dtype: str) -> Path:
    path = str(model_dir.resolve())
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    return settings.cache_dir / "gates" / f"{model_dir.name}-{digest}-{dtype}.json"


def gate(settings: Settings, model_dir: Path, dtype: str) -> GateReport:
    """The quality gate's verdict on `model_dir` computed in `dtype` on the CPU, against float32.

    The measurements are stored with the torch version they were taken with and measured again
    when it changes (about a minute for the bundled model); the settings' thresholds judge them
    on every call, so changing a threshold measures nothing again.
    """
    import torch

    thresholds = Thresholds.from_settings(settings)
    stored = verdict_file(settings, model_dir, dtype)
    if stored.is_file():
        saved = json.loads(stored.read_text())
        if saved.get("torch") == torch.__version__:
            return judge(GateReport.from_json(saved["gate"]), thresholds)
    log.info("[gate] %s against float32 for %s (once; cached in %s)", dtype, model_dir, stored)
    reference = Reference(model_dir, EvalSet.load(EVAL_DIR))
    report = evaluate(
        reference,
        TorchEngine(reference, dtype),
        dtype,
        thresholds,
        on_step=lambda step: log.info("[gate] %s", step),
    )
    log.info("[gate] %s: %s (top-1 agreement %.1f%%)", dtype, report.why(), 100 * report.top1)
    stored.parent.mkdir(parents=True, exist_ok=True)
    partial = stored.with_suffix(".tmp")
    partial.write_text(json.dumps({"torch": torch.__version__, "gate": report.to_json()}) + "\n")
    partial.replace(stored)
    return report
