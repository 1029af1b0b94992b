"""The RabbitMQ worker against the real broker: nothing is lost, whatever breaks.

Each test has its own queue prefix, runs real worker processes (`<cli> worker`) and talks to
them with the real client. Their MLflow tracking is off: what a worker logs, and that SIGTERM
ends its run FINISHED, is tested in test_tracking.py, and starting a run is a third of a
worker's start (2.4 of 7 CPU-seconds, measured), paid about 25 times here.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import openai
import pika
import pytest

from {{ cookiecutter.package_name }}.messages import Reply
from {{ cookiecutter.package_name }}.serving.queue.client import Client
from {{ cookiecutter.package_name }}.serving.queue.topology import (
    Names,
    QueueOptions,
    declare,
    declare_reply_queue,
)
from {{ cookiecutter.package_name }}.settings import ENV_PREFIX

from ...conftest import interrupt_halfway
from .test_http import MODEL, QUESTION, STORY

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]
PROJECT_ROOT = Path(__file__).resolve().parents[3]


class WorkerProcess:
    """`<cli> worker` in a child process, its log in a file."""

    def __init__(self, prefix: str, log_path: Path, **settings: object) -> None:
        env = {
            **os.environ,
            f"{ENV_PREFIX}QUEUE_PREFIX": prefix,
            f"{ENV_PREFIX}REPORT_EVERY_S": "5",
            f"{ENV_PREFIX}TRACKING": "false",  # see the module docstring
        }
        env |= {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in settings.items()}
        self.log_path = log_path
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "{{ cookiecutter.package_name }}", "worker"],
            cwd=PROJECT_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.wait_for("consuming")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, words: str, timeout: float = 180.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(words) < count:
            assert self.process.poll() is None, f"worker exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {words!r} in:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 300.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.log.close()
        return code


@pytest.fixture
def workers(prefix, tmp_path):
    started: list[WorkerProcess] = []

    def start(**settings: object) -> WorkerProcess:
        worker = WorkerProcess(prefix, tmp_path / f"worker-{len(started)}.log", **settings)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGKILL)


class Collector:
    """Runs a client in a thread and counts every reply it hands over, per id."""

    def __init__(
        self, broker: str, prefix: str, requests: list[dict], timeout: float = 600
    ) -> None:
        self.requests = requests
        self.replies: dict[str, Reply] = {}
        self.calls: Counter[str] = Counter()
        self.client = Client(broker, prefix, window=64, timeout_s=timeout, heartbeat_s=30)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.client.submit(self.requests, self._on_reply)
        except Exception as exc:  # noqa: BLE001 - surfaced by join()
            self.error = exc

    def _on_reply(self, reply: Reply) -> None:
        self.calls[reply.id] += 1
        self.replies[reply.id] = reply

    def start(self) -> "Collector":
        self.thread.start()
        return self

    def wait_for_replies(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.replies) < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"only {len(self.replies)} replies"
            time.sleep(0.1)

    def join(self, timeout: float = 900) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"client still waiting: {len(self.replies)} replies"
        assert self.error is None, self.error

    def assert_each_answered_once(self) -> None:
        ids = [r["id"] for r in self.requests]
        assert sorted(self.replies) == sorted(ids)
        assert all(self.calls[i] == 1 for i in ids)
        failed = {i: r.error for i, r in self.replies.items() if r.error is not None}
        assert failed == {}


def numbered(
    count: int, max_new_tokens: int, text: str = "Say the number {i} in words."
) -> list[dict]:
    return [
        {"id": f"r{i:03d}", "prompt": text.format(i=i), "max_new_tokens": max_new_tokens}
        for i in range(count)
    ]


def dead_letters(broker: str, prefix: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    count = (
        connection.channel()
        .queue_declare(Names(prefix).dead_letters, passive=True)
        .method.message_count
    )
    connection.close()
    return count


def test_200_requests_are_all_answered_each_exactly_once(broker, prefix, workers):
    worker = workers()
    collector = Collector(broker, prefix, numbered(200, max_new_tokens=4)).start()
    collector.join()
    collector.assert_each_answered_once()
    assert dead_letters(broker, prefix) == 0
    assert worker.stop() == 0


def test_a_worker_killed_mid_run_loses_nothing(broker, prefix, workers):
    first = workers(max_batch_size=8)
    collector = Collector(broker, prefix, numbered(32, max_new_tokens=16)).start()
    collector.wait_for_replies(8)
    first.stop(signal.SIGKILL)  # unacked deliveries go back to the queue
    answered_before = len(collector.replies)
    assert answered_before < 32
    workers(max_batch_size=8)
    collector.join()
    collector.assert_each_answered_once()


@pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None and os.environ.get("CI") != "true",
    reason="needs rabbitmqctl on this machine (under CI=true its absence fails the test)",
)
def test_the_worker_and_client_reconnect_after_a_broker_restart(broker, prefix, workers):
    worker = workers(max_batch_size=8)
    collector = Collector(broker, prefix, numbered(32, max_new_tokens=16)).start()
    collector.wait_for_replies(8)
    try:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        time.sleep(2)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    collector.join()
    collector.assert_each_answered_once()
    assert "connection lost" in worker.text()
    assert worker.process.poll() is None  # it reconnected by itself


def dead_lettered(broker: str, prefix: str) -> dict[str, tuple[str, str]]:
    """Correlation id (or body) -> (error type, reason) of each message in the dead-letter queue."""
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    channel = connection.channel()
    found = {}
    while True:
        method, properties, body = channel.basic_get(Names(prefix).dead_letters, auto_ack=True)
        if method is None:
            break
        headers = properties.headers or {}
        reason = headers.get("x-error-message") or headers.get("x-first-death-reason", "")
        key = properties.correlation_id or body.decode(errors="replace")[:40]
        found[key] = (headers.get("x-error-type", ""), reason)
    connection.close()
    return found


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# name -> (raw body, the error type of its reply); None: a valid request that must be answered.
CONTEXT = 512  # the worker of the test is set to this context window
SAY_HI = {"prompt": "Say hi.", "max_new_tokens": 8}
HOSTILE: dict[str, tuple[bytes, str | None]] = {
    "not-json": (b"{this is not json", "invalid_json"),
    "not-utf8": (b"\xff\xfe\xfd", "invalid_encoding"),
    "empty": (b"", "invalid_json"),
    "not-object": (b"[1, 2, 3]", "invalid_request"),
    "wrong-types": (body(id="wrong-types", prompt=42, top_p="high"), "invalid_request"),
    "unknown-role": (body(id="u", messages=[{"role": "wiz", "content": "hi"}]), "invalid_request"),
    "lone-surrogate-content": (rb'{"id": "s", "prompt": "hi \ud800 there"}', "invalid_request"),
    "lone-surrogate-id": (rb'{"id": "\ud800", "prompt": "hi"}', "invalid_request"),
    "nul-in-content": (rb'{"id": "n", "prompt": "hi \u0000"}', "invalid_request"),
    "nested-5000": (b'{"id": "d", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_json"),
    "negative-temperature": (body(id="t", prompt="hi", temperature=-1), "invalid_request"),
    "top-p-nan": (b'{"id": "p", "prompt": "hi", "top_p": NaN}', "invalid_json"),
    "temperature-inf": (b'{"id": "i", "prompt": "hi", "temperature": 1e999}', "invalid_request"),
    "max-new-tokens-0": (body(id="z", prompt="hi", max_new_tokens=0), "invalid_request"),
    "absurd-tokens": (body(id="a", prompt="hi", max_new_tokens=10**12), "max_new_tokens_too_large"),
    "20000-messages": (
        body(id="m", messages=[{"role": "user", "content": "hi"}] * 20000), "request_too_large"
    ),
    "10000-stops": (body(id="st", prompt="hi", stop=["x"] * 10000), "invalid_request"),
    "null-id": (body(id=None, prompt="hi"), "invalid_request"),
    "bool-id": (body(id=True, prompt="hi"), "invalid_request"),
    "prompt-and-messages": (
        body(id="b", prompt="hi", messages=[{"role": "user", "content": "hi"}]), "invalid_request"
    ),
    "empty-messages": (body(id="e", messages=[]), "invalid_request"),
    "assistant-last": (
        body(id="al", messages=[{"role": "assistant", "content": "hi"}]), "invalid_request"
    ),
    "unknown-field": (body(id="f", prompt="hi", colour="red"), "invalid_request"),
    "over-the-context": (body(id="c", prompt="word " * CONTEXT), "context_length_exceeded"),
    "at-the-context-limit": (
        body(id="cl", prompt="word " * (CONTEXT - 60), max_new_tokens=60),
        "context_length_exceeded",
    ),
    "10MB-body": (body(id="big", prompt="x" * 10_000_000), "request_too_large"),
    "no-reply-to": (body(id="nr", prompt="What is the capital of France?"), "no_reply_to"),
    # Edge cases that are valid: each must get a real answer.
    "integer-id": (body(id=12345, **SAY_HI), None),
    "float-id": (body(id=2.5, **SAY_HI), None),
    "byte-order-mark": (b"\xef\xbb\xbf" + body(id="bom", **SAY_HI), None),
    "tiny-temperature": (body(id="tt", temperature=1e-30, **SAY_HI), None),
    "small-temperature": (body(id="ts", temperature=1e-4, **SAY_HI), None),
    "long-id": (body(id="i" * 256, **SAY_HI), None),
}  # fmt: skip


class ReplyQueue:
    """A reply queue of the test's own, read with basic_get."""

    def __init__(self, broker: str, prefix: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(broker))
        self.channel = self.connection.channel()
        self.name = Names(prefix).replies(uuid.uuid4().hex[:8])
        declare_reply_queue(self.channel, self.name)
        self.received: dict[str, tuple[dict, float]] = {}  # correlation id -> (reply, when)
        self.sent: dict[str, float] = {}

    def publish(self, prefix: str, name: str, raw: bytes, reply: bool = True) -> None:
        properties = pika.BasicProperties(
            correlation_id=name, reply_to=self.name if reply else None, delivery_mode=2
        )
        self.sent[name] = time.monotonic()
        self.channel.basic_publish("", Names(prefix).requests, raw, properties)

    def collect(self, names: set[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not names <= set(self.received) and time.monotonic() < deadline:
            method, properties, raw = self.channel.basic_get(self.name, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            self.received[properties.correlation_id] = (json.loads(raw), time.monotonic())
        missing = names - set(self.received)
        assert not missing, f"no reply for {sorted(missing)}"

    def close(self) -> None:
        self.channel.queue_delete(self.name)
        self.connection.close()


def test_hostile_messages_get_error_replies_and_never_stop_the_worker(broker, prefix, workers):
    worker = workers(max_batch_size=8, context_window=CONTEXT)
    replies = ReplyQueue(broker, prefix)
    good = []
    for i, (name, (raw, _)) in enumerate(HOSTILE.items()):
        replies.publish(prefix, name, raw, reply=name != "no-reply-to")
        good.append(f"good-{i}")  # a valid request after each bad one
        replies.publish(prefix, good[-1], body(id=good[-1], prompt="Say hi.", max_new_tokens=8))
    answered = {name for name in HOSTILE if name != "no-reply-to"} | set(good)
    replies.collect(answered)
    errors = {
        name: reply["error"]["type"] if reply["error"] else None
        for name, (reply, _) in replies.received.items()
        if name in HOSTILE
    }
    assert errors == {name: kind for name, (_, kind) in HOSTILE.items() if name != "no-reply-to"}
    for name in (*good, *(n for n, (_, kind) in HOSTILE.items() if kind is None)):
        reply, when = replies.received[name]
        assert reply["text"] and reply["error"] is None, (name, reply)
        assert when - replies.sent[name] < 120, f"{name} waited {when - replies.sent[name]:.0f} s"
    assert replies.received["integer-id"][0]["id"] == 12345
    assert replies.received["float-id"][0]["id"] == 2.5
    replies.close()
    # Every refused message is kept, with why.
    kept = dead_lettered(broker, prefix)
    refused = {name for name, (_, kind) in HOSTILE.items() if kind is not None}
    assert set(kept) == refused
    assert all(kind and reason for kind, reason in kept.values()), kept
    assert kept["no-reply-to"][0] == "no_reply_to"
    # The request queue deleted under it: the broker cancels the consumer; the worker declares
    # the queues again and goes on serving.
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    connection.channel().queue_delete(Names(prefix).requests)
    connection.close()
    worker.wait_for("consuming", count=2)
    after = ReplyQueue(broker, prefix)
    after.publish(prefix, "after-delete", body(id="after-delete", **SAY_HI))
    after.collect({"after-delete"})
    after.close()
    assert "cancelled the consumer" in worker.text()
    assert worker.process.poll() is None
    assert worker.stop() == 0


def test_generated_requests_each_get_a_reply(broker, prefix, workers):
    """Requests drawn by hypothesis over the schema's fields, types and edge values."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    worker = workers(max_batch_size=8)
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30)
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", ""]),
         "content": st.one_of(st.text(max_size=40), scalars)}
    )  # fmt: skip
    request = st.fixed_dictionaries(
        {},
        optional={
            "id": st.one_of(scalars, st.text(min_size=1, max_size=300)),
            "prompt": st.one_of(st.text(max_size=60), scalars),
            "messages": st.one_of(st.lists(message, max_size=4), scalars),
            "max_new_tokens": st.one_of(st.integers(-2, 12), scalars),
            "temperature": st.one_of(st.floats(-1, 3), scalars),
            "top_p": st.one_of(st.floats(-0.5, 1.5), scalars),
            "seed": st.one_of(st.integers(-5, 2**64), scalars),
            "stop": st.one_of(st.lists(st.text(max_size=5), max_size=10), scalars),
            "extra": scalars,
        },
    )

    @settings(
        max_examples=2,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(request, min_size=15, max_size=15))
    def each_gets_a_reply(requests: list[dict]) -> None:
        replies = ReplyQueue(broker, prefix)
        names = set()
        for i, fields in enumerate(requests):
            name = f"gen-{uuid.uuid4().hex[:6]}-{i}"
            names.add(name)
            replies.publish(prefix, name, json.dumps(fields).encode())
        replies.publish(prefix, "after", body(id="after", prompt="Say hi.", max_new_tokens=8))
        replies.collect(names | {"after"})
        assert replies.received["after"][0]["text"]
        replies.close()

    each_gets_a_reply()
    assert worker.process.poll() is None
    assert worker.stop() == 0


FAULT = "FAULT-MARKER-7f3a"  # a request holding this triggers the worker's fault setting


@pytest.mark.parametrize("scheduling", ["static", "continuous"])
def test_a_dead_generation_thread_ends_the_worker_and_its_requests_are_redelivered(
    broker, prefix, workers, scheduling
):
    doomed = workers(fault_generation_on=FAULT, max_batch_size=4, **SCHEDULINGS[scheduling])
    requests = numbered(6, max_new_tokens=8)
    requests.insert(2, {"id": "fault", "prompt": f"Repeat {FAULT}", "max_new_tokens": 8})
    collector = Collector(broker, prefix, requests[:2] + requests[3:]).start()
    time.sleep(1)  # the ordinary ones first, so some are in hand when the thread dies
    fault_queue = ReplyQueue(broker, prefix)
    fault_queue.publish(prefix, "fault", body(**requests[2]))
    started = time.monotonic()
    code = doomed.process.wait(timeout=120)
    assert code == 3, doomed.text()[-2000:]
    assert time.monotonic() - started < 60
    assert "the generation thread died" in doomed.text()
    # A healthy worker takes over what the dead one held (the fault message included, which
    # the second worker serves: its fault setting is off).
    workers(max_batch_size=4)
    collector.join()
    collector.assert_each_answered_once()
    fault_queue.collect({"fault"})
    fault_queue.close()


def test_a_message_that_kills_workers_is_dead_lettered_after_the_delivery_limit(
    broker, prefix, tmp_path
):
    """The poison kills every worker it reaches (as a supervisor would, the test restarts
    them). After QUEUE_DELIVERY_LIMIT (3) redeliveries the broker dead-letters it, and the 50
    ordinary requests around it are answered exactly once: the first worker dies holding a
    full prefetch of them, but each restarted worker takes redelivered requests one at a time,
    so the poison dies alone and the others' delivery counts stop growing."""
    settings = {"fault_exit_on": FAULT, "max_batch_size": 8}
    started: list[WorkerProcess] = []
    stop = threading.Event()

    def supervise() -> None:
        while not stop.is_set():
            if not started or started[-1].process.poll() is not None:
                log = tmp_path / f"worker-{len(started)}.log"
                started.append(WorkerProcess(prefix, log, **settings))
            time.sleep(0.2)

    started.append(WorkerProcess(prefix, tmp_path / "worker-0.log", **settings))  # declares
    supervisor = threading.Thread(target=supervise, daemon=True)
    supervisor.start()
    try:
        requests = numbered(50, max_new_tokens=4)
        collector = Collector(broker, prefix, requests[:25]).start()
        poison = ReplyQueue(broker, prefix)
        poison.publish(prefix, "poison", body(id="poison", prompt=f"say {FAULT}"))
        more = Collector(broker, prefix, requests[25:]).start()
        for each in (collector, more):
            each.join()
            each.assert_each_answered_once()
        deadline = time.monotonic() + 300
        while "poison" not in (kept := dead_lettered(broker, prefix)):
            assert time.monotonic() < deadline, "the poison was never dead-lettered"
            time.sleep(1)
        assert kept["poison"][1] == "delivery_limit"
        exits = [w.process.returncode for w in list(started) if w.process.poll() is not None]
        assert exits == [3] * 4, exits  # the first delivery and three redeliveries
        assert "taken alone" in started[1].text()
        poison.close()
    finally:
        stop.set()
        supervisor.join()
        for worker in started:
            worker.stop(signal.SIGKILL)


def test_dead_letters_are_listed_with_why_and_replayed(broker, prefix):
    env = {**os.environ, f"{ENV_PREFIX}QUEUE_PREFIX": prefix}
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "dead-letters"]
    listed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr  # declares the queues
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    channel = connection.channel()
    names = Names(prefix)
    headers = {"x-error-type": "invalid_request", "x-error-message": "top_p: too high"}
    refused = pika.BasicProperties(headers=headers, correlation_id="c1", delivery_mode=2)
    channel.basic_publish(names.dead_letter_exchange, names.requests, body(id="d1"), refused)
    listed = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["d1\tinvalid_request\ttop_p: too high"]
    assert dead_letters(broker, prefix) == 1  # listing keeps them
    replayed = subprocess.run(
        [*command, "--replay"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert replayed.returncode == 0 and "1 dead-lettered requests replayed" in replayed.stderr
    assert dead_letters(broker, prefix) == 0
    _, properties, raw = channel.basic_get(names.requests, auto_ack=True)
    assert json.loads(raw) == {"id": "d1"} and properties.correlation_id == "c1"
    assert "x-error-type" not in (properties.headers or {})
    connection.close()


def test_a_queue_declared_with_other_arguments_is_one_clear_line(broker, prefix, tmp_path):
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    declare(connection.channel(), Names(prefix), QueueOptions(delivery_limit=3))
    connection.close()
    env = {
        **os.environ,
        f"{ENV_PREFIX}QUEUE_PREFIX": prefix,
        f"{ENV_PREFIX}QUEUE_DELIVERY_LIMIT": "5",
        f"{ENV_PREFIX}QUEUE_MAX_LENGTH": "100",
    }
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "submit"]
    result = subprocess.run(
        [*command, "data/sample_prompts.jsonl", str(tmp_path / "o.jsonl")],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.startswith(f"error: queue {prefix}.requests already exists with other")
    assert "unreachable" not in result.stderr


def test_submit_waits_out_a_full_queue_then_says_so(broker, prefix, workers, tmp_path):
    env = {
        **os.environ,
        f"{ENV_PREFIX}QUEUE_PREFIX": prefix,
        f"{ENV_PREFIX}QUEUE_MAX_LENGTH": "5",
        f"{ENV_PREFIX}QUEUE_FULL_TIMEOUT_S": "3",
    }
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in numbered(12, max_new_tokens=4)))
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "submit"]
    command.append(str(source))
    result = subprocess.run(
        [*command, str(out), "--timeout", "600"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: queue ") and "is full" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # With a worker and time to wait, every request is answered, the queued ones included.
    env[f"{ENV_PREFIX}QUEUE_FULL_TIMEOUT_S"] = "300"
    submitting = subprocess.Popen(
        [*command, str(out), "--timeout", "600"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(3)  # it waits on the full queue
    workers(queue_max_length=5)
    _, stderr = submitting.communicate(timeout=600)
    assert submitting.returncode == 0, stderr[-2000:]
    replies = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in replies] == [f"r{i:03d}" for i in range(12)]
    assert all(r["error"] is None for r in replies)


# How the worker batches: whole batches (the configured engine), or continuous batching, which
# only the transformers engine has.
SCHEDULINGS = {
    "static": {"scheduling": "static"},
    "continuous": {"scheduling": "continuous", "backend": "transformers"},
}


@pytest.mark.parametrize("scheduling", SCHEDULINGS)
def test_generation_longer_than_three_heartbeats_keeps_the_connection(
    broker, prefix, workers, scheduling
):
    worker = workers(heartbeat_s=1, max_batch_size=8, **SCHEDULINGS[scheduling])
    text = "Count from 1 to 300, separated by commas. Request {i}."
    collector = Collector(broker, prefix, numbered(8, max_new_tokens=160, text=text)).start()
    collector.join()
    collector.assert_each_answered_once()
    slowest = max(r.latency_ms for r in collector.replies.values())
    assert slowest > 3 * 1000, f"generation was too quick to prove anything: {slowest} ms"
    assert worker.stop() == 0
    assert "connection lost" not in worker.text()
    assert "0 reconnects" in worker.text()


@pytest.mark.parametrize("scheduling", SCHEDULINGS)
def test_sigterm_finishes_the_requests_in_hand_and_requeues_the_rest(
    broker, prefix, workers, scheduling
):
    first = workers(max_batch_size=4, max_wait_ms=0, **SCHEDULINGS[scheduling])
    collector = Collector(broker, prefix, numbered(12, max_new_tokens=48)).start()
    if scheduling == "static":
        first.wait_for("generating a batch of")
    else:
        collector.wait_for_replies(1)  # the first ones are done, others have joined
    assert first.stop(signal.SIGTERM) == 0
    log = first.text()
    assert "finished the batch in hand; requeued" in log
    served = int(re.search(r"stopped: (\d+) served", log).group(1))
    if scheduling == "static":
        started = re.findall(r"generating a batch of (\d+)", log)
        finished = re.findall(r"batch of (\d+) in", log)
        assert started and started == finished  # the batch in hand was finished, not dropped
        assert served == sum(map(int, finished)) < 12
    else:
        found = re.search(r"stopping after (\d+) served: (\d+) requests in hand finish", log)
        before, in_hand = int(found.group(1)), int(found.group(2))
        assert in_hand > 0
        assert before + in_hand <= served < 12  # those in hand were finished, not dropped
    workers(max_batch_size=4)
    collector.join()
    collector.assert_each_answered_once()


def test_a_second_sigterm_exits_at_once_and_loses_nothing(broker, prefix, workers):
    first = workers(max_batch_size=4, scheduling="static")
    text = "Count from 1 to 300, separated by commas. Request {i}."
    collector = Collector(broker, prefix, numbered(4, max_new_tokens=200, text=text)).start()
    first.wait_for("generating a batch of")
    first.process.send_signal(signal.SIGTERM)
    first.wait_for("stopping (again to exit at once)")
    started = time.monotonic()
    assert first.stop(signal.SIGTERM, timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10
    workers(max_batch_size=4)
    collector.join()
    collector.assert_each_answered_once()


def test_submit_writes_every_reply_in_input_order(broker, prefix, workers, tmp_path):
    workers()
    env = {**os.environ, f"{ENV_PREFIX}QUEUE_PREFIX": prefix}
    out = tmp_path / "replies.jsonl"
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "submit"]
    result = subprocess.run(
        [*command, "data/sample_prompts.jsonl", str(out)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "inputs/s" in result.stdout and "0 timed out" in result.stdout
    sample = (PROJECT_ROOT / "data" / "sample_prompts.jsonl").read_text().splitlines()
    replies = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in replies] == [json.loads(line)["id"] for line in sample]
    assert "Paris" in replies[0]["text"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
def test_an_interrupted_submit_resumes_with_every_id_exactly_once(
    broker, prefix, workers, tmp_path, sig
):
    worker = workers(max_batch_size=4)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in numbered(40, max_new_tokens=8)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, f"{ENV_PREFIX}QUEUE_PREFIX": prefix}
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "submit"]
    command.append(str(source))
    window = ["--window", "4"]
    code, stderr, before = interrupt_halfway([*command, str(out), *window], out, env, sig)
    assert code == (130 if sig == signal.SIGTERM else -signal.SIGKILL), stderr
    assert 8 <= len(before) < 40
    result = subprocess.run(
        [*command, str(out), *window, "--resume"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in replies] == [f"r{i:03d}" for i in range(40)]
    assert all(r["error"] is None for r in replies)
    assert all(replies[int(i[1:])] == reply for i, reply in before.items())
    assert worker.stop() == 0
    served = int(re.search(r"stopped: (\d+) served", worker.text()).group(1))
    assert 40 <= served <= 40 + 4, served  # at most the window in flight was computed twice


def test_an_unreachable_broker_is_one_clear_line(tmp_path):
    env = {
        **os.environ,
        f"{ENV_PREFIX}RABBITMQ_URL": "amqp://guest:secret-pw@127.0.0.1:5999/%2F",
        f"{ENV_PREFIX}CONNECT_TIMEOUT_S": "1",
    }
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}", "submit"]
    result = subprocess.run(
        [*command, "data/sample_prompts.jsonl", str(tmp_path / "o.jsonl")],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: RabbitMQ is unreachable at")
    assert "docker compose up -d rabbitmq" in result.stderr
    assert "secret-pw" not in result.stderr + result.stdout


def test_the_openai_client_streams_through_the_gateway_from_a_worker(prefix, workers, servers):
    workers(max_batch_size=8)
    gateway = servers("--via-queue", queue_prefix=prefix, reply_timeout_s=120)
    try:
        client = gateway.client()
        answer = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
        )
        pieces = []
        for chunk in client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        text = "".join(pieces)
        assert text == answer.choices[0].message.content and "Paris" in text
        assert len(pieces) >= 4  # streamed as decoded, not as one reply
        with pytest.raises(openai.BadRequestError):  # refused by the worker: a 400, not a stream
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**6)
    finally:
        gateway.stop()


def test_a_worker_killed_mid_stream_ends_in_an_answer_or_an_error_never_a_hang(
    prefix, workers, servers
):
    first = workers(max_batch_size=8)
    gateway = servers("--via-queue", queue_prefix=prefix, reply_timeout_s=120)
    client = gateway.client()
    answer = client.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=64, temperature=0
    )
    expected = answer.choices[0].message.content
    pieces: list[str] = []
    outcome: list[tuple[str, str]] = []

    def stream() -> None:
        try:
            for chunk in client.chat.completions.create(
                model=MODEL, messages=STORY, max_tokens=64, temperature=0, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
            outcome.append(("answer", "".join(pieces)))
        except openai.APIError as exc:
            outcome.append(("error", str(exc)))

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        deadline = time.monotonic() + 120
        while len(pieces) < 3:
            assert time.monotonic() < deadline and reader.is_alive(), gateway.log()
            time.sleep(0.01)
        first.stop(signal.SIGKILL)
        workers(max_batch_size=8)  # the broker gives it the request again
        reader.join(timeout=200)
        assert not reader.is_alive(), "the stream hung"
    finally:
        gateway.stop()
    ((kind, text),) = outcome
    assert kind == "error" or text == expected, (kind, text)
