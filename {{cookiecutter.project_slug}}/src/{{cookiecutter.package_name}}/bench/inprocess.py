"""The in-process modes: one engine, loaded here, serving the prompt set; see `bench.modes`.

`run_in_process` is what a benchmark child process runs (`bench.child`): its peak memory is
this process's own, so it must not run in the process that runs the other modes.
"""

import json
import resource
import time
from pathlib import Path
from typing import Any

from ..bench.modes import (
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    CT2_PREFIX,
{%- endif %}
    TRANSFORMERS_MODES,
    ModeResult,
    bench_request,
)
from ..messages import Reply
from ..settings import Settings


def run_in_process(mode: str, settings: Settings, prompts: Path, max_new_tokens: int) -> ModeResult:
    """Load the engine of `mode`, warm it up, then time it serving every prompt of `prompts`."""
    from ..engine.service import InferenceService, serve_lines
    from ..serving.replies import read_requests

    settings = settings.model_copy(update={"temperature": 0.0})
    service = InferenceService.from_settings(settings, _backend(mode, settings))
    lines = [
        (i, json.dumps(bench_request(raw, max_new_tokens)).encode())
        for i, raw in read_requests(prompts)
    ]
    serve = _serve_continuous if mode.startswith("continuous") else serve_lines
    serve(service, settings, lines[:2])  # warm-up, not timed
    started = time.perf_counter()
    if mode == "naive":
        replies = []
        for fallback_id, raw in lines:
            one_started = time.perf_counter()
            reply = serve_lines(service, settings, [(fallback_id, raw)])[0]
            reply.latency_ms = (time.perf_counter() - one_started) * 1000.0
            replies.append(reply)
    else:
        replies = serve(service, settings, lines)
    seconds = time.perf_counter() - started
    served = [r for r in replies if r.error is None]
    return ModeResult(
        mode=mode,
        inputs=len(replies),
        seconds=seconds,
        completion_tokens=sum(r.usage.completion_tokens for r in served),
        latencies_ms=[r.latency_ms for r in served],
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        errors=len(replies) - len(served),
    )


def _serve_continuous(
    service: Any, settings: Settings, lines: list[tuple[str, bytes]]
) -> list[Reply]:
    """Replies to `lines` in order, every valid one through one continuous batcher."""
    batcher = service.continuous(settings.model_copy(update={"scheduling": "continuous"}))
    admitted = [service.admit(raw, fallback_id) for fallback_id, raw in lines]
    valid = [a for a in admitted if not isinstance(a, Reply)]
    served = iter(service.run_continuous(batcher, valid))
    return [a if isinstance(a, Reply) else next(served) for a in admitted]


def _backend(mode: str, settings: Settings) -> Any:
    """The engine of a mode, loaded by the same factory as the service's."""
    from ..lifecycle.loading import load_backend

    if mode in TRANSFORMERS_MODES:
        dtype = "bfloat16" if mode.endswith("-bf16") else "float32"
{%- if cookiecutter.inference_backend == "ctranslate2" %}
        return load_backend(settings.model_copy(update={"backend": "transformers", "dtype": dtype}))
{%- else %}
        return load_backend(settings.model_copy(update={"dtype": dtype}))
{%- endif %}
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if mode.startswith(CT2_PREFIX):
        scheme = mode.removeprefix(CT2_PREFIX)
        engine = {"backend": "ctranslate2", "quantization": scheme}
        return load_backend(settings.model_copy(update=engine))
{%- endif %}
    raise ValueError(f"unknown bench mode {mode!r}")
