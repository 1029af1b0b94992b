"""The `bench` command: every engine and the worker on one prompt set (see `bench.run`)."""

from pathlib import Path
from typing import Annotated

import typer

from ..cli.app import app, fail
from ..settings import Settings, load_settings

HTTP = {"rich_help_panel": "HTTP load (--url)"}


@app.command(rich_help_panel="Benchmark")
def bench(
    prompts: Annotated[Path, typer.Option(help="JSONL of prompts")] = Path(
        "data/bench_prompts.jsonl"
    ),
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    modes: Annotated[
        str | None, typer.Option(help="Comma-separated modes; default: every mode available")
    ] = None,
    load: Annotated[
        float, typer.Option(min=0.05, max=1.0, help="Open-loop rate, as a fraction of saturation")
    ] = 0.7,
    out: Annotated[Path, typer.Option(help="Folder for the CSV, JSON and PNG")] = Path("out/bench"),
    url: Annotated[
        str | None, typer.Option(help="Load this OpenAI-compatible server instead", **HTTP)
    ] = None,
    concurrency: Annotated[
        str, typer.Option(help="Closed-loop clients per level", **HTTP)
    ] = "1,8,32",
    rate: Annotated[
        float | None, typer.Option(min=0.01, help="Then open-loop requests/s", **HTTP)
    ] = None,
    model: Annotated[str | None, typer.Option(help="Default: its first model", **HTTP)] = None,
) -> None:
    """Benchmark every engine and the worker on one prompt set; ratios to the naive baseline.

    With --url, load an OpenAI-compatible server (this project's `serve`, llama-server, vLLM)
    with streamed chat completions: TTFT, inter-token and end-to-end latency per level.
    """
    settings = load_settings()
    if url is not None:
        _load_server(settings, url, model, concurrency, rate, prompts, max_new_tokens, out)
        return
    from ..bench.run import run_bench

    chosen = modes.split(",") if modes else None  # an unknown one: a SettingsError, one line
    run_bench(settings, prompts, max_new_tokens, chosen, load, out, typer.echo)


def _load_server(
    settings: Settings, url: str, model: str | None, concurrency: str, rate: float | None,
    prompts: Path, max_new_tokens: int, out: Path,
) -> None:  # fmt: skip
    from ..bench.http_load import Target, run_http_bench

    levels = [int(c) for c in concurrency.split(",") if c.strip().isdigit() and int(c) > 0]
    if not levels:
        fail(f"--concurrency {concurrency!r}: give positive integers, e.g. 1,8,32")
    key = settings.api_key.get_secret_value() if settings.api_key else None
    target = Target(url, model, key, settings.reply_timeout_s)
    run_http_bench(
        settings, target, prompts, max_new_tokens, levels, rate, out / "http", typer.echo
    )
