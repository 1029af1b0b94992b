"""`bench --against PEER`: this project's server and a peer (a llama-server, a vLLM) under the
same load in one run, side by side, with the ratio of each metric.

Every level (a closed loop of N clients, then a Poisson open loop at `--rate`) runs on both
servers back to back, the order alternating from one level to the next so that neither always
goes first on a warmer machine. Each level gives three rows: ours, the peer's, and ours over the
peer's (throughput: higher is better; latencies: lower is better). Greedy answers to the same
prompt are compared too: a speedup that changes the text is not the same work.
"""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..settings import Settings
from .http_load import (
    LoadResult,
    Target,
    chat_of,
    closed_loop,
    open_loop,
    table,
    write_rows,
)

# The metrics compared, as columns of a row of `LoadResult.row`.
COMPARED = ("inputs_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms",
            "itl_p95_ms", "e2e_p50_ms", "e2e_p95_ms")  # fmt: skip


def run_against(
    settings: Settings,
    ours: Target,
    peer: Target,
    prompts: Path,
    max_new_tokens: int,
    load: tuple[list[int], float | None],
    out: Path,
    echo: Callable[..., None],
) -> list[dict[str, Any]]:
    """Each level of `load` (closed-loop client counts, open-loop rate) on `ours` and `peer`;
    print the table and the headline, write CSV, JSON and a PNG into `out`, log one MLflow run."""
    from ..lifecycle.tracking import start_run
    from ..serving.replies import read_requests

    concurrency, rate = load
    chats = [chat_of(raw) for _, raw in read_requests(prompts)]
    echo(f"bench --against {peer.url}: {len(chats)} prompts, {max_new_tokens} new tokens")
    for target in (ours, peer):
        target.stream(chats[0], 4)  # warm-up: the first request of a fresh server is slow
    levels: list[tuple[str, float]] = [("closed", c) for c in concurrency]
    levels += [("open", rate)] if rate else []
    params = {"url_host": ours.host, "against_host": peer.host, "served_model": ours.model,
              "peer_model": peer.model, "prompts": prompts.name, "prompt_count": len(chats),
              "bench_max_new_tokens": max_new_tokens,
              "concurrency": ",".join(map(str, concurrency)), "rate": rate}  # fmt: skip
    with start_run(settings, "bench-against", params) as run:
        pairs = []
        for i, (kind, amount) in enumerate(levels):
            done: dict[str, LoadResult] = {}
            for name, target in (("ours", ours), ("peer", peer))[:: 1 if i % 2 == 0 else -1]:
                echo(f"  {kind} loop {amount:g} on {name} ({target.url}) ...", err=True)
                if kind == "closed":
                    done[name] = closed_loop(target, chats, max_new_tokens, int(amount))
                else:
                    done[name] = open_loop(target, chats, max_new_tokens, amount)
            pairs.append((done["ours"], done["peer"]))
        rows = compare_rows(pairs)
        same, compared = identical_answers(pairs[0])
        lines = [*headline(rows, peer.url), f"identical answers: {same}/{compared}"]
        write(rows, out)
        echo(table(rows))
        for line in lines:
            echo(line)
        run.log_metrics(
            {f"{r['mode']}.{r['server']}.{k}": v for r in rows for k, v in r.items()
             if k in COMPARED and isinstance(v, float) and math.isfinite(v)}
            | {"identical_answers": same, "compared_answers": compared}
        )  # fmt: skip
        (out / "headline.txt").write_text("\n".join(lines) + "\n")
        run.log_artifact(out, "bench-against")
    echo(f"results: {out / 'against.csv'}, {out / 'against.png'}{run.where()}")
    return rows


def compare_rows(pairs: list[tuple[LoadResult, LoadResult]]) -> list[dict[str, Any]]:
    """Per level: our row, the peer's row and the row of ratios (ours / peer)."""
    rows: list[dict[str, Any]] = []
    for ours, peer in pairs:
        mine, theirs = ours.row(None), peer.row(None)
        ratio = {k: _ratio(mine[k], theirs[k]) for k in COMPARED}
        rows += [
            {"mode": ours.mode, "server": "ours", **_pick(mine)},
            {"mode": ours.mode, "server": "peer", **_pick(theirs)},
            {"mode": ours.mode, "server": "ours/peer", "inputs": "", "errors": "", **ratio},
        ]
    return rows


def _pick(row: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": row["inputs"], "errors": row["errors"], **{k: row[k] for k in COMPARED}}


def _ratio(ours: float, peer: float) -> float:
    if not (math.isfinite(ours) and math.isfinite(peer)) or peer == 0:
        return math.nan
    return round(ours / peer, 2)


def identical_answers(pair: tuple[LoadResult, LoadResult]) -> tuple[int, int]:
    """(answers identical, answers compared) between the two servers at one level, prompt by
    prompt, over the prompts both answered."""
    both = [
        (a.text, b.text)
        for a, b in zip(pair[0].samples, pair[1].samples, strict=True)
        if a.ok and b.ok
    ]
    return sum(a.strip() == b.strip() for a, b in both), len(both)


def headline(rows: list[dict[str, Any]], peer_url: str) -> list[str]:
    """`against URL: throughput 2.10x at 8, 2.30x at 32; TTFT p50 0.80x at 8`: the ratios of
    throughput at every level and of the median time to first token at each closed level."""
    ratios = [r for r in rows if r["server"] == "ours/peer"]
    throughput = ", ".join(f"{r['inputs_per_s']}x at {_level(r['mode'])}" for r in ratios)
    ttft = ", ".join(
        f"{r['ttft_p50_ms']}x at {_level(r['mode'])}"
        for r in ratios
        if r["mode"].startswith("closed")
    )
    return [f"against {peer_url}: throughput {throughput}; TTFT p50 {ttft}"]


def _level(mode: str) -> str:
    return mode.removeprefix("closed-") if mode.startswith("closed") else mode


def write(rows: list[dict[str, Any]], out: Path) -> None:
    """against.csv, against.json and against.png (throughput and TTFT p50 per level)."""
    write_rows(rows, out, "against")
    _plot(rows, out / "against.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, no global figure

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for ax, metric, label in (
        (axes[0], "inputs_per_s", "inputs/s (higher is better)"),
        (axes[1], "ttft_p50_ms", "TTFT p50, ms (lower is better)"),
    ):
        for shift, server, color in ((-0.2, "ours", "tab:blue"), (0.2, "peer", "tab:gray")):
            values = [
                next(r[metric] for r in rows if r["mode"] == m and r["server"] == server)
                for m in modes
            ]
            ax.bar([i + shift for i in range(len(modes))], values, 0.4, label=server, color=color)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
