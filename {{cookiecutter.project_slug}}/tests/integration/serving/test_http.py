"""`serve`, the OpenAI-compatible API, as its clients see it: the official `openai` client,
raw SSE bytes, readiness, metrics, back-pressure, disconnects and SIGTERM, on a real model."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from {{ cookiecutter.package_name }}.serving.http.metrics import OWN
from {{ cookiecutter.package_name }}.settings import ENV_PREFIX

from ...conftest import PROJECT_ROOT, free_port

pytestmark = pytest.mark.integration
MODEL = "test-model"
PACKAGE = "{{ cookiecutter.package_name }}"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who loves books."}]
ENGINES = ["transformers"{% if cookiecutter.inference_backend == "ctranslate2" %}, "ctranslate2"{% endif %}]


class Server:
    """A `serve` process on a free port; `ready_seen` holds what /ready said while it started."""

    def __init__(self, tmp: Path, *args: str, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self.key = str(settings.get("api_key", ""))
        env = {**os.environ, f"{ENV_PREFIX}HTTP_PORT": str(self.port)}
        env[f"{ENV_PREFIX}SERVED_MODEL_NAME"] = MODEL
        env |= {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in settings.items()}
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", PACKAGE, "serve", *args],
                cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self.ready_seen = self._await_ready()
        except BaseException:
            self.stop()
            raise

    def _await_ready(self, timeout_s: float = 300.0) -> list[int]:
        seen: list[int] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                status, _, _ = self.get("/ready")
            except OSError:
                time.sleep(0.1)
                continue
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.1)
        pytest.fail(f"not ready in {timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()

    def post(
        self, path: str, body: dict, key: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        headers = {"Content-Type": "application/json"}
        if key or self.key:
            headers["Authorization"] = f"Bearer {key or self.key}"
        connection.request("POST", path, json.dumps(body), headers)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tmp_path_factory):
    served = Server(
        tmp_path_factory.mktemp("serve"), backend=request.param, max_batch_size=8, max_waiting=64
    )
    yield served
    served.stop()


def stream_text(client: openai.OpenAI, messages: list, max_tokens: int) -> tuple[str, float, float]:
    """(text, time to first content, end-to-end time) of a greedy streamed chat completion."""
    started = time.perf_counter()
    parts, first = [], None
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts), first or 0.0, time.perf_counter() - started


def test_ready_is_503_while_the_model_loads_then_200(server):
    assert server.ready_seen == [503, 200]
    assert server.get("/health")[0] == 200


def test_the_openai_client_chats_streams_completes_and_lists(server):
    client = server.client()
    answer = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0 and answer.object == "chat.completion"
    streamed, _, _ = stream_text(client, QUESTION, 24)
    assert streamed == text

    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text.strip() and completion.object == "text_completion"
    (card,) = client.models.list().data
    assert card.id == MODEL


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"max_tokens": 10**9},
        {"n": 2},
        {"extra_body": {"frobnicate": True}},
        {"messages": [{"role": "user", "content": "x" * 200_000}]},
        {"messages": [{"role": "tool", "content": "hi"}]},
    ],
    ids=["temperature", "max-tokens", "n", "unknown-field", "too-long", "tool-role"],
)
def test_a_bad_request_is_a_bad_request_error(server, bad):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().chat.completions.create(**{"model": MODEL, "messages": QUESTION, **bad})
    error = raised.value.body
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"]


def test_concurrent_streams_keep_their_own_limits(server):
    client = server.client()
    expected = {
        n: client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=n, temperature=0)
        for n in (5, 40)
    }
    results: dict[int, str] = {}
    threads = [
        threading.Thread(
            target=lambda n=n: results.__setitem__(n, stream_text(client, STORY, n)[0])
        )
        for n in (40, 5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for n, answer in expected.items():
        assert results[n] == answer.choices[0].message.content
        assert answer.usage.completion_tokens == n and answer.choices[0].finish_reason == "length"


def test_an_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=QUESTION)


def test_the_sse_stream_is_framed_as_openai_frames_it(server):
    body = {
        "model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    status, headers, raw = server.post("/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")[:-1]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    rebuilt = b"".join(
        b"data: " + json.dumps(c, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
        for c in chunks
    )
    assert rebuilt + b"data: [DONE]\n\n" == raw  # compact JSON, one blank line, nothing else
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, end, usage = chunks
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in content)
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == sum(
        usage["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )


def test_tokens_are_streamed_as_they_are_decoded(server):
    client = server.client()

    def timed(max_tokens: int) -> float:
        started = time.perf_counter()
        client.chat.completions.create(
            model=MODEL, messages=STORY, max_tokens=max_tokens, temperature=0
        )
        return time.perf_counter() - started

    one, forty = timed(1), timed(40)
    per_token = (forty - one) / 39
    text, first, total = stream_text(client, STORY, 40)
    assert len(text) > 40
    assert first < total - 20 * per_token, (first, total, per_token)


def read_deltas(server: Server, messages: list, max_tokens: int, stop_after: int | None):
    """Stream a chat completion over a raw socket; stop reading after `stop_after` content
    deltas (closing the connection), else read to [DONE]. Returns the content deltas."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    answer = connection.getresponse()
    deltas = []
    for line in answer:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"] and (piece := chunk["choices"][0]["delta"].get("content")):
                deltas.append(piece)
                if stop_after is not None and len(deltas) >= stop_after:
                    connection.sock.close()
                    break
        elif line.startswith(b"data: [DONE]"):
            break
    return deltas


def test_a_client_that_leaves_stops_its_request_and_not_the_others(server):
    client = server.client()
    expected = [
        client.chat.completions.create(model=MODEL, messages=m, max_tokens=48, temperature=0)
        .choices[0]
        .message.content
        for m in (QUESTION, STORY)
    ]
    results: dict[str, list[str]] = {}
    threads = [
        threading.Thread(
            target=lambda: results.__setitem__("q", read_deltas(server, QUESTION, 48, None))
        ),
        threading.Thread(
            target=lambda: results.__setitem__("s", read_deltas(server, STORY, 48, None))
        ),
        threading.Thread(
            target=lambda: results.__setitem__("left", read_deltas(server, STORY, 400, 5))
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results["left"]) == 5
    assert ["".join(results["q"]), "".join(results["s"])] == expected
    deadline = time.monotonic() + 30
    while "the client went away" not in server.log_path.read_text():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    line = next(x for x in server.log_path.read_text().splitlines() if "the client went away" in x)
    generated = int(line.split("stopped after ")[1].split()[0])
    # 5 read, at most one more in the socket, at most 2 engine steps before it noticed
    assert generated <= 5 + 1 + 2, line


def metric_values(server: Server) -> dict[tuple[str, tuple], float]:
    _, _, raw = server.get("/metrics")
    values = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            values[(sample.name, labels)] = sample.value
    return values


def test_metrics_parse_and_count_a_known_set_of_requests(server):
    before = metric_values(server)
    client = server.client()
    answers = [
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=n, temperature=0)
        for n in (3, 5, 7)
    ]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5)
    after = metric_values(server)

    def moved(name: str, *labels: tuple[str, str]) -> float:
        key = (name, tuple(sorted(labels)))
        return after.get(key, 0.0) - before.get(key, 0.0)

    finished = sum(
        moved("vllm:request_success_total", ("finished_reason", r)) for r in ("stop", "length")
    )
    assert finished == 3
    assert moved("vllm:generation_tokens_total") == sum(a.usage.completion_tokens for a in answers)
    assert moved("vllm:prompt_tokens_total") == sum(a.usage.prompt_tokens for a in answers)
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert moved(f"vllm:{histogram}_seconds_count") == 3
    assert moved(f"{OWN}:request_errors_total", ("error_type", "invalid_request")) == 1
    assert after[("vllm:num_requests_running", ())] == 0


def test_a_full_server_answers_429_with_retry_after_and_loses_nothing(servers):
    served = servers(max_batch_size=2, max_waiting=2, api_key="s3cret-test-key")
    results: list[tuple[int, dict, bytes]] = []
    body = {"model": MODEL, "messages": STORY, "max_tokens": 24, "temperature": 0}
    try:
        anonymous = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(model=MODEL, messages=QUESTION)
        assert served.get("/health")[0] == 200  # only /v1/* asks for the key
        assert "s3cret-test-key" not in served.log_path.read_text()
        threads = [
            threading.Thread(
                target=lambda: results.append(served.post("/v1/chat/completions", body))
            )
            for _ in range(12)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        served.stop()
    statuses = sorted(status for status, _, _ in results)
    assert len(results) == 12 and set(statuses) == {200, 429}, statuses
    assert statuses.count(200) >= 4  # 2 running + 2 waiting were accepted at least
    for status, headers, raw in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert json.loads(raw)["error"]["code"] == "server_full"
        else:
            reply = json.loads(raw)
            assert (
                reply["usage"]["completion_tokens"] == 24
                or reply["choices"][0]["finish_reason"] == "stop"
            )
            assert reply["choices"][0]["message"]["content"]


def test_sigterm_finishes_the_streams_in_flight_and_refuses_new_ones(servers):
    served = servers(max_batch_size=8, drain_timeout_s=120)
    results: dict[int, list[str]] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, read_deltas(served, STORY, 200, None))
        )
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while metric_values(served).get(("vllm:num_requests_running", ()), 0) < 4:
        assert time.monotonic() < deadline, served.log()
        time.sleep(0.05)
    served.process.send_signal(signal.SIGTERM)
    time.sleep(0.1)  # its handler has run: 200 tokens take seconds on any engine
    refused, _, raw = served.post("/v1/chat/completions", {"model": MODEL, "messages": QUESTION})
    ready, _, _ = served.get("/ready")
    for thread in threads:
        thread.join(timeout=120)
    assert served.process.wait(timeout=60) == 0, served.log()
    assert (refused, ready) == (503, 503), raw
    assert json.loads(raw)["error"]["code"] == "draining"
    assert sorted(results) == [0, 1, 2, 3] and all(len("".join(d)) > 40 for d in results.values())


def test_bench_loads_the_server_closed_and_open_loop(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Say hi."}\n{"messages": [{"role": "user", "content": "Hi!"}]}\n'
    )
    command = [sys.executable, "-m", PACKAGE, "bench", "--url", f"{server.url}/v1"]
    command += ["--concurrency", "1,2", "--rate", "4", "--prompts", str(prompts)]
    command += ["--max-new-tokens", "6", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "http" / "http.json").read_text())
    assert [r["mode"] for r in rows] == ["closed-1", "closed-2", "open-4rps"]
    for r in rows:
        assert r["inputs"] == 2 and r["errors"] == 0 and r["tokens_per_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["e2e_p50_ms"] and r["itl_p50_ms"] > 0
    assert rows[0]["x_closed_1"] == 1.0 and "| closed-2 |" in done.stdout


def test_bench_against_puts_two_servers_side_by_side(server, tmp_path):
    """The same server as ours and as the peer: every level on both, the ratios, the headline
    and the greedy answers compared (identical here)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "Name a color."}\n')
    command = [sys.executable, "-m", PACKAGE, "bench", "--url", f"{server.url}/v1"]
    command += ["--against", server.url, "--concurrency", "1,2", "--rate", "4"]
    command += ["--prompts", str(prompts), "--max-new-tokens", "6", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "against" / "against.json").read_text())
    levels = ("closed-1", "closed-2", "open-4rps")
    assert [(r["mode"], r["server"]) for r in rows] == [
        (level, server) for level in levels for server in ("ours", "peer", "ours/peer")
    ]
    for r in rows:
        assert r["server"] == "ours/peer" or (r["errors"] == 0 and r["ttft_p50_ms"] > 0)
    assert all(0.2 < r["inputs_per_s"] < 5 for r in rows if r["server"] == "ours/peer")
    assert f"against {server.url}: throughput " in done.stdout
    assert "identical answers: 2/2" in done.stdout
    assert (tmp_path / "against" / "against.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = [*command[:6], "--against", "ftp://peer"]
    refused = subprocess.run(bad, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: --against 'ftp://peer' is not an http(s) URL"


def test_a_dead_generation_thread_fails_its_requests_and_exits_3(servers):
    marker = "KILL-THE-GENERATION-THREAD"
    # Continuous batching takes the marker while the stream decodes (a static batch would
    # finish first); the watchdog is the same for every engine.
    served = servers(backend="transformers", fault_generation_on=marker)
    pieces: list[str] = []
    outcome: list[BaseException | None] = []

    def stream() -> None:
        try:
            for chunk in served.client().chat.completions.create(
                model=MODEL, messages=STORY, max_tokens=200, temperature=0, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
            outcome.append(None)
        except openai.APIError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=stream)
    try:
        reader.start()
        deadline = time.monotonic() + 120
        while len(pieces) < 3:  # a stream under way
            assert time.monotonic() < deadline and reader.is_alive(), served.log()
            time.sleep(0.01)
        # Before any text, the death is the status; once streaming, an error event ends it.
        status, _, raw = served.post(
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": marker}], "stream": True},
        )
        assert status in (500, 503) and b'"code":"generation_failed"' in raw, (status, raw)
        reader.join(timeout=60)
        assert isinstance(outcome[0], openai.APIError), outcome
        assert "generation thread" in str(outcome[0])
        assert served.process.wait(timeout=60) == 3, served.log()
        assert "the generation thread died" in served.log()
    finally:
        served.stop()
