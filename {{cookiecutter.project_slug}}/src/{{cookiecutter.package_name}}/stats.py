"""Throughput and latency summaries, printed by jobs and logged to tracking."""

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Rates:
    """Throughput of anything with `inputs`, `completion_tokens` and `seconds` (nan if no time)."""

    inputs: int
    completion_tokens: int
    seconds: float

    @property
    def inputs_per_s(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True)
class Summary(Rates):
    inputs: int
    errors: int
    seconds: float
    completion_tokens: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float = math.nan
    batch_sizes: tuple[int, ...] = ()

    def metrics(self) -> dict[str, float]:
        """The numbers a tracking run records."""
        sizes = self.batch_sizes
        return {
            "inputs": self.inputs,
            "errors": self.errors,
            "seconds": self.seconds,
            "completion_tokens": self.completion_tokens,
            "inputs_per_s": self.inputs_per_s,
            "tokens_per_s": self.tokens_per_s,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "batches": len(sizes),
            "batch_size_mean": sum(sizes) / len(sizes) if sizes else math.nan,
            "batch_size_max": max(sizes, default=math.nan),
        }

    def line(self) -> str:
        served = self.inputs - self.errors
        latency = (
            f"latency p50 {self.latency_p50_ms:.0f} ms, p95 {self.latency_p95_ms:.0f} ms"
            if served > 0
            else "no request answered, no latency"
        )
        return (
            f"{self.inputs} inputs ({self.errors} errors) in {self.seconds:.1f} s: "
            f"{self.inputs_per_s:.2f} inputs/s, {self.tokens_per_s:.1f} tokens/s, {latency}"
        )


def summarize(
    seconds: float,
    latencies_ms: Sequence[float],
    completion_tokens: int,
    errors: int,
    batch_sizes: Sequence[int] = (),
) -> Summary:
    return Summary(
        inputs=len(latencies_ms) + errors,
        errors=errors,
        seconds=seconds,
        completion_tokens=completion_tokens,
        latency_p50_ms=percentile(latencies_ms, 50),
        latency_p95_ms=percentile(latencies_ms, 95),
        latency_p99_ms=percentile(latencies_ms, 99),
        batch_sizes=tuple(batch_sizes),
    )
