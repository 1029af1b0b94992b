"""The RabbitMQ worker against the real broker: nothing is lost, whatever breaks.

Each test has its own queue prefix, runs real worker processes (`<cli> worker`) and talks to
them with the real client.
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
from collections import Counter
from pathlib import Path

import pika
import pytest

from {{ cookiecutter.package_name }}.messages import Reply
from {{ cookiecutter.package_name }}.queue.client import Client
from {{ cookiecutter.package_name }}.queue.topology import Names, declare_reply_queue
from {{ cookiecutter.package_name }}.settings import ENV_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """`<cli> worker` in a child process, its log in a file."""

    def __init__(self, prefix: str, log_path: Path, **settings: object) -> None:
        env = {
            **os.environ,
            f"{ENV_PREFIX}QUEUE_PREFIX": prefix,
            f"{ENV_PREFIX}REPORT_EVERY_S": "5",
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
    collector = Collector(broker, prefix, numbered(200, max_new_tokens=8)).start()
    collector.join()
    collector.assert_each_answered_once()
    assert dead_letters(broker, prefix) == 0
    assert worker.stop() == 0


def test_a_worker_killed_mid_run_loses_nothing(broker, prefix, workers):
    first = workers(max_batch_size=8)
    collector = Collector(broker, prefix, numbered(48, max_new_tokens=24)).start()
    collector.wait_for_replies(8)
    first.stop(signal.SIGKILL)  # unacked deliveries go back to the queue
    answered_before = len(collector.replies)
    assert answered_before < 48
    workers(max_batch_size=8)
    collector.join()
    collector.assert_each_answered_once()


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this machine")
def test_the_worker_and_client_reconnect_after_a_broker_restart(broker, prefix, workers):
    worker = workers(max_batch_size=8)
    collector = Collector(broker, prefix, numbered(48, max_new_tokens=24)).start()
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


def test_bad_messages_are_dead_lettered_or_answered_and_the_rest_served(broker, prefix, workers):
    worker = workers()
    connection = pika.BlockingConnection(pika.URLParameters(broker))
    channel = connection.channel()
    replies = Names(prefix).replies("bad")
    declare_reply_queue(channel, replies)
    bad = {
        "not-json": b"{this is not json",
        "not-utf8": b"\xff\xfe\xfd",
        "empty": b"",
        "wrong-types": json.dumps({"id": "wrong-types", "prompt": 42, "top_p": "high"}).encode(),
        "unknown-role": json.dumps(
            {"id": "unknown-role", "messages": [{"role": "wizard", "content": "hi"}]}
        ).encode(),
        "too-long": json.dumps({"id": "too-long", "prompt": "many words " * 10000}).encode(),
        "absurd-tokens": json.dumps(
            {"id": "absurd-tokens", "prompt": "hi", "max_new_tokens": 10**12}
        ).encode(),
        "not-object": b"[1, 2, 3]",
        "no-reply-to": json.dumps(
            {"id": "no-reply-to", "prompt": "What is the capital of France?"}
        ).encode(),
    }
    good = numbered(5, max_new_tokens=8)
    for i, (name, body) in enumerate(bad.items()):
        reply_to = None if name == "no-reply-to" else replies
        properties = pika.BasicProperties(correlation_id=name, reply_to=reply_to, delivery_mode=2)
        channel.basic_publish("", Names(prefix).requests, body, properties)
        if i < len(good):  # a valid request between the bad ones
            request = good[i]
            properties = pika.BasicProperties(correlation_id=request["id"], reply_to=replies)
            channel.basic_publish(
                "", Names(prefix).requests, json.dumps(request).encode(), properties
            )
    received: dict[str, dict] = {}
    deadline = time.monotonic() + 300
    while len(received) < len(good) + len(bad) - 1 and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(replies, auto_ack=True)
        if method is None:
            time.sleep(0.1)
            continue
        received[properties.correlation_id] = json.loads(body)
    errors = {k: v["error"]["type"] for k, v in received.items() if v["error"]}
    assert errors == {
        "not-json": "invalid_json",
        "not-utf8": "invalid_encoding",
        "empty": "invalid_json",
        "wrong-types": "invalid_request",
        "unknown-role": "invalid_request",
        "too-long": "context_length_exceeded",
        "absurd-tokens": "max_new_tokens_too_large",
        "not-object": "invalid_request",
    }
    assert all(received[r["id"]]["text"] for r in good)
    channel.queue_delete(replies)
    connection.close()
    assert dead_letters(broker, prefix) == len(bad)  # nothing lost: every bad one is kept
    assert worker.process.poll() is None


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
