"""From raw requests to replies: parse, prepare, generate; one bad request never fails others."""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import one_line
from ..messages import Limits, Reply, RequestError, Usage, parse_request, request_id_of
from ..settings import Settings
from .backend import Backend, Cancelled, Completion, OnIndexToken
from .batching import DynamicBatcher
from .prompts import GenerationParams, PreparedRequest, PromptBuilder
from .streaming import Scheduler, StaticStreamer

log = logging.getLogger(__name__)


@dataclass
class Admitted:
    """A request that passed validation, with the time it entered the service."""

    request: PreparedRequest
    received: float


class InferenceService:
    def __init__(
        self, backend: Backend, prompts: PromptBuilder, limits: Limits | None = None
    ) -> None:
        self.backend = backend
        self.prompts = prompts
        self.limits = limits or Limits()

    @classmethod
    def from_settings(cls, settings: Settings, backend: Backend) -> "InferenceService":
        prompts = PromptBuilder(
            backend.tokenizer,
            context_window=settings.context_window or backend.context_window,
            system_prompt=settings.system_prompt,
            defaults=generation_defaults(settings),
            max_new_tokens_limit=settings.max_new_tokens_limit,
        )
        return cls(backend, prompts, limits_of(settings))

    def admit(self, raw: bytes | str | dict, fallback_id: str) -> Admitted | Reply:
        """Validate and tokenize one raw request: an Admitted request or an error Reply.

        Never raises: whatever the request holds, a failure is this request's error reply.
        """
        received = time.perf_counter()
        try:
            request = parse_request(raw, fallback_id=fallback_id, limits=self.limits)
        except RequestError as exc:
            return Reply.failure(
                request_id_of(raw, fallback_id, self.limits.max_request_bytes), exc
            )
        except Exception as exc:  # a parser bug must not reach the caller
            log.exception("could not parse request %s", fallback_id)
            return Reply.failure(fallback_id, _unexpected(exc))
        try:
            return Admitted(self.prompts.prepare(request), received)
        except RequestError as exc:
            return Reply.failure(request.id, exc)
        except Exception as exc:  # e.g. a tokenizer failing on this one text
            log.exception("could not prepare request %s", request.id)
            return Reply.failure(request.id, _unexpected(exc))

    def run(self, batch: Sequence[Admitted], on_token: OnIndexToken | None = None) -> list[Reply]:
        """Generate replies for one batch, in order; an engine that streams (`streams`) calls
        `on_token(index in batch, token id)` as it decodes.

        If the batch as a whole fails, each request is retried alone so that one request that
        breaks the engine gets an error reply and the others are still served.
        """
        prepared = [a.request for a in batch]
        streaming = on_token is not None and getattr(self.backend, "streams", False)
        try:
            if streaming:
                completions = self.backend.generate(prepared, on_token=on_token)  # type: ignore[call-arg]
            else:
                completions = self.backend.generate(prepared)
        except Exception as exc:  # isolate the culprit below
            if len(batch) == 1:
                log.exception("generation failed for request %s", prepared[0].id)
                return [self.reply(batch[0], exc)]
            log.warning("a batch of %d failed; retrying its requests one by one", len(batch))
            return [
                reply
                for i, one in enumerate(batch)
                for reply in self.run([one], _shifted(on_token, i) if on_token else None)
            ]
        return [self.reply(a, c) for a, c in zip(batch, completions, strict=True)]

    def continuous(self, settings: Settings) -> Scheduler[Any] | None:
        """The backend's own scheduler when it has one and `scheduling` is continuous: requests
        join and leave between decode steps (transformers), or between overlapping batches
        (an engine that cannot add to a batch in flight)."""
        make = getattr(self.backend, "continuous", None)
        if make is None or settings.scheduling != "continuous":
            return None
        scheduler: Scheduler[Any] | None = make(
            settings.max_batch_size,
            settings.max_batch_tokens,
            packed_rows=settings.packed_decode_rows,
            attention_kernel=settings.decode_attention_kernel,
            max_wait_s=settings.max_wait_ms / 1000.0,
        )
        return scheduler

    def scheduler(self, settings: Settings) -> Scheduler[Any]:
        """What a caller that streams drives: the continuous batcher where there is one, else
        whole batches that stream tokens when the engine can."""
        continuous = self.continuous(settings)
        if continuous is not None:
            return continuous
        return StaticStreamer(
            self.backend,
            settings.max_batch_size,
            settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000.0,
        )

    def run_continuous(self, batcher: Scheduler[Any], batch: Sequence[Admitted]) -> list[Reply]:
        """Generate replies for `batch` through a continuous batcher; return them in order."""
        for i, admitted in enumerate(batch):
            batcher.add(admitted.request, i)
        replies: dict[int, Reply] = {}
        while len(batcher):
            for i, result in batcher.step():
                replies[i] = self.reply(batch[i], result)
        return [replies[i] for i in range(len(batch))]

    @staticmethod
    def reply(admitted: Admitted, result: Completion | Exception) -> Reply:
        """The reply to `admitted` from its completion, or an error reply if generation failed."""
        request = admitted.request
        if isinstance(result, Cancelled):
            error = RequestError("cancelled", "the client went away")
            return Reply.failure(request.id, error, _ms_since(admitted.received))
        if isinstance(result, Exception):
            error = RequestError("generation_failed", "the engine failed on this request")
            return Reply.failure(request.id, error, _ms_since(admitted.received))
        return Reply(
            id=request.id,
            text=result.text,
            finish_reason=result.finish_reason,
            usage=Usage(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            ),
            latency_ms=_ms_since(admitted.received),
        )


def _shifted(on_token: OnIndexToken, index: int) -> OnIndexToken:
    """`on_token` for a request run alone that was at `index` in its batch."""
    return lambda _, token: on_token(index, token)


def limits_of(settings: Settings) -> Limits:
    return Limits(
        max_request_bytes=settings.max_request_bytes,
        max_messages=settings.max_messages,
        max_prompt_chars=settings.max_prompt_chars,
    )


def _unexpected(exc: Exception) -> RequestError:
    return RequestError("invalid_request", f"this request could not be prepared: {one_line(exc)}")


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


def serve_lines(
    service: InferenceService,
    settings: Settings,
    raw: list[tuple[str, bytes]],
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    batch_sizes: list[int] | None = None,
    on_reply: Callable[[Reply], None] = lambda reply: None,
) -> list[Reply]:
    """Replies to (fallback id, raw request) pairs, in their order, batched as the settings say.

    `on_reply` is called with each reply as soon as it is known (bad lines first, then batch
    by batch); the size of each batch run is appended to `batch_sizes` when one is given.
    """
    replies: list[Reply | None] = [None] * len(raw)
    batcher: DynamicBatcher[tuple[int, Admitted]] = DynamicBatcher(
        max_batch_size=settings.max_batch_size,
        max_wait_s=0.0,  # every request is already here: nothing is worth waiting for
        max_batch_tokens=settings.max_batch_tokens,
        sort_by_length=settings.sort_by_length,
    )
    for position, (fallback_id, line) in enumerate(raw):
        admitted = service.admit(line, fallback_id)
        if isinstance(admitted, Reply):
            replies[position] = admitted
            on_reply(admitted)
        else:
            batcher.add((position, admitted), admitted.request.tokens)
    done = sum(r is not None for r in replies)
    on_progress(done, len(raw))
    for batch in batcher.drain():
        for (position, _), reply in zip(batch, service.run([a for _, a in batch]), strict=True):
            replies[position] = reply
            on_reply(reply)
        if batch_sizes is not None:
            batch_sizes.append(len(batch))
        done += len(batch)
        on_progress(done, len(raw))
    return [r for r in replies if r is not None]
