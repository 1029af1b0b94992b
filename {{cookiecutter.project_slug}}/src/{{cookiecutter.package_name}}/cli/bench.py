"""The `bench` command: every engine and the worker on one prompt set (see `bench.run`)."""

from pathlib import Path
from typing import Annotated

import typer

from ..cli.app import app, fail
from ..settings import Settings, load_settings

HTTP = {"rich_help_panel": "HTTP load (--url, --against)"}
DEFAULT_PROMPTS = Path("data/bench_prompts.jsonl")


# The options of `bench --url`/`--against`, as types: the command's signature stays readable.
Url = Annotated[str | None, typer.Option(help="Load this OpenAI-compatible server instead", **HTTP)]
Concurrency = Annotated[str, typer.Option(help="Closed-loop clients per level", **HTTP)]
Rate = Annotated[float | None, typer.Option(min=0.01, help="Then open-loop requests/s", **HTTP)]
Model = Annotated[str | None, typer.Option(help="Default: its first model", **HTTP)]
Against = Annotated[
    str | None, typer.Option(help="And this peer, side by side (--url: default ours)", **HTTP)
]
AgainstModel = Annotated[str | None, typer.Option(help="The peer's model", **HTTP)]
Modes = Annotated[
    str | None, typer.Option(help="Comma-separated modes; default: every mode available")
]
Load = Annotated[
    float, typer.Option(min=0.05, max=1.0, help="Open-loop rate, as a fraction of saturation")
]
Repeat = Annotated[
    int, typer.Option(min=1, max=20, help="Worker idle and open-loop runs; the median is shown")
]


@app.command(rich_help_panel="Benchmark")
def bench(
    prompts: Annotated[Path, typer.Option(help="JSONL of prompts")] = DEFAULT_PROMPTS,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    modes: Modes = None,
    load: Load = 0.7,
    repeat: Repeat = 3,
    out: Annotated[Path, typer.Option(help="Folder for the CSV, JSON and PNG")] = Path("out/bench"),
    url: Url = None,
    concurrency: Concurrency = "1,8,32",
    rate: Rate = None,
    model: Model = None,
    against: Against = None,
    against_model: AgainstModel = None,
) -> None:
    """Benchmark every engine and the worker on one prompt set; ratios to the naive baseline.

    With --url, load an OpenAI-compatible server (this project's `serve`, llama-server, vLLM)
    with streamed chat completions: TTFT, inter-token and end-to-end latency per level. With
    --against, load ours (--url, default this project's HTTP_HOST:HTTP_PORT) and that peer in
    turn, level by level, with the ratio of each metric.
    """
    settings = load_settings()
    if url is not None or against is not None:
        url = url or f"http://{settings.http_host}:{settings.http_port}"
        peer = (against, against_model)
        _load_server(settings, url, model, peer, concurrency, rate, prompts, max_new_tokens, out)
        return
    from ..bench.run import run_bench

    chosen = modes.split(",") if modes else None  # an unknown one: a SettingsError, one line
    run_bench(settings, prompts, max_new_tokens, chosen, load, out, typer.echo, repeat)


def _load_server(
    settings: Settings, url: str, model: str | None, peer: tuple[str | None, str | None],
    concurrency: str, rate: float | None, prompts: Path, max_new_tokens: int, out: Path,
) -> None:  # fmt: skip
    from ..bench.http_load import Target, run_http_bench

    levels = [int(c) for c in concurrency.split(",") if c.strip().isdigit() and int(c) > 0]
    if not levels:
        fail(f"--concurrency {concurrency!r}: give positive integers, e.g. 1,8,32")
    key = settings.api_key.get_secret_value() if settings.api_key else None
    target = Target(url, model, key, settings.reply_timeout_s)
    if peer[0] is not None:
        from ..bench.against import run_against

        other = Target(peer[0], peer[1], None, settings.reply_timeout_s, option="--against")
        load = (levels, rate)
        run_against(
            settings, target, other, prompts, max_new_tokens, load, out / "against", typer.echo
        )
        return
    run_http_bench(
        settings, target, prompts, max_new_tokens, levels, rate, out / "http", typer.echo
    )
