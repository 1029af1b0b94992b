"""Every setting in one place: defaults that work offline, overridable by environment or `.env`."""

import difflib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import one_line

ENV_PREFIX = "{{ cookiecutter.package_name | upper }}_"
DEFAULT_MODEL = {{ cookiecutter.model_id | tojson }}
DEFAULT_QUEUE_PREFIX = "{{ cookiecutter.project_slug }}"
{%- if cookiecutter.tracking_backend == "mysql" %}
# The server's store; a password belongs in the environment or .env, never here.
MLFLOW_DATABASE = "{{ cookiecutter.package_name }}_mlflow"
DEFAULT_MLFLOW_BACKEND_STORE = f"mysql+pymysql://root@127.0.0.1:3306/{MLFLOW_DATABASE}"
{%- else %}
DEFAULT_MLFLOW_BACKEND_STORE = None  # None = the project's local store (tracking_dir)
{%- endif %}
{%- if cookiecutter.artifact_store == "s3" %}
DEFAULT_MLFLOW_ARTIFACTS = "s3://{{ cookiecutter.project_slug }}-mlflow/artifacts"
{%- else %}
DEFAULT_MLFLOW_ARTIFACTS = None  # None = the project's local store (tracking_dir)
{%- endif %}


def default_cache_dir() -> Path:
    return Path("~/.cache/{{ cookiecutter.project_slug }}").expanduser()


class Settings(BaseSettings):
    """Read once at the edge (the CLI) and passed down; nothing else reads the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # Model: bundled:<name>, a Hugging Face Hub id (org/name[@revision]) or a local directory.
    model: str = DEFAULT_MODEL
    cache_dir: Path = Field(default_factory=default_cache_dir)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Of the transformers engine. auto: on CUDA bfloat16 where supported, else float16; on a CPU
    # with bfloat16 instructions (AVX512-BF16, AMX) bfloat16 if it passes the quality gate
    # (once per model, cached), else float32.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    num_threads: int = Field(default=0, ge=0, description="CPU threads for torch; 0 = all cores")
    # The quality gate: a cheaper engine (bfloat16
    {%- if cookiecutter.inference_backend == "ctranslate2" %}, a CTranslate2 conversion{% endif %}) further
    # than this from the float32 model is refused.
    gate_min_top1: float = Field(default=0.95, ge=0.0, le=1.0)
    gate_max_ppl_ratio: float = Field(default=1.02, ge=1.0)
    gate_max_facts_lost: int = Field(default=0, ge=0)
    gate_min_exact_match: float = Field(default=0.0, ge=0.0, le=1.0)
{%- if cookiecutter.inference_backend == "ctranslate2" %}

    # Engine: ctranslate2 serves the converted model; transformers is its float reference.
    backend: Literal["ctranslate2", "transformers"] = "ctranslate2"
    # auto: the fastest scheme that passes the quality gate (see `convert`).
    quantization: Literal[
        "auto",
        "int8",
        "int8_float32",
        "int16",
        "int8_weights",
        "float32",
        "float16",
        "int8_float16",
        "bfloat16",
    ] = "{{ cookiecutter.quantization }}"
    inter_threads: int = Field(default=1, ge=1, description="CTranslate2 batches run in parallel")
    intra_threads: int = Field(default=0, ge=0, description="threads per batch; 0 = cores/inter")
{%- endif %}

    # Prompts
    system_prompt: str | None = None
    context_window: int | None = Field(default=None, ge=16, description="None = the model's own")

    # What one request may hold, checked before it is parsed or tokenized.
    max_request_bytes: int = Field(default=1_048_576, ge=256, description="raw body size")
    max_messages: int = Field(default=256, ge=1, description="chat turns per request")
    max_prompt_chars: int = Field(default=100_000, ge=1, description="characters of text")

    # Generation defaults for requests that do not say
    max_new_tokens: int = Field(default=64, ge=1)
    max_new_tokens_limit: int = Field(default=4096, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)

    # Dynamic batching
    max_batch_size: int = Field(default=32, ge=1)
    # 100 ms lets a burst of requests fill a batch (see the benchmark); small beside a generation.
    max_wait_ms: float = Field(default=100.0, ge=0.0)
    max_batch_tokens: int = Field(default=16384, ge=1, description="padded prompt+new tokens")
    sort_by_length: bool = True
    # How the worker batches on the transformers engine: `continuous` lets requests join and
    # leave the running batch between decode steps (latency under load stays near one request's
    # time); `static` runs the dynamic batcher's batches to completion.
{%- if cookiecutter.inference_backend == "ctranslate2" %} CTranslate2 has no
    # step-level API: there `continuous` runs overlapping batches, up to INTER_THREADS at once.
{%- endif %}
    scheduling: Literal["continuous", "static"] = "continuous"
    # Continuous batching's passes (decoding and prefill) run on weights prepacked by oneDNN,
    # laid out for this many rows (a CPU, float32 or bfloat16, a Llama model): a second copy of
    # the weights, a step up to 1.8x as fast. 0 = off.
    packed_decode_rows: int = Field(default=8, ge=0)
    # In bfloat16 on a CPU with AVX-512, continuous batching's decode attention runs a kernel
    # compiled at start with the machine's C compiler (engine/decode_attention.c): about 4x
    # SDPA's speed (3.8-4.5x at 8-32 rows); with AVX-512 BF16, a whole decode step is one call
    # of our code (engine/decode_step.c): about 1.9x torch's calls at 8 rows. Without a compiler
    # both are torch's. False = torch's always (SDPA's attention).
    decode_attention_kernel: bool = True

    # RabbitMQ: the URL may hold a password, so it comes from the environment or .env only.
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue_prefix: str = Field(default=DEFAULT_QUEUE_PREFIX, pattern=r"^[\w.-]+$")
    queue_max_length: int | None = Field(default=None, ge=1, description="backpressure")
    # A quorum queue redelivers a message at most this many times (a worker crashed or was
    # stopped while holding it), then dead-letters it: a message that kills workers stops there.
    queue_delivery_limit: int = Field(default=3, ge=1)
    # `submit` retries a full queue (QUEUE_MAX_LENGTH) this long, then fails with "queue full".
    queue_full_timeout_s: float = Field(default=60.0, gt=0)
    prefetch_count: int = Field(default=0, ge=0, description="0 = twice max_batch_size")
    heartbeat_s: int = Field(default=30, ge=1)
    report_every_s: float = Field(default=30.0, gt=0)
    client_window: int = Field(default=64, ge=1, description="requests in flight per client")
    reply_timeout_s: float = Field(default=300.0, gt=0)
    connect_timeout_s: float = Field(default=30.0, gt=0, description="client gives up after")
{%- if cookiecutter.worker_runtime == "ray" %}

    # Ray: RAY_ADDRESS (or this) joins a cluster ("auto", "host:6379", "ray://host:10001");
    # unset starts a local instance with RAY_NUM_CPUS (None = all cores).
    ray_address: str | None = None
    ray_num_cpus: int | None = Field(default=None, ge=1)
    replicas: int = Field(default=0, ge=0, description="Ray replicas; 0 = no Ray, in-process")
    ray_cpus_per_replica: float = Field(default=1.0, gt=0)
    ray_gpus_per_replica: float = Field(default=0.0, ge=0)
    ray_max_restarts: int = Field(default=3, ge=-1, description="-1 = restart forever")
    # Replicas that cannot be placed (not enough CPUs or GPUs) or loaded within this fail.
    ray_start_timeout_s: float = Field(default=300.0, gt=0)
{%- endif %}

    # MLflow: every job logs a run. Without a tracking URI the store is local to the project
    # (tracking_dir/mlflow.db and tracking_dir/artifacts, no server); MLFLOW_TRACKING_URI (or
    # this) points at a server, such as the one `mlflow-server` starts.
    tracking: bool = True
    tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices(f"{ENV_PREFIX}TRACKING_URI", "MLFLOW_TRACKING_URI"),
    )
    tracking_dir: Path = Path("mlruns")
    experiment: str = DEFAULT_QUEUE_PREFIX
    registered_model: str = Field(default=DEFAULT_QUEUE_PREFIX, pattern=r"^[\w.-]+$")
    champion_alias: str = Field(default="champion", pattern=r"^[A-Za-z_][\w-]*$")
    worker_metrics_every_s: float = Field(default=30.0, gt=0)
{%- if cookiecutter.include_finetuning == "yes" %}

    # LoRA fine-tuning (`finetune`): the adapter's shape and the training run. The defaults teach
    # the sample data's fact in about 30 steps on a 2-core CPU.
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    finetune_learning_rate: float = Field(default=2e-3, gt=0)
    finetune_steps: int = Field(default=30, ge=1)
    finetune_batch_size: int = Field(default=4, ge=1)
    finetune_max_seq_len: int = Field(default=256, ge=16)
{%- endif %}

    # `serve`: the OpenAI-compatible HTTP API. API_KEY (a bearer token for /v1/*) comes from the
    # environment or .env only and is never logged; None = no key asked for.
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(default=None, min_length=8)
    served_model_name: str | None = Field(default=None, pattern=r"^\S{1,256}$")  # None = MODEL
    max_waiting: int = Field(default=64, ge=0, description="queued past the batch; more get 429")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: in-flight may finish")
    cors_origins: list[str] = Field(default_factory=list, description="[] = no CORS headers")

    # `mlflow-server`: one lean process (one worker, job execution off) for small machines.
    mlflow_host: str = "127.0.0.1"
    mlflow_port: int = Field(default=5000, ge=1, le=65535)
    # Host headers the server accepts (MLflow's DNS-rebinding guard); None = MLflow's default.
    mlflow_allowed_hosts: str | None = None
    # May hold a password: from the environment or .env only, and never logged.
    mlflow_backend_store_uri: str | None = DEFAULT_MLFLOW_BACKEND_STORE
    mlflow_artifacts_destination: str | None = DEFAULT_MLFLOW_ARTIFACTS
    # Any S3-compatible endpoint (SeaweedFS, MinIO, moto); None = AWS. Credentials: the usual AWS_*
    # variables, needed by the server (and `artifacts push/pull`), never by MLflow clients.
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices(f"{ENV_PREFIX}S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
    )

    # Fault injection, for tests of crash recovery only: a request whose text contains this
    # marker makes the worker process exit at once (FAULT_EXIT_ON) or its generation thread
    # raise (FAULT_GENERATION_ON). Unset in any real deployment.
    fault_exit_on: str | None = Field(default=None, min_length=8)
    fault_generation_on: str | None = Field(default=None, min_length=8)

    @field_validator("cache_dir", "tracking_dir")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        """`~` in .env, which no shell expands (pip would, and the two would disagree)."""
        try:
            return path.expanduser()
        except RuntimeError:  # ~user for a user this machine does not have
            raise ValueError(f"cannot expand {path}: no such home directory") from None

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"


# scheme://user:PASSWORD@: everything up to the last @, so that a password with a raw /, ? or #
# (which ends the URL's authority for a parser) is masked all the same.
USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@]*):.*@")


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return USERINFO.sub(r"\1:***@", url, count=1)


class SettingsError(ValueError):
    """A setting has an invalid value; the message names it in one line."""


def load_settings(**overrides: Any) -> Settings:  # values of any type: pydantic checks them
    """Return the settings from defaults, `.env`, the environment and `overrides`.

    Raises SettingsError with one line per bad field instead of pydantic's long report.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
    except ValueError as exc:  # a value pydantic-settings cannot even decode (e.g. a list)
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{found.group(1).upper()}" if found else "a setting"
        raise SettingsError(f"invalid settings: {name}: {one_line(exc)}") from None


def setting_names() -> dict[str, str]:
    """Every variable a setting reads (`<PREFIX>_FIELD` and its aliases) -> the field's name."""
    names: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        names[f"{ENV_PREFIX}{name.upper()}"] = name
        if isinstance(field.validation_alias, AliasChoices):
            names |= dict.fromkeys(map(str, field.validation_alias.choices), name)
    return names


def unknown_variables(environ: Mapping[str, str], dotenv: Path = Path(".env")) -> list[str]:
    """`<PREFIX>_*` variables, in the environment or `.env`, that no setting reads: a typo is
    silently ignored otherwise. Each comes with the closest setting, if one is close."""
    known = setting_names()
    seen = set(environ)
    if dotenv.is_file():
        from dotenv import dotenv_values

        try:
            seen |= set(dotenv_values(dotenv))
        except UnicodeDecodeError as exc:
            problem = f"{exc.reason} at byte {exc.start}"
            raise SettingsError(f"{dotenv} is not UTF-8: {problem}") from None
    ours = [n.removeprefix(ENV_PREFIX) for n in known if n.startswith(ENV_PREFIX)]
    problems = []
    for name in sorted(n for n in seen if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), ours, n=1, cutoff=0.8)
        problems.append(name + (f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""))
    return problems


def effective_settings(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value) of every setting as the process sees it, secrets masked: a SecretStr
    shows `***` and a URL its user without the password. For `config show`."""
    shown = []
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            text = "***"
        elif value is None:
            text = ""
        elif isinstance(value, list):
            text = json.dumps(value)
        else:
            text = redact_url(str(value)) if "://" in str(value) else str(value)
        shown.append((f"{ENV_PREFIX}{name.upper()}", text))
    return shown
