"""What the benchmark reports from its measurements: the median repetition of the worker's open
loop, and the side-by-side rows and headline of `bench --against`."""

from {{ cookiecutter.package_name }}.bench.against import (
    compare_rows,
    headline,
    identical_answers,
)
from {{ cookiecutter.package_name }}.bench.http_load import LoadResult, Sample
from {{ cookiecutter.package_name }}.bench.modes import ModeResult, median_run, tail_ratio
from {{ cookiecutter.package_name }}.bench.run import row


def result(mode: str, latencies: list[float]) -> ModeResult:
    return ModeResult(mode, len(latencies), 1.0, 10, latencies, 0.0)


def test_the_repetition_with_the_median_tail_ratio_is_reported():
    runs = [
        (result("worker-idle", [100.0] * 8), result("worker-open", [150.0] * 20 + [400.0])),
        (result("worker-idle", [100.0] * 8), result("worker-open", [150.0] * 20 + [180.0])),
        (result("worker-idle", [50.0] * 8), result("worker-open", [150.0] * 20 + [900.0])),
    ]
    ratios = sorted(tail_ratio(*run) for run in runs)
    idle, loaded = median_run(runs)
    assert tail_ratio(idle, loaded) == ratios[1]
    assert "median of 3" in loaded.note and loaded.note.count(", ") == 2
    assert median_run(runs[:1]) == runs[0]  # one repetition: as measured, no note


def load(mode: str, seconds: float, ttft: float, texts: list[str]) -> LoadResult:
    samples = [Sample(True, ttft, ttft + 1.0, [0.05, 0.07], 3, text=t) for t in texts]
    return LoadResult(mode, len(samples), seconds, 3 * len(samples), samples)


def test_against_gives_ours_the_peer_and_the_ratio_per_level():
    pairs = [
        (load("closed-8", 2.0, 0.2, ["a", "b"]), load("closed-8", 4.0, 0.4, ["a", "c"])),
        (load("closed-32", 1.0, 1.0, ["a", "b"]), load("closed-32", 3.0, 2.0, ["a", "b"])),
    ]
    rows = compare_rows(pairs)
    assert [(r["mode"], r["server"]) for r in rows][:3] == [
        ("closed-8", "ours"),
        ("closed-8", "peer"),
        ("closed-8", "ours/peer"),
    ]
    ratio = rows[2]
    assert ratio["inputs_per_s"] == 2.0 and ratio["ttft_p50_ms"] == 0.5
    assert ratio["itl_p50_ms"] == 1.0
    assert headline(rows, "http://peer:8081") == [
        "against http://peer:8081: throughput 2.0x at 8, 3.0x at 32; TTFT p50 0.5x at 8, 0.5x at 32"
    ]
    assert identical_answers(pairs[0]) == (1, 2)
    assert identical_answers(pairs[1]) == (2, 2)


def test_the_share_of_peak_flops_uses_the_precision_the_mode_computes_in():
    """2 FLOPs per parameter per token over the peak of the mode's dtype; the worker's rows
    compute as the engine it serves with."""
    peaks = {"float32": 100.0, "bfloat16": 400.0}
    tokens = ModeResult("continuous-bf16", 1, 1.0, 50, [1.0], 0.0)  # 50 tokens/s
    assert row(tokens, None, 1e9, peaks)["flops_fraction"] == 0.25
    worker = ModeResult("worker", 1, 1.0, 50, [1.0], 0.0)
    assert row(worker, None, 1e9, peaks)["flops_fraction"] == 1.0
    assert row(worker, None, 1e9, peaks, "continuous-bf16")["flops_fraction"] == 0.25
