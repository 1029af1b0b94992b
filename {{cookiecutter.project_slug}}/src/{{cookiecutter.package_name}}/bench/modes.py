"""The benchmark's modes: their names, which ones this project offers, and what one measures.

Every mode serves the same prompts greedily with a fixed `max_new_tokens`, after a warm-up, and
counts only generated tokens. Modes:

- `naive`: transformers in float32, one request at a time: the baseline of every ratio.
- `batched`: the same float32 model with the dynamic batcher, all requests at once (closed loop).
- `batched-bf16`: the same in bfloat16, where `dtype=auto` would choose it (a CPU with bfloat16
  instructions whose gate passed, or CUDA).
- `continuous`, `continuous-bf16`: the same models with continuous batching (requests join and
  leave the running batch between decode steps), as the worker serves on transformers.
{%- if cookiecutter.inference_backend == "ctranslate2" %}
- `ct2-<scheme>`: CTranslate2 with each published scheme that passed the quality gate.
{%- endif %}
- `worker`: end to end through RabbitMQ and one worker process (closed loop), then its latency
  when idle (one request at a time) and under an open-loop Poisson load at a fraction of the
  saturation rate it just measured; it serves with the configured engine, so its throughput is
  compared with the in-process mode of that engine.
{%- if cookiecutter.worker_runtime == "ray" %}
- `worker-ray`: the same through `worker --replicas 2`.
{%- endif %}
"""

import json
import math
from dataclasses import dataclass, field

from ..settings import Settings

TRANSFORMERS_MODES = ("naive", "batched", "batched-bf16", "continuous", "continuous-bf16")
{%- if cookiecutter.worker_runtime == "ray" %}
WORKER_MODES = ("worker", "worker-ray")
{%- else %}
WORKER_MODES = ("worker",)
{%- endif %}
{%- if cookiecutter.inference_backend == "ctranslate2" %}
CT2_PREFIX = "ct2-"  # + a CTranslate2 compute type (scheme)
{%- endif %}


class UnknownModeError(ValueError):
    """A mode this project does not have; the message lists the ones it has."""


@dataclass
class ModeResult:
    """What one mode measured: the requests served, how long they took, the peak memory."""

    mode: str
    inputs: int
    seconds: float
    completion_tokens: int
    latencies_ms: list[float] = field(repr=False)
    peak_rss_mib: float
    errors: int = 0
    note: str = ""

    @property
    def inputs_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else math.nan


def bench_request(raw: bytes, max_new_tokens: int) -> dict:
    """A request line as every mode sends it: greedy, with the benchmark's `max_new_tokens`."""
    return json.loads(raw) | {"max_new_tokens": max_new_tokens, "temperature": 0.0}


def check_modes(modes: list[str]) -> None:
    """Raise UnknownModeError naming the first mode this project does not have."""
    known = {*TRANSFORMERS_MODES, *WORKER_MODES}
    for mode in modes:
{%- if cookiecutter.inference_backend == "ctranslate2" %}
        if mode not in known and not _is_ct2_mode(mode):
            listed = ", ".join([*sorted(known), f"{CT2_PREFIX}<scheme>"])
{%- else %}
        if mode not in known:
            listed = ", ".join(sorted(known))
{%- endif %}
            raise UnknownModeError(f"unknown bench mode {mode!r}; modes: {listed}")
{%- if cookiecutter.inference_backend == "ctranslate2" %}


def _is_ct2_mode(mode: str) -> bool:
    if not mode.startswith(CT2_PREFIX):
        return False
    from ..lifecycle.quantize import CPU_SCHEMES, CUDA_SCHEMES

    return mode.removeprefix(CT2_PREFIX) in CPU_SCHEMES + CUDA_SCHEMES
{%- endif %}


def engine_mode(settings: Settings) -> str:
    """The in-process mode computing like the configured engine, the one the worker serves with."""
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.backend == "ctranslate2":
        from ..lifecycle.quantize import find_published

        found = find_published(settings)
        return f"{CT2_PREFIX}{found[1] if found else settings.quantization}"
{%- endif %}
    mode = "continuous" if settings.scheduling == "continuous" else "batched"
    return f"{mode}-bf16" if _auto_is_bf16(settings) else mode


def _auto_is_bf16(settings: Settings) -> bool:
    from ..engine.hf import pick_device
    from ..lifecycle.precision import resolve_dtype
    from ..lifecycle.sources import resolve_for

    device = pick_device(settings.device).type
    return resolve_dtype(settings, resolve_for(settings), device) == "bfloat16"


def default_modes(settings: Settings) -> list[str]:
    """The modes run by default: naive, batched, then batched-bf16 and continuous-bf16 where
    `auto` would pick bfloat16 (else continuous),
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    every CTranslate2 scheme published as passing the gate,
{%- endif %}
    and the worker(s)."""
    modes = ["naive", "batched"]
    if _auto_is_bf16(settings.model_copy(update={"dtype": "auto"})):
        modes += ["batched-bf16", "continuous-bf16"]
    else:
        modes.append("continuous")
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    from ..lifecycle.quantize import CPU_SCHEMES, CUDA_SCHEMES, published_dir

    for scheme in dict.fromkeys(CPU_SCHEMES + CUDA_SCHEMES):
        meta = published_dir(settings, scheme) / "model_meta.json"
        if meta.is_file() and json.loads(meta.read_text())["gate"]["passed"]:
            modes.append(f"{CT2_PREFIX}{scheme}")
{%- endif %}
    return modes + list(WORKER_MODES)
