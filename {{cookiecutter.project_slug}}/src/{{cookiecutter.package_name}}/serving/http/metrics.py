"""Prometheus metrics of the HTTP API, named as vLLM names them so its dashboards carry over
(`vllm:` names, a `model_name` label); the two vLLM has no name for carry the package's name."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OWN = "{{ cookiecutter.package_name }}"  # the prefix of the metrics vLLM has no name for


class Metrics:
    """One registry per server (tests start several in one process)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.running = Gauge(
            "vllm:num_requests_running", "Requests decoding now.", labels, registry=r
        ).labels(model_name)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests accepted, not yet decoding.", labels, registry=r
        ).labels(model_name)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        ).labels(model_name)  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between two tokens of a request.", labels,
            buckets=TOKEN_BUCKETS, registry=r,
        ).labels(model_name)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to last token.", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        ).labels(model_name)  # fmt: skip
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Arrival to joining the running batch.", labels,
            buckets=LATENCY_BUCKETS, registry=r,
        ).labels(model_name)  # fmt: skip
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated for finished requests.", labels, registry=r
        ).labels(model_name)
        self.success = Counter(
            "vllm:request_success", "Requests finished, by reason.",
            [*labels, "finished_reason"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            f"{OWN}:request_errors", "Requests refused or failed, by error code.",
            [*labels, "error_type"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            f"{OWN}:batch_size", "Requests decoding together, per engine step.", labels,
            buckets=BATCH_BUCKETS, registry=r,
        ).labels(model_name)  # fmt: skip
        self.model_name = model_name

    def finished(self, reason: str, prompt_tokens: int, generation_tokens: int) -> None:
        self.success.labels(self.model_name, reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)

    def error(self, error_type: str) -> None:
        self.errors.labels(self.model_name, error_type).inc()
