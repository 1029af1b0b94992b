"""`bench --url`: load any OpenAI-compatible server (this project's `serve`, a llama-server, a
vLLM) with the benchmark's prompts as streamed chat completions, so that they compare side by
side on the same prompts.

Closed loop at each concurrency N (N clients, each sends its next prompt when its answer ends),
then, with a rate, open-loop Poisson arrivals (a request leaves at its time whatever the server
is doing, as real users do). Each level reports throughput, time to first token (TTFT),
inter-token latency (ITL, the gap between two streamed chunks) and end-to-end latency, p50 and
p95; its throughput is also a ratio to concurrency 1 (`closed-1`) measured in the same run.
"""

import csv
import http.client
import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..settings import Settings, SettingsError
from ..stats import Rates, percentile


@dataclass
class Sample:
    """One streamed request as the client saw it (seconds)."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""
    text: str = ""  # the streamed answer


@dataclass
class LoadResult(Rates):
    mode: str
    inputs: int
    seconds: float
    completion_tokens: int
    samples: list[Sample] = field(repr=False)

    def row(self, baseline: "LoadResult | None") -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        gaps = [g for s in ok for g in s.gaps]
        ratio = self.inputs_per_s / baseline.inputs_per_s if baseline else float("nan")
        ms = {
            f"{name}_p{q}_ms": round(percentile(values, q) * 1000, 1)
            for name, values in (
                ("ttft", [s.ttft for s in ok]),
                ("itl", gaps),
                ("e2e", [s.e2e for s in ok]),
            )
            for q in (50, 95)
        }
        return {
            "mode": self.mode,
            "inputs": self.inputs,
            "errors": len(self.samples) - len(ok),
            "inputs_per_s": round(self.inputs_per_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "x_closed_1": round(ratio, 2),
            **ms,
        }


class Target:
    """An OpenAI-compatible server: its base URL (with or without /v1), model and key."""

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None,
        timeout_s: float,
        option: str = "--url",
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"{option} {url!r} is not an http(s) URL")
        self.url = url
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self.model = model or self._first_model()

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.timeout_s)

    def _first_model(self) -> str:
        try:
            connection = self._connect()
            connection.request("GET", f"{self.prefix}/v1/models", headers=self.headers)
            answer = connection.getresponse()
            body = answer.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionError(f"no answer from {self.host}: {exc}") from None
        if answer.status != 200:
            raise ConnectionError(f"GET /v1/models answered {answer.status}: {body[:200]!r}")
        try:
            return str(json.loads(body)["data"][0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise ConnectionError(f"GET /v1/models named no model: {body[:200]!r}") from None

    def stream(self, messages: list[dict[str, str]], max_tokens: int) -> Sample:
        """One greedy streamed chat completion, timed chunk by chunk."""
        body = {
            "model": self.model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        started = time.perf_counter()
        sample, last, chunks, pieces = Sample(ok=False), 0.0, 0, []
        try:
            connection = self._connect()
            path = f"{self.prefix}/v1/chat/completions"
            connection.request("POST", path, json.dumps(body), self.headers)
            answer = connection.getresponse()
            if answer.status != 200:
                return Sample(ok=False, error=f"HTTP {answer.status}")
            for line in answer:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(ok=False, error=str(chunk["error"])[:200])
                if chunk.get("usage"):
                    sample.tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or [{}]
                if piece := choices[0].get("delta", {}).get("content"):
                    pieces.append(piece)
                    now = time.perf_counter() - started
                    if chunks:
                        sample.gaps.append(now - last)
                    else:
                        sample.ttft = now
                    last, chunks = now, chunks + 1
            connection.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return Sample(ok=False, error=f"{type(exc).__name__}: {exc}"[:200])
        sample.ok, sample.e2e = True, time.perf_counter() - started
        sample.text = "".join(pieces)
        sample.tokens = sample.tokens or chunks
        return sample


def closed_loop(
    target: Target, prompts: list[list[dict]], max_tokens: int, clients: int
) -> LoadResult:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(lambda m: target.stream(m, max_tokens), prompts))
    return _result(f"closed-{clients}", samples, time.perf_counter() - started)


def open_loop(
    target: Target, prompts: list[list[dict]], max_tokens: int, rate: float, seed: int = 0
) -> LoadResult:
    """Poisson arrivals at `rate` requests/s (exponential gaps, seeded), each on its own thread;
    the samples in the order of `prompts`."""
    gaps = random.Random(seed)
    samples: list[Sample] = [Sample(ok=False, error="not sent")] * len(prompts)
    threads = []
    started = time.perf_counter()
    due = 0.0
    for i, messages in enumerate(prompts):
        due += gaps.expovariate(rate)
        time.sleep(max(0.0, started + due - time.perf_counter()))
        thread = threading.Thread(
            target=lambda i=i, m=messages: samples.__setitem__(i, target.stream(m, max_tokens))
        )
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return _result(f"open-{rate:g}rps", samples, time.perf_counter() - started)


def _result(mode: str, samples: list[Sample], seconds: float) -> LoadResult:
    tokens = sum(s.tokens for s in samples if s.ok)
    return LoadResult(mode, len(samples), seconds, tokens, samples)


def chat_of(raw: bytes) -> list[dict[str, str]]:
    """A benchmark prompt line as chat messages."""
    request = json.loads(raw)
    return request.get("messages") or [{"role": "user", "content": request["prompt"]}]


def run_http_bench(
    settings: Settings,
    target: Target,
    prompts: Path,
    max_new_tokens: int,
    concurrency: list[int],
    rate: float | None,
    out: Path,
    echo: Callable[..., None],
) -> list[LoadResult]:
    """Each closed-loop level, then the open loop; print the table, write CSV and JSON into
    `out`, log the rows as the metrics of one MLflow run."""
    from ..lifecycle.tracking import start_run
    from ..serving.replies import read_requests

    chats = [chat_of(raw) for _, raw in read_requests(prompts)]
    echo(f"bench --url: {target.model}, {len(chats)} prompts, {max_new_tokens} new tokens")
    target.stream(chats[0], 4)  # warm-up: the first request of a fresh server is slow
    params = {"url_host": target.host, "served_model": target.model, "prompts": prompts.name,
              "prompt_count": len(chats), "bench_max_new_tokens": max_new_tokens,
              "concurrency": ",".join(map(str, concurrency)), "rate": rate}  # fmt: skip
    with start_run(settings, "bench-http", params) as run:
        results = []
        for clients in concurrency:
            echo(f"  closed loop, {clients} clients ...", err=True)
            results.append(closed_loop(target, chats, max_new_tokens, clients))
        if rate:
            echo(f"  open loop, {rate:g} requests/s ...", err=True)
            results.append(open_loop(target, chats, max_new_tokens, rate))
        baseline = next((r for r in results if r.mode == "closed-1"), None)
        rows = [r.row(baseline) for r in results]
        write_rows(rows, out, "http")
        echo(table(rows))
        run.log_metrics({f"{r['mode']}.{k}": v for r in rows for k, v in r.items() if k != "mode"})
        run.log_artifact(out, "bench-http")
    echo(f"results: {out / 'http.csv'}{run.where()}")
    return results


def write_rows(rows: list[dict[str, Any]], out: Path, stem: str) -> None:
    """The rows as `out/STEM.csv` and `out/STEM.json`."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = [list(rows[0]), ["---"] * len(rows[0])] + [[str(v) for v in r.values()] for r in rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
