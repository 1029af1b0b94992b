"""From raw requests to replies: parse, prepare, generate; one bad request never fails others."""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from {{ cookiecutter.package_name }}.backends import Backend
from {{ cookiecutter.package_name }}.messages import (
    Reply,
    RequestError,
    Usage,
    parse_request,
    request_id_of,
)
from {{ cookiecutter.package_name }}.prompts import (
    GenerationParams,
    PreparedRequest,
    PromptBuilder,
)
from {{ cookiecutter.package_name }}.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Admitted:
    """A request that passed validation, with the time it entered the service."""

    request: PreparedRequest
    received: float


class InferenceService:
    def __init__(self, backend: Backend, prompts: PromptBuilder) -> None:
        self.backend = backend
        self.prompts = prompts

    @classmethod
    def from_settings(cls, settings: Settings, backend: Backend) -> "InferenceService":
        prompts = PromptBuilder(
            backend.tokenizer,
            context_window=settings.context_window or backend.context_window,
            system_prompt=settings.system_prompt,
            defaults=generation_defaults(settings),
            max_new_tokens_limit=settings.max_new_tokens_limit,
        )
        return cls(backend, prompts)

    def admit(self, raw: bytes | str | dict, fallback_id: str) -> Admitted | Reply:
        """Validate and tokenize one raw request: an Admitted request or an error Reply."""
        received = time.perf_counter()
        try:
            request = parse_request(raw, fallback_id=fallback_id)
        except RequestError as exc:
            return Reply.failure(request_id_of(raw, fallback_id), exc)
        try:
            return Admitted(self.prompts.prepare(request), received)
        except RequestError as exc:
            return Reply.failure(request.id, exc)

    def run(self, batch: Sequence[Admitted]) -> list[Reply]:
        """Generate replies for one batch, in order.

        If the batch as a whole fails, each request is retried alone so that one request that
        breaks the engine gets an error reply and the others are still served.
        """
        prepared = [a.request for a in batch]
        try:
            completions = self.backend.generate(prepared)
        except Exception:  # isolate the culprit below
            if len(batch) == 1:
                log.exception("generation failed for request %s", prepared[0].id)
                error = RequestError("generation_failed", "the engine failed on this request")
                return [Reply.failure(prepared[0].id, error, _ms_since(batch[0].received))]
            log.warning("a batch of %d failed; retrying its requests one by one", len(batch))
            return [reply for one in batch for reply in self.run([one])]
        now = time.perf_counter()
        return [
            Reply(
                id=a.request.id,
                text=c.text,
                finish_reason=c.finish_reason,
                usage=Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens),
                latency_ms=round((now - a.received) * 1000.0, 3),
            )
            for a, c in zip(batch, completions, strict=True)
        ]


def generation_defaults(settings: Settings) -> GenerationParams:
    """What a request that leaves a generation parameter out gets."""
    return GenerationParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=None,
        stop=(),
    )


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)
