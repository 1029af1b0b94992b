"""Ray: the same consume -> batch -> generate -> reply loop as Ray actors, one machine or many.

Each replica is an actor with its own model and its own RabbitMQ connection, restarted by Ray if
its process dies (its unacked requests are redelivered by the broker meanwhile). The batch job
spreads shards of its input over the replicas and puts the replies back in input order.
"""

import hashlib
import logging
import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util import ActorPool

from ..errors import one_line
from ..messages import Reply
from ..settings import Settings, SettingsError
from .queue.worker import WorkerFailed

log = logging.getLogger(__name__)
# Ray's socket paths are its session folder plus about 70 characters; AF_UNIX allows 107.
MAX_SESSION_ROOT = 107 - 70


class ReplicaStartError(SettingsError):
    """The replicas could not be placed or started; the message names what was asked and what
    the cluster has."""


def session_root(settings: Settings) -> Path:
    """A short folder for Ray's session files (and sockets), one per project cache: under the
    system's temp folder, not the home folder, whose length is the user's."""
    digest = hashlib.sha256(str(settings.cache_dir.resolve()).encode()).hexdigest()[:8]
    root = Path(tempfile.gettempdir()) / f"ray-{os.getuid()}-{digest}"
    if len(str(root)) > MAX_SESSION_ROOT:
        raise ReplicaStartError(
            f"Ray's session folder {root} is {len(str(root))} characters long: its socket paths "
            f"would pass the 107-byte limit of Unix sockets; set TMPDIR to a folder of at most "
            f"{MAX_SESSION_ROOT - 20} characters (e.g. /tmp)"
        )
    return root


def init_ray(settings: Settings) -> None:
    """Join the cluster at RAY_ADDRESS ("auto", "host:port", "ray://host:10001") when one is
    given, else start a small local instance: no dashboard, its session files and its auth
    token under the project's cache, nothing written to the user's home."""
    if ray.is_initialized():
        return
    # Every replica's lines in the driver's log, not "[repeated 2x across cluster]".
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **options)
        return
    ray_dir = settings.cache_dir / "ray"
    ray_dir.mkdir(parents=True, exist_ok=True)
    token = ray_dir / "auth_token"
    if not token.is_file():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token))  # else Ray writes ~/.ray/auth_token
    session = session_root(settings)
    log.info("starting a local Ray instance (session files in %s)", session)
    ray.init(num_cpus=settings.ray_num_cpus, _temp_dir=str(session), **options)


def replica_settings(settings: Settings) -> Settings:
    """A replica's settings: its engine threads match the CPUs Ray gives it."""
    cpus = max(1, int(settings.ray_cpus_per_replica))
    update: dict[str, Any] = {}
    if settings.num_threads == 0:
        update["num_threads"] = cpus
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.intra_threads == 0:
        update["intra_threads"] = max(1, cpus // settings.inter_threads)
{%- endif %}
    return settings.model_copy(update=update)


# run() serves while stop() can still be called. The type: ignores here and on .options():
# ray's typed overloads of remote() leave out the actor options, and type the class unchanged.
@ray.remote(max_concurrency=2)  # type: ignore[call-overload]
class Replica:
    def __init__(self, settings: Settings, index: int) -> None:
        from ..engine.service import InferenceService
        from ..lifecycle.loading import load_backend

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("pika").setLevel(logging.WARNING)
        self.settings = settings
        self.index = index
        self.service = InferenceService.from_settings(settings, load_backend(settings))
        self.worker: Any = None
        log.info("replica %d ready (pid %d)", index, os.getpid())

    def run(self) -> dict[str, int]:
        """Serve RabbitMQ until stop(); return the worker's counters."""
        from .queue.worker import Worker, run_tracked

        self.worker = Worker(self.service, self.settings)
        return vars(run_tracked(self.worker, tags={"replica": self.index}))

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def serve(self, shard: int, lines: list[tuple[str, bytes]]) -> tuple[int, list[dict]]:
        """Replies to one shard of the batch job, in order (as dicts: they cross processes)."""
        from ..engine.service import serve_lines

        replies = serve_lines(self.service, self.settings, lines)
        return shard, [r.model_dump() for r in replies]


def start_replicas(settings: Settings, count: int) -> list[Any]:
    """`count` replicas with their models loaded. Raises ReplicaStartError (one line) if they
    cannot be placed or loaded within RAY_START_TIMEOUT_S."""
    init_ray(settings)
    prepare_tracking(settings)
    options = {
        "num_cpus": settings.ray_cpus_per_replica,
        "num_gpus": settings.ray_gpus_per_replica,
        "max_restarts": settings.ray_max_restarts,
        "max_task_retries": -1,  # a restarted replica takes up run() again
    }
    per_replica = replica_settings(settings)
    replicas = [
        Replica.options(**options).remote(per_replica, i)  # type: ignore[attr-defined]
        for i in range(count)
    ]
    try:
        ray.get([r.__ray_ready__.remote() for r in replicas], timeout=settings.ray_start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        available, total = ray.available_resources(), ray.cluster_resources()
        ray.shutdown()
        raise ReplicaStartError(
            f"{count} replicas asking for {settings.ray_cpus_per_replica:g} CPU and "
            f"{settings.ray_gpus_per_replica:g} GPU each did not start within "
            f"{settings.ray_start_timeout_s:g} s; Ray has {available.get('CPU', 0):g} of "
            f"{total.get('CPU', 0):g} CPUs and {available.get('GPU', 0):g} of "
            f"{total.get('GPU', 0):g} GPUs free: ask for fewer (--replicas, "
            "RAY_CPUS_PER_REPLICA) or add nodes"
        ) from None
    except ray.exceptions.RayError as exc:
        ray.shutdown()
        raise ReplicaStartError(f"a replica failed to start: {one_line(exc, last=True)}") from None
    return replicas


def prepare_tracking(settings: Settings) -> None:
    """Create the tracking store's tables and the experiment once, before replicas open runs
    at the same moment (two processes creating a fresh SQLite store collide)."""
    if not settings.tracking:
        return
    from ..lifecycle.tracking import client_for, experiment_id

    experiment_id(client_for(settings), settings)


def run_workers(settings: Settings, count: int, stop: threading.Event) -> list[dict[str, int]]:
    """Serve RabbitMQ with `count` replicas until `stop` is set (or SIGTERM/SIGINT arrive),
    then stop them gracefully."""
    replicas = start_replicas(settings, count)
    # ray.init installs its own SIGTERM handler (which kills the driver): put ours back.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.set())
    running = [r.run.remote() for r in replicas]
    try:
        while not stop.is_set():
            done, _ = ray.wait(running, num_returns=1, timeout=0.5)
            if done:  # a replica ended on its own: past its restarts, or its worker failed
                index = running.index(done[0])
                try:
                    ray.get(done[0])
                    reason = "it returned"
                except ray.exceptions.RayError as exc:
                    reason = one_line(exc, last=True)
                others = [r for i, r in enumerate(replicas) if i != index]
                ray.wait([r.stop.remote() for r in others], num_returns=len(others), timeout=60)
                ray.wait(running, num_returns=len(running), timeout=300)  # the batch in hand
                raise WorkerFailed(f"replica {index} stopped serving ({reason})")
        ray.get([r.stop.remote() for r in replicas])
        return ray.get(running)
    finally:
        ray.shutdown()


def run_batch(
    settings: Settings,
    count: int,
    lines: list[tuple[str, bytes]],
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    on_reply: Callable[[Reply], None] = lambda reply: None,
) -> tuple[list[Reply], float]:
    """Replies to every line, in input order, computed by `count` replicas in shards, and the
    seconds they took once every replica had loaded its model. `on_reply` gets each reply as
    soon as its shard is back."""
    handler = signal.getsignal(signal.SIGTERM)
    replicas = start_replicas(settings, count)  # models loaded before timing
    signal.signal(signal.SIGTERM, handler)  # ray.init replaced the job's own (SIGTERM -> exit)
    try:
        started = time.perf_counter()
        size = max(1, settings.max_batch_size)
        shards = [lines[i : i + size] for i in range(0, len(lines), size)]
        results: list[list[dict]] = [[] for _ in shards]
        done = 0
        pool = ActorPool(replicas)
        work = pool.map_unordered(lambda r, item: r.serve.remote(*item), list(enumerate(shards)))
        for shard, replies in work:
            results[shard] = replies
            for reply in replies:
                on_reply(Reply.model_validate(reply))
            done += len(replies)
            on_progress(done, len(lines))
        replies = [Reply.model_validate(r) for shard in results for r in shard]
        return replies, time.perf_counter() - started
    finally:
        ray.shutdown()
