"""The benchmark as one call (the `bench` command) and its report: a row per mode with its ratio
to `naive`, as CSV, JSON, a PNG plot, a markdown table, headline ratios and MLflow metrics."""

import csv
import json
import math
import timeit
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..lifecycle.tracking import settings_params, start_run
from ..settings import Settings
from ..stats import percentile
from .child import run_child
from .modes import WORKER_MODES, ModeResult, check_modes, default_modes, engine_mode, run_worker

# A row's column and its header in the markdown table (the CSV has every column).
TABLE_COLUMNS = {"mode": "mode", "inputs_per_s": "inputs/s", "x_naive": "x naive",
                 "tokens_per_s": "tokens/s", "p50_ms": "p50 ms", "p95_ms": "p95 ms",
                 "p99_ms": "p99 ms", "peak_rss_mib": "peak RSS MiB",
                 "flops_fraction": "of peak FLOP/s", "note": "note"}  # fmt: skip


def run_bench(
    settings: Settings,
    prompts: Path,
    max_new_tokens: int,
    modes: list[str] | None,
    load: float,
    out: Path,
    echo: Callable[..., None],
    repeats: int = 3,
) -> list[ModeResult]:
    """Benchmark `modes` (None: `default_modes`) on `prompts`; write the report into `out`.

    `echo` is called as `typer.echo`: `err=True` for a line per mode as it runs. `load` is the
    worker modes' open-loop rate, as a fraction of saturation, measured `repeats` times (the
    median repetition is reported). Raises UnknownModeError (a
    SettingsError) before anything runs if a mode is not one of this project's.
    """
    from ..serving.replies import read_requests

    chosen = modes or default_modes(settings)
    check_modes(chosen)
    count = len(read_requests(prompts))
    echo(f"bench: {count} prompts, {max_new_tokens} new tokens, greedy; modes {chosen}")
    params = settings_params(settings) | {"prompts": prompts.name, "prompt_count": count}
    params |= {"bench_max_new_tokens": max_new_tokens, "modes": ",".join(chosen), "load": load}
    with start_run(settings, "bench", params) as run:
        results = []
        for mode in chosen:
            echo(f"  running {mode} ...", err=True)
            if mode in WORKER_MODES:
                done = run_worker(settings, mode, prompts, max_new_tokens, (load, repeats))
            else:
                done = [run_child(mode, settings, prompts, max_new_tokens)]
            results += done
            echo(f"  {mode}: {done[0].inputs_per_s:.2f} inputs/s", err=True)
        bandwidth, peaks = memory_bandwidth_gb_s(), peak_gflops()
        parameters = parameters_of(settings)
        engine = engine_mode(settings) if set(chosen) & set(WORKER_MODES) else ""
        rows, plot = write_report(results, out, parameters, peaks, engine)
        echo(markdown_table(rows))
        echo(f"memory read bandwidth here: about {bandwidth:.1f} GB/s; matrix products: "
             + ", ".join(f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in peaks.items())
             + f"; the model: {parameters / 1e6:.1f} M parameters")  # fmt: skip
        for line in headline(results, engine):
            echo(line)
        metrics = {"memory_bandwidth_gb_s": bandwidth}
        metrics |= {f"peak_gflops_{dtype}": gflops for dtype, gflops in peaks.items()}
        for r in rows:
            metrics |= {f"{r['mode']}.{k}": v for k, v in r.items() if isinstance(v, int | float)}
        run.log_metrics(metrics)
        run.log_artifact(out, "bench")
    echo(f"results: {out / 'results.csv'}, {plot}{run.where()}")
    return results


def row(
    result: ModeResult,
    baseline: ModeResult | None,
    parameters: float = math.nan,
    peaks: dict[str, float] | None = None,
    computes_as: str = "",
) -> dict[str, Any]:
    """`result` as a row of the report; `x_naive` is its throughput over the baseline's, and
    `flops_fraction` the share of this machine's peak matrix-product rate that its generated
    tokens took (2 FLOPs per parameter per token, in the precision of the mode, or of the
    in-process mode `computes_as` names: the worker's engine)."""
    ratio = result.inputs_per_s / baseline.inputs_per_s if baseline else math.nan
    basis = computes_as or result.mode
    precision = "bfloat16" if "bf16" in basis or "bfloat16" in basis else "float32"
    peak = (peaks or {}).get(precision, math.nan)
    used = result.tokens_per_s * 2 * parameters / (peak * 1e9)
    return {
        "mode": result.mode,
        "inputs": result.inputs,
        "errors": result.errors,
        "seconds": round(result.seconds, 2),
        "inputs_per_s": round(result.inputs_per_s, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        **{f"p{q}_ms": round(percentile(result.latencies_ms, q), 1) for q in (50, 95, 99)},
        "peak_rss_mib": round(result.peak_rss_mib),
        "x_naive": round(ratio, 2),
        "flops_fraction": round(used, 3) if math.isfinite(used) else math.nan,
        "note": result.note,
    }


def write_report(
    results: list[ModeResult],
    out_dir: Path,
    parameters: float = math.nan,
    peaks: dict[str, float] | None = None,
    worker_engine: str = "",
) -> tuple[list[dict[str, Any]], Path]:
    """Write results.csv, results.json and bench.png into `out_dir`; return the rows, the plot.
    `worker_engine` is the in-process mode that computes as the worker modes' engine."""
    baseline = next((r for r in results if r.mode == "naive"), None)
    rows = [
        row(r, baseline, parameters, peaks, worker_engine if r.mode.startswith("worker") else "")
        for r in results
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    _plot(rows, out_dir / "bench.png")
    return rows, out_dir / "bench.png"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure

    fig = Figure(figsize=(12, 4.5))
    left, right = fig.subplots(1, 2)
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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table of the columns in TABLE_COLUMNS."""
    lines = [list(TABLE_COLUMNS.values()), ["---"] * len(TABLE_COLUMNS)]
    lines += ([str(r[k]) for k in TABLE_COLUMNS] for r in rows)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def headline(results: list[ModeResult], engine: str) -> list[str]:
    """The ratios the benchmark exists for: the best engine over naive, each worker over the
    in-process `engine` it serves with, each worker's open-loop p95 over its idle p50."""
    by_mode = {r.mode: r for r in results}
    lines, naive = [], by_mode.get("naive")
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
    data = np.ones(512 * 1024 * 1024 // 8)
    data.sum()  # not timed: the first pass touches the pages
    return 3 * data.nbytes / timeit.timeit(data.sum, number=3) / 1e9


def peak_gflops() -> dict[str, float]:
    """This machine's matrix-product rate on every core, float32 and (where the CPU has it)
    bfloat16: the best of three 2048 x 2048 products, for the FLOP/s roofline."""
    import torch

    from ..engine.hf import pick_device
    from ..lifecycle.precision import cpu_has_bf16

    dtypes = [torch.float32]
    if pick_device("auto").type == "cpu" and cpu_has_bf16():
        dtypes.append(torch.bfloat16)
    peaks = {}
    for dtype in dtypes:
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b  # not timed: the first product warms the kernels
        seconds = min(timeit.repeat(lambda: a @ b, number=1, repeat=3))  # noqa: B023
        peaks[str(dtype).removeprefix("torch.")] = 2 * 2048**3 / seconds / 1e9
    return peaks


def parameters_of(settings: Settings) -> float:
    """The served model's parameter count, read from its safetensors headers (nan if none)."""
    from safetensors import safe_open

    from ..lifecycle.sources import resolve_for

    total = 0
    for path in sorted(resolve_for(settings).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return float(total) if total else math.nan
