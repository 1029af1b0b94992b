"""The benchmark's report: one row per mode with its ratio to `naive`, written as CSV, JSON and
a PNG plot, printed as a markdown table with the headline ratios, and this machine's memory
bandwidth (the roof of a memory-bound decode)."""

import csv
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..bench.modes import WORKER_MODES, ModeResult
from ..stats import percentile

# A row's column and its header in the markdown table (the CSV has every column).
TABLE_COLUMNS = {
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


def row(result: ModeResult, baseline: ModeResult | None) -> dict[str, Any]:
    """`result` as a row of the report; `x_naive` is its throughput over the baseline's."""
    ratio = result.inputs_per_s / baseline.inputs_per_s if baseline else math.nan
    return {
        "mode": result.mode,
        "inputs": result.inputs,
        "errors": result.errors,
        "seconds": round(result.seconds, 2),
        "inputs_per_s": round(result.inputs_per_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "p50_ms": round(percentile(result.latencies_ms, 50), 1),
        "p95_ms": round(percentile(result.latencies_ms, 95), 1),
        "p99_ms": round(percentile(result.latencies_ms, 99), 1),
        "peak_rss_mib": round(result.peak_rss_mib),
        "x_naive": round(ratio, 2),
        "note": result.note,
    }


def write_report(results: list[ModeResult], out_dir: Path) -> tuple[list[dict[str, Any]], Path]:
    """Write results.csv, results.json and bench.png into `out_dir`; return the rows and the
    plot's path."""
    baseline = next((r for r in results if r.mode == "naive"), None)
    rows = [row(r, baseline) for r in results]
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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table of the columns in TABLE_COLUMNS."""
    lines = ["| " + " | ".join(TABLE_COLUMNS.values()) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for k in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def headline(results: list[ModeResult], engine: str) -> list[str]:
    """The ratios the benchmark exists for, each from this run's own numbers: the best engine
    over naive, each worker over the in-process `engine` it serves with, and each worker's
    open-loop p95 over its idle p50."""
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


def memory_bandwidth_gb_s() -> float:
    """A rough read bandwidth of this machine (summing a 512 MiB array), for the roofline."""
    import numpy as np

    data = np.ones(512 * 1024 * 1024 // 8)
    data.sum()
    started = time.perf_counter()
    for _ in range(3):
        data.sum()
    return 3 * data.nbytes / (time.perf_counter() - started) / 1e9
