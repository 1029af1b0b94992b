"""The benchmark as one call (the `bench` command): check the modes, open an MLflow run with
the parameters, run each mode (in-process ones each in a child process), write and print the
report, log its numbers and files to the run."""

from collections.abc import Callable
from pathlib import Path

from ..bench.child import run_child
from ..bench.modes import WORKER_MODES, ModeResult, check_modes, default_modes, engine_mode
from ..bench.report import headline, markdown_table, memory_bandwidth_gb_s, write_report
from ..bench.worker_modes import run_worker_modes
from ..lifecycle.tracking import Run, settings_params, start_run
from ..settings import Settings

Echo = Callable[[str], None]


def run_bench(
    settings: Settings,
    *,
    prompts: Path,
    max_new_tokens: int,
    modes: list[str] | None,
    load: float,
    out: Path,
    echo: Echo,
    status: Echo | None = None,
) -> list[ModeResult]:
    """Benchmark `modes` (None: `default_modes`) on the prompts of `prompts`; write the report
    into `out`; return each mode's results.

    The report and the headline ratios go to `echo`, a line per mode as it runs to `status`
    (default: `echo`). `load` is the open-loop rate of the worker modes, as a fraction of the
    saturation rate. Raises UnknownModeError (a ValueError) before anything runs if a mode is
    not one of this project's.
    """
    from ..serving.replies import read_requests

    chosen = modes or default_modes(settings)
    check_modes(chosen)
    count = len(read_requests(prompts))
    echo(f"bench: {count} prompts, {max_new_tokens} new tokens, greedy; modes {chosen}")
    params = settings_params(settings) | {"prompts": prompts.name, "prompt_count": count}
    params |= {"bench_max_new_tokens": max_new_tokens, "modes": ",".join(chosen), "load": load}
    say = status or echo
    with start_run(settings, "bench", params) as run:
        results = []
        for mode in chosen:
            say(f"  running {mode} ...")
            if mode in WORKER_MODES:
                done = run_worker_modes(settings, mode, prompts, max_new_tokens, load)
            else:
                done = [run_child(mode, settings, prompts, max_new_tokens)]
            results += done
            say(f"  {mode}: {done[0].inputs_per_s:.2f} inputs/s")
        engine = engine_mode(settings) if set(chosen) & set(WORKER_MODES) else ""
        plot = _report(results, engine, out, run, echo)
    echo(f"results: {out / 'results.csv'}, {plot}{run.where()}")
    return results


def _report(results: list[ModeResult], engine: str, out: Path, run: Run, echo: Echo) -> Path:
    """Write, print and log the report; return the plot's path."""
    rows, plot = write_report(results, out)
    echo(markdown_table(rows))
    bandwidth = memory_bandwidth_gb_s()
    echo(f"memory read bandwidth here: about {bandwidth:.1f} GB/s")
    for line in headline(results, engine):
        echo(line)
    for row in rows:
        numbers = {k: v for k, v in row.items() if isinstance(v, int | float)}
        run.log_metrics({f"{row['mode']}.{k}": v for k, v in numbers.items()})
    run.log_metrics({"memory_bandwidth_gb_s": bandwidth})
    run.log_artifact(out, "bench")
    return plot
