"""The worker modes: end to end through RabbitMQ and a real worker process; see `bench.modes`.

A worker is started as `python -m <package> worker` on queues of its own (a fresh prefix,
deleted afterwards), with tracking off (the bench run is the one tracked). The requests are
sent closed loop, then one at a time (idle latency), then open loop (Poisson arrivals at a
fraction of the saturation rate just measured). The peak memory is that of the worker's whole
process tree.
"""

import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ..bench.modes import ModeResult, bench_request
from ..settings import ENV_PREFIX, Settings

PACKAGE = __name__.partition(".")[0]  # the top package: `python -m PACKAGE worker`
{%- if cookiecutter.worker_runtime == "ray" %}
RAY_REPLICAS = 2  # of `worker-ray`
{%- endif %}
IDLE_REQUESTS = 8  # sent one at a time for the idle latency
WORKER_START_TIMEOUT_S = 600.0


def run_worker_modes(
    settings: Settings,
    mode: str,
    prompts: Path,
    max_new_tokens: int,
    load_fraction: float,
) -> list[ModeResult]:
    """Closed loop, idle latency and open-loop latency of worker `mode` (`MODE`, `MODE-idle`,
    `MODE-open`), all three with the peak memory of the worker's process tree."""
    from ..serving.replies import read_requests

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    requests = [bench_request(raw, max_new_tokens) for _, raw in read_requests(prompts)]
    for i, request in enumerate(requests):
        request.setdefault("id", f"line-{i + 1}")
{%- if cookiecutter.worker_runtime == "ray" %}
    worker = _start_worker(prefix, RAY_REPLICAS if mode == "worker-ray" else 0)
{%- else %}
    worker = _start_worker(prefix)
{%- endif %}
    try:
        _submit(settings, prefix, _renamed(requests[:2], "warm"))
        closed = _submit(settings, prefix, requests, note="closed loop")
        closed.mode, closed.peak_rss_mib = mode, _tree_peak_rss_mib(worker.pid)
        idle_requests = _renamed(requests[:IDLE_REQUESTS], "idle")
        idle = _submit(settings, prefix, idle_requests, window=1, note="idle")
        idle.mode = f"{mode}-idle"
        rate = load_fraction * closed.inputs_per_s
        rng = random.Random(0)
        arrivals, t = [], 0.0
        for _ in requests:
            arrivals.append(t)
            t += rng.expovariate(rate)
        note = f"open loop, Poisson {rate:.2f}/s = {load_fraction:.0%} of saturation"
        loaded = _submit(settings, prefix, _renamed(requests, "open"), arrivals=arrivals, note=note)
        loaded.mode = f"{mode}-open"
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

{% if cookiecutter.worker_runtime == "ray" %}
def _start_worker(prefix: str, replicas: int) -> subprocess.Popen:
    """Start a worker (with `replicas` Ray replicas, if any) on the queues of `prefix`; return
    once it consumes."""
{%- else %}
def _start_worker(prefix: str) -> subprocess.Popen:
    """Start a worker on the queues of `prefix`; return once it consumes."""
{%- endif %}
    env = {**os.environ, f"{ENV_PREFIX}QUEUE_PREFIX": prefix, f"{ENV_PREFIX}TEMPERATURE": "0"}
    env[f"{ENV_PREFIX}TRACKING"] = "false"  # the bench run is the one tracked
    command = [sys.executable, "-m", PACKAGE, "worker"]
{%- if cookiecutter.worker_runtime == "ray" %}
    if replicas:
        command += ["--replicas", str(replicas)]
    consumers = max(1, replicas)
{%- else %}
    consumers = 1
{%- endif %}
    with tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False) as log:
        worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while Path(log.name).read_text(errors="replace").count("consuming") < consumers:
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            raise RuntimeError(f"the worker did not start; see {log.name}")
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
    from ..serving.queue.client import Client

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

    from ..serving.queue.topology import Names, delete

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
