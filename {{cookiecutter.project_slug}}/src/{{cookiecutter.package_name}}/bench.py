"""`bench`: every engine and the worker on one prompt set, as ratios to a naive baseline.

Each in-process mode runs in a child process of its own, so its peak memory is its own and no
mode warms the caches of the next. Greedy decoding, a fixed `max_new_tokens`, a warm-up before
timing, and only generated tokens counted. Modes:

- `naive`: transformers in float32, one request at a time: the baseline of every ratio;
- `batched`: the same float32 model with the dynamic batcher, all requests at once (closed loop);
- `batched-bf16`: the same in bfloat16, where `dtype=auto` would choose it (a CPU with bfloat16
  instructions whose gate passed, or CUDA);
- `continuous`, `continuous-bf16`: the same models with continuous batching (requests join and
  leave the running batch between decode steps), as the worker serves on transformers;
- `ct2-<scheme>`: CTranslate2 with each published scheme that passed the quality gate;
- `worker`: end to end through RabbitMQ and one worker process (closed loop), then its latency
  when idle (one request at a time) and under an open-loop Poisson load at a fraction of the
  saturation rate it just measured; it serves with the configured engine, so its throughput is
  compared with the in-process mode of that engine;
- `worker-ray`: the same through `worker --replicas 2`, where Ray is rendered.
"""

import csv
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from {{ cookiecutter.package_name }}.settings import ENV_PREFIX, Settings
from {{ cookiecutter.package_name }}.stats import percentile

log = logging.getLogger(__name__)
PACKAGE = __name__.rpartition(".")[0]
CT2 = {{ "True" if cookiecutter.inference_backend == "ctranslate2" else "False" }}
RAY = {{ "True" if cookiecutter.worker_runtime == "ray" else "False" }}


@dataclass
class ModeResult:
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

    def row(self, baseline: "ModeResult | None") -> dict[str, Any]:
        ratio = self.inputs_per_s / baseline.inputs_per_s if baseline else math.nan
        return {
            "mode": self.mode,
            "inputs": self.inputs,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "inputs_per_s": round(self.inputs_per_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "p50_ms": round(percentile(self.latencies_ms, 50), 1),
            "p95_ms": round(percentile(self.latencies_ms, 95), 1),
            "p99_ms": round(percentile(self.latencies_ms, 99), 1),
            "peak_rss_mib": round(self.peak_rss_mib),
            "x_naive": round(ratio, 2),
            "note": self.note,
        }


# -- in-process modes (each in its own child process) ---------------------------------------------


def run_in_process(mode: str, settings: Settings, prompts: Path, max_new_tokens: int) -> ModeResult:
    """Run one engine mode here; called in a child process by `bench --run-mode`."""
    import resource

    from {{ cookiecutter.package_name }}.batch_job import read_requests, serve_lines
    from {{ cookiecutter.package_name }}.service import InferenceService

    settings = settings.model_copy(update={"temperature": 0.0})
    service = InferenceService.from_settings(settings, _backend(mode, settings))
    lines = [(i, _with_tokens(raw, max_new_tokens)) for i, raw in read_requests(prompts)]
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


def _serve_continuous(service: Any, settings: Settings, lines: list[tuple[str, bytes]]) -> list:
    """Replies to `lines` in order, every valid one through one continuous batcher."""
    from {{ cookiecutter.package_name }}.messages import Reply

    batcher = service.continuous(settings.model_copy(update={"scheduling": "continuous"}))
    admitted = [service.admit(raw, fallback_id) for fallback_id, raw in lines]
    valid = [a for a in admitted if not isinstance(a, Reply)]
    served = iter(service.run_continuous(batcher, valid))
    return [a if isinstance(a, Reply) else next(served) for a in admitted]


TRANSFORMERS_MODES = ("naive", "batched", "batched-bf16", "continuous", "continuous-bf16")


def _backend(mode: str, settings: Settings) -> Any:
    """The engine of a mode, loaded by the same factory as the service's."""
    from {{ cookiecutter.package_name }}.backends import load_backend

    if mode in TRANSFORMERS_MODES:
        dtype = "bfloat16" if mode.endswith("-bf16") else "float32"
        return load_backend(settings.model_copy(update={"backend": "transformers", "dtype": dtype}))
    if mode.startswith("ct2-"):
        scheme = mode.removeprefix("ct2-")
        ct2 = {"backend": "ctranslate2", "quantization": scheme}
        return load_backend(settings.model_copy(update=ct2))
    raise ValueError(f"unknown bench mode {mode!r}")


def _with_tokens(raw: bytes, max_new_tokens: int) -> bytes:
    request = json.loads(raw)
    request |= {"max_new_tokens": max_new_tokens, "temperature": 0.0}
    return json.dumps(request).encode()


def child_mode(mode: str, prompts: Path, max_new_tokens: int) -> ModeResult:
    """Run `mode` in a fresh child process and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", PACKAGE, "bench", "--run-mode", mode]
        command += ["--prompts", str(prompts), "--max-new-tokens", str(max_new_tokens)]
        command += ["--result", str(out)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return ModeResult(**json.loads(out.read_text()))


# -- end to end through RabbitMQ ------------------------------------------------------------------


def run_worker_modes(
    settings: Settings,
    prompts: Path,
    max_new_tokens: int,
    replicas: int,
    load_fraction: float,
) -> list[ModeResult]:
    """Closed loop, idle latency and open-loop latency through a real worker (or Ray replicas)."""
    from {{ cookiecutter.package_name }}.batch_job import read_requests

    name = "worker-ray" if replicas else "worker"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    requests = [json.loads(_with_tokens(raw, max_new_tokens)) for _, raw in read_requests(prompts)]
    for i, request in enumerate(requests):
        request.setdefault("id", f"line-{i + 1}")
    worker = _start_worker(settings, prefix, replicas)
    try:
        _submit(settings, prefix, [{**r, "id": f"warm-{r['id']}"} for r in requests[:2]])
        closed = _submit(settings, prefix, requests, note="closed loop")
        closed.mode, closed.peak_rss_mib = name, _tree_peak_rss_mib(worker.pid)
        idle = _submit(settings, prefix, _renamed(requests[:8], "idle"), window=1, note="idle")
        idle.mode = f"{name}-idle"
        rate = load_fraction * closed.inputs_per_s
        rng = random.Random(0)
        arrivals, t = [], 0.0
        for _ in requests:
            arrivals.append(t)
            t += rng.expovariate(rate)
        note = f"open loop, Poisson {rate:.2f}/s = {load_fraction:.0%} of saturation"
        loaded = _submit(settings, prefix, _renamed(requests, "open"), arrivals=arrivals, note=note)
        loaded.mode = f"{name}-open"
        for result in (idle, loaded):
            result.peak_rss_mib = closed.peak_rss_mib
        return [closed, idle, loaded]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=120)
        except subprocess.TimeoutExpired:
            worker.kill()
        _delete_queues(settings, prefix)


def _renamed(requests: list[dict], tag: str) -> list[dict]:
    return [{**r, "id": f"{tag}-{r['id']}"} for r in requests]


def _start_worker(settings: Settings, prefix: str, replicas: int) -> subprocess.Popen:
    env = {**os.environ, f"{ENV_PREFIX}QUEUE_PREFIX": prefix, f"{ENV_PREFIX}TEMPERATURE": "0"}
    env[f"{ENV_PREFIX}TRACKING"] = "false"  # the bench run is the one tracked
    command = [sys.executable, "-m", PACKAGE, "worker"]
    if replicas:
        command += ["--replicas", str(replicas)]
    log_file = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)
    worker = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while Path(log_file.name).read_text(errors="replace").count("consuming") < max(1, replicas):
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start; see {log_file.name}")
        time.sleep(0.2)
    return worker


def _submit(
    settings: Settings,
    prefix: str,
    requests: list[dict],
    window: int | None = None,
    arrivals: list[float] | None = None,
    note: str = "",
) -> ModeResult:
    from {{ cookiecutter.package_name }}.queue.client import Client

    client = Client.from_settings(settings, prefix, window)
    replies = []
    started = time.perf_counter()
    stats = client.submit(requests, replies.append, arrivals=arrivals)
    seconds = time.perf_counter() - started
    served = [r for r in replies if r.error is None]
    return ModeResult(
        mode="",
        inputs=len(replies),
        seconds=seconds,
        completion_tokens=sum(r.usage.completion_tokens for r in served),
        latencies_ms=stats.latencies_ms,
        peak_rss_mib=0.0,
        errors=len(replies) - len(served),
        note=note,
    )


def _delete_queues(settings: Settings, prefix: str) -> None:
    import pika

    from {{ cookiecutter.package_name }}.queue.topology import Names, delete

    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    delete(connection.channel(), Names(prefix))
    connection.close()


def _tree_peak_rss_mib(root: int) -> float:
    """Sum of the peak resident memory (VmHWM) of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total_kib, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmHWM:\s+(\d+) kB", status)
        total_kib += int(found.group(1)) if found else 0
    return total_kib / 1024


WORKER_MODES = ("worker", "worker-ray") if RAY else ("worker",)


def check_modes(modes: list[str]) -> None:
    """Raise ValueError naming the first mode this project does not have."""
    known = {*TRANSFORMERS_MODES, *WORKER_MODES}
    for mode in modes:
        if mode not in known and not _is_ct2_mode(mode):
            listed = ", ".join([*sorted(known), *(["ct2-<scheme>"] if CT2 else [])])
            raise ValueError(f"unknown bench mode {mode!r}; modes: {listed}")


def _is_ct2_mode(mode: str) -> bool:
    if not (CT2 and mode.startswith("ct2-")):
        return False
    from {{ cookiecutter.package_name }}.quantize import CPU_SCHEMES, CUDA_SCHEMES

    return mode.removeprefix("ct2-") in CPU_SCHEMES + CUDA_SCHEMES


def engine_mode(settings: Settings) -> str:
    """The in-process mode computing like the configured engine, the one the worker serves with."""
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.backend == "ctranslate2":
        from {{ cookiecutter.package_name }}.quantize import find_published

        found = find_published(settings)
        return f"ct2-{found[1] if found else settings.quantization}"
{%- endif %}
    mode = "continuous" if settings.scheduling == "continuous" else "batched"
    return f"{mode}-bf16" if _auto_is_bf16(settings) else mode


def _auto_is_bf16(settings: Settings) -> bool:
    from {{ cookiecutter.package_name }}.backends.hf import pick_device
    from {{ cookiecutter.package_name }}.model_source import resolve_for
    from {{ cookiecutter.package_name }}.precision import resolve_dtype

    device = pick_device(settings.device).type
    return resolve_dtype(settings, resolve_for(settings), device) == "bfloat16"


def default_modes(settings: Settings) -> list[str]:
    """naive, batched, batched-bf16 where `auto` would pick it, continuous batching in the
    precision `auto` picks, every CTranslate2 scheme published as passing the gate, the
    worker(s)."""
    modes = ["naive", "batched"]
    if _auto_is_bf16(settings.model_copy(update={"dtype": "auto"})):
        modes += ["batched-bf16", "continuous-bf16"]
    else:
        modes.append("continuous")
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    from {{ cookiecutter.package_name }}.quantize import (
        CPU_SCHEMES,
        CUDA_SCHEMES,
        published_dir,
    )

    for scheme in dict.fromkeys(CPU_SCHEMES + CUDA_SCHEMES):
        meta = published_dir(settings, scheme) / "model_meta.json"
        if meta.is_file() and json.loads(meta.read_text())["gate"]["passed"]:
            modes.append(f"ct2-{scheme}")
{%- endif %}
    return modes + list(WORKER_MODES)


# -- the report -----------------------------------------------------------------------------------


def memory_bandwidth_gb_s() -> float:
    """A rough read bandwidth of this machine (summing a 512 MiB array), for the roofline."""
    import numpy as np

    data = np.ones(512 * 1024 * 1024 // 8)
    data.sum()
    started = time.perf_counter()
    for _ in range(3):
        data.sum()
    return 3 * data.nbytes / (time.perf_counter() - started) / 1e9


def report(results: list[ModeResult], out_dir: Path) -> tuple[list[dict[str, Any]], Path]:
    """Write results.csv, results.json and a PNG plot into `out_dir`; return the rows."""
    baseline = next((r for r in results if r.mode == "naive"), None)
    rows = [r.row(baseline) for r in results]
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    plot = out_dir / "bench.png"
    _plot(rows, plot)
    return rows, plot


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["mode"] for r in rows]
    left.barh(names, [r["inputs_per_s"] for r in rows], color="tab:blue")
    left.set_xlabel("inputs/s (higher is better)")
    left.invert_yaxis()
    for i, r in enumerate(rows):
        if not math.isnan(r["x_naive"]):
            left.annotate(f"{r['x_naive']}x", (r["inputs_per_s"], i), va="center", fontsize=8)
    right.barh(names, [r["p50_ms"] for r in rows], color="tab:green", label="p50")
    right.barh(names, [r["p95_ms"] - r["p50_ms"] for r in rows], left=[r["p50_ms"] for r in rows],
               color="tab:orange", label="p95")  # fmt: skip
    right.set_xlabel("latency, ms")
    right.invert_yaxis()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline(results: list[ModeResult], engine: str) -> list[str]:
    """The three ratios the benchmark exists for, each from this run's own numbers."""
    by_mode = {r.mode: r for r in results}
    lines = []
    naive = by_mode.get("naive")
    engines = [r for r in results if r.mode != "naive" and not r.mode.startswith("worker")]
    if naive and engines:
        best = max(engines, key=lambda r: r.inputs_per_s)
        ratio = best.inputs_per_s / naive.inputs_per_s
        lines.append(f"best engine: {best.mode}, {ratio:.2f}x naive")
    for name in WORKER_MODES:
        closed, idle, loaded = (by_mode.get(f"{name}{s}") for s in ("", "-idle", "-open"))
        if closed and engine in by_mode:
            ratio = closed.inputs_per_s / by_mode[engine].inputs_per_s
            lines.append(f"{name}: {ratio:.2f} of the in-process {engine} (the same engine)")
        if idle and loaded and idle.latencies_ms and loaded.latencies_ms:
            p95, p50 = percentile(loaded.latencies_ms, 95), percentile(idle.latencies_ms, 50)
            lines.append(f"{name}: open-loop p95 {p95 / p50:.2f}x the idle p50 ({loaded.note})")
    return lines


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = {
        "mode": "mode",
        "inputs_per_s": "inputs/s",
        "x_naive": "x naive",
        "tokens_per_s": "tokens/s",
        "p50_ms": "p50 ms",
        "p95_ms": "p95 ms",
        "p99_ms": "p99 ms",
        "peak_rss_mib": "peak RSS MiB",
        "note": "note",
    }
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k in columns) + " |")
    return "\n".join(lines)
