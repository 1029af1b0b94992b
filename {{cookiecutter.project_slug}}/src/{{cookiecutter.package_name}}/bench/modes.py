"""The benchmark's modes: their names, which ones this project has, and how each measures.

Every mode serves the same prompts greedily with a fixed `max_new_tokens`, after a warm-up, and
counts only generated tokens (docs/benchmarks.md says what each one measures): `naive` is
transformers in float32, one request at a time, the baseline of every ratio; `batched` adds the
dynamic batcher, `continuous` continuous batching, `-bf16` bfloat16 where `auto` would pick it;
{%- if cookiecutter.inference_backend == "ctranslate2" %}
`ct2-<scheme>` is CTranslate2 with a scheme published as passing the quality gate;
{%- endif %}
the worker modes go end to end through RabbitMQ and a worker process. The in-process modes run
here (`run_in_process`), each in a child process of its own (`bench.child`)."""

import contextlib
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..messages import Reply
from ..settings import ENV_PREFIX, Settings, SettingsError
from ..stats import Rates, percentile

TRANSFORMERS_MODES = ("naive", "batched", "batched-bf16", "continuous", "continuous-bf16")
{%- if cookiecutter.worker_runtime == "ray" %}
WORKER_MODES = ("worker", "worker-ray")
{%- else %}
WORKER_MODES = ("worker",)
{%- endif %}
{%- if cookiecutter.inference_backend == "ctranslate2" %}
CT2_PREFIX = "ct2-"  # + a CTranslate2 compute type (scheme)
{%- endif %}
PACKAGE = __name__.partition(".")[0]  # the top package: `python -m PACKAGE worker`
{%- if cookiecutter.worker_runtime == "ray" %}
RAY_REPLICAS = 2  # of `worker-ray`
{%- endif %}


class UnknownModeError(SettingsError):
    """A mode this project does not have; the message lists the ones it has."""


@dataclass
class ModeResult(Rates):
    """What one mode measured: the requests served, how long they took, the peak memory."""

    mode: str
    inputs: int
    seconds: float
    completion_tokens: int
    latencies_ms: list[float] = field(repr=False)
    peak_rss_mib: float
    errors: int = 0
    note: str = ""

    @classmethod
    def of(
        cls, mode: str, replies: list[Reply], seconds: float, latencies: list[float], note: str = ""
    ) -> "ModeResult":
        """`replies`, served in `seconds`: an error reply counts as an error, with no tokens."""
        served = [r for r in replies if r.error is None]
        tokens, errors = sum(r.usage.completion_tokens for r in served), len(replies) - len(served)
        return cls(mode, len(replies), seconds, tokens, latencies, 0.0, errors, note)


def bench_request(raw: bytes, max_new_tokens: int) -> bytes:
    """A request line as every mode sends it: greedy, with the benchmark's `max_new_tokens`."""
    request = json.loads(raw) | {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    return json.dumps(request).encode()


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
    """The modes of a `bench` without `--modes`: the bfloat16 ones where `dtype=auto` picks
    bfloat16 (else `continuous`){% if cookiecutter.inference_backend == "ctranslate2" %}, CTranslate2 with each scheme published as passing the gate{% endif %}."""
    if _auto_is_bf16(settings.model_copy(update={"dtype": "auto"})):
        modes = ["naive", "batched", "batched-bf16", "continuous-bf16"]
    else:
        modes = ["naive", "batched", "continuous"]
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    from ..lifecycle.quantize import CPU_SCHEMES, CUDA_SCHEMES, published_dir

    for scheme in dict.fromkeys(CPU_SCHEMES + CUDA_SCHEMES):
        meta = published_dir(settings, scheme) / "model_meta.json"
        if meta.is_file() and json.loads(meta.read_text())["gate"]["passed"]:
            modes.append(f"{CT2_PREFIX}{scheme}")
{%- endif %}
    return modes + list(WORKER_MODES)


def run_in_process(mode: str, settings: Settings, prompts: Path, max_new_tokens: int) -> ModeResult:
    """Load the engine of `mode`, warm it up, then time it serving every prompt of `prompts`;
    its peak memory is this process's, so run it only in a child process of its own."""
    from ..engine.service import InferenceService, serve_lines
    from ..lifecycle.loading import load_backend
    from ..serving.replies import read_requests
{% if cookiecutter.inference_backend == "ctranslate2" %}
    engine = {"backend": "transformers", "dtype": "bfloat16" if "-bf16" in mode else "float32"}
    if mode.startswith(CT2_PREFIX):
        engine = {"backend": "ctranslate2", "quantization": mode.removeprefix(CT2_PREFIX)}
    elif mode not in TRANSFORMERS_MODES:
{%- else %}
    engine = {"dtype": "bfloat16" if mode.endswith("-bf16") else "float32"}
    if mode not in TRANSFORMERS_MODES:
{%- endif %}
        raise ValueError(f"unknown bench mode {mode!r}")
    settings = settings.model_copy(update={"temperature": 0.0})
    backend = load_backend(settings.model_copy(update=engine))
    service = InferenceService.from_settings(settings, backend)
    lines = [(i, bench_request(raw, max_new_tokens)) for i, raw in read_requests(prompts)]
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
    latencies = [r.latency_ms for r in replies if r.error is None]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return replace(ModeResult.of(mode, replies, seconds, latencies), peak_rss_mib=peak)


def _serve_continuous(service: Any, settings: Settings, lines: list[tuple[str, bytes]]) -> list:
    """Replies to `lines` in order, every valid one through one continuous batcher (static
    batches for a model the batcher cannot hold)."""
    batcher = service.continuous(settings.model_copy(update={"scheduling": "continuous"}))
    if batcher is None:
        from ..engine.service import serve_lines

        return serve_lines(service, settings, lines)
    admitted = [service.admit(raw, fallback_id) for fallback_id, raw in lines]
    valid = [a for a in admitted if not isinstance(a, Reply)]
    served = iter(service.run_continuous(batcher, valid))
    return [a if isinstance(a, Reply) else next(served) for a in admitted]


def run_worker(
    settings: Settings, mode: str, prompts: Path, max_new_tokens: int, load: tuple[float, int]
) -> list[ModeResult]:
    """Worker `mode` on queues of its own (deleted afterwards): closed loop (`MODE`), one request
    at a time (`MODE-idle`), Poisson arrivals at a fraction of the closed loop's rate
    (`MODE-open`), all three with the peak memory of the worker's process tree. `load` is
    (that fraction, repetitions): idle and open loop run that many times, and the repetition
    whose open-loop p95 over idle p50 is the median is the one reported."""
    load_fraction, repeats = load
    import pika

    from ..serving.queue.topology import Names, delete
    from ..serving.replies import read_requests

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    lines = read_requests(prompts)  # (fallback id, line): as the in-process modes' ids
    requests = [{"id": i} | json.loads(bench_request(raw, max_new_tokens)) for i, raw in lines]
{%- if cookiecutter.worker_runtime == "ray" %}
    worker = _start_worker(prefix, RAY_REPLICAS if mode == "worker-ray" else 0)
{%- else %}
    worker = _start_worker(prefix)
{%- endif %}
    try:
        _submit(settings, prefix, _renamed(requests[:2], "warm"))
        closed = _submit(settings, prefix, requests, mode, "closed loop")
        closed.peak_rss_mib = _tree_peak_rss_mib(worker.pid)
        rate = load_fraction * closed.inputs_per_s
        note = f"open loop, Poisson {rate:.2f}/s = {load_fraction:.0%} of saturation"
        runs = []
        for rep in range(repeats):  # one at a time (the idle latency), then the open loop
            idle_requests = _renamed(requests[:8], f"idle{rep}")
            idle = _submit(settings, prefix, idle_requests, f"{mode}-idle", "idle", window=1)
            rng = random.Random(rep)
            due, t = [], 0.0  # the arrival times
            for _ in requests:
                due.append(t)
                t += rng.expovariate(rate)
            open_requests = _renamed(requests, f"open{rep}")
            runs.append((idle, _submit(settings, prefix, open_requests, f"{mode}-open", note, due)))
        idle, loaded = median_run(runs)
        idle.peak_rss_mib = loaded.peak_rss_mib = closed.peak_rss_mib
        return [closed, idle, loaded]
    finally:
        worker.terminate()  # SIGTERM: it finishes the batch in hand, then exits
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            worker.kill()
        with pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url)) as connection:
            delete(connection.channel(), Names(prefix))  # the queues of this run


def tail_ratio(idle: ModeResult, loaded: ModeResult) -> float:
    """The open loop's p95 latency over the idle p50: how much load stretches the tail."""
    return percentile(loaded.latencies_ms, 95) / percentile(idle.latencies_ms, 50)


def median_run(runs: list[tuple[ModeResult, ModeResult]]) -> tuple[ModeResult, ModeResult]:
    """The (idle, open loop) repetition whose tail ratio is the median (the lower middle of an
    even count; a repetition with no ratio, nothing served, counts as the highest); its note
    lists every repetition's ratio."""
    ordered = sorted(runs, key=lambda run: (math.isnan(tail_ratio(*run)), tail_ratio(*run)))
    idle, loaded = ordered[(len(ordered) - 1) // 2]
    if len(runs) > 1:
        ratios = ", ".join(f"{tail_ratio(*run):.2f}" for run in runs)
        loaded.note += f"; median of {len(runs)} (p95/idle p50: {ratios})"
    return idle, loaded


def _renamed(requests: list[dict], tag: str) -> list[dict]:
    return [{**r, "id": f"{tag}-{r['id']}"} for r in requests]

{% if cookiecutter.worker_runtime == "ray" %}
def _start_worker(prefix: str, replicas: int) -> subprocess.Popen:
    """Start a worker (with `replicas` Ray replicas, if any) on the queues of `prefix`; return
    once it consumes."""
{%- else %}
def _start_worker(prefix: str) -> subprocess.Popen:
    """Start a worker on the queues of `prefix`; return once it consumes."""
{%- endif %}
    env = os.environ | {f"{ENV_PREFIX}QUEUE_PREFIX": prefix, f"{ENV_PREFIX}TEMPERATURE": "0"}
    env[f"{ENV_PREFIX}TRACKING"] = "false"  # the bench run is the one tracked
    command = [sys.executable, "-m", PACKAGE, "worker"]
{%- if cookiecutter.worker_runtime == "ray" %}
    if replicas:
        command += ["--replicas", str(replicas)]
{%- endif %}
    with tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False) as log:
        worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600.0  # to load the model
{%- if cookiecutter.worker_runtime == "ray" %}
    while Path(log.name).read_text(errors="replace").count("consuming") < max(1, replicas):
{%- else %}
    while "consuming" not in Path(log.name).read_text(errors="replace"):
{%- endif %}
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            raise RuntimeError(f"the worker did not start; see {log.name}")
        time.sleep(0.2)
    return worker


def _submit(
    settings: Settings,
    prefix: str,
    requests: list[dict],
    mode: str = "",
    note: str = "",
    arrivals: list[float] | None = None,
    window: int | None = None,
) -> ModeResult:
    """`requests` sent through the queues of `prefix` and timed, as `mode`."""
    from ..serving.queue.client import Client

    client = Client.from_settings(settings, prefix, window)
    replies: list[Reply] = []
    started = time.perf_counter()
    stats = client.submit(requests, replies.append, arrivals=arrivals)
    return ModeResult.of(mode, replies, time.perf_counter() - started, stats.latencies_ms, note)


def _tree_peak_rss_mib(root: int) -> float:
    """Sum of the peak resident memory (VmHWM) of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # the process has exited
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    total_kib, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            total_kib += int(found.group(1)) if found else 0
    return total_kib / 1024
