"""Token streaming: text deltas from token ids, and a static scheduler that streams.

Both schedulers (this one and `continuous.ContinuousBatcher`) keep one contract for a caller
that streams: `add(request, tag)`, `step()` until empty, `take_waiting()`, and two hooks set
by the caller: `on_start(tag)` when a request enters the running batch, and `on_token(tag,
token_id)` for each token it decodes, which returns True to stop that request (its client went
away): it leaves the batch and comes back from `step` as `Cancelled`.
"""

import logging
import time
from collections import deque
from collections.abc import Callable, Sized
from typing import Any, Generic, Protocol, TypeVar

from .backend import Cancelled, Completion, cut_at_stop
from .prompts import PreparedRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
OnToken = Callable[[Any, int], bool]  # (tag, token id) -> True to stop this request
OnStart = Callable[[Any], None]


class Scheduler(Protocol[T]):
    """What a caller that streams drives (the contract above): `ContinuousBatcher`,
    `StaticStreamer`, or one an engine brings (`backend.continuous`)."""

    max_batch_size: int
    on_token: OnToken
    on_start: OnStart
    step_decodes: bool  # each step decodes every running request (a batch-size sample)

    @property
    def running(self) -> Sized: ...

    @property
    def waiting(self) -> Sized: ...

    def __len__(self) -> int: ...

    def add(self, request: PreparedRequest, tag: T) -> None: ...

    def step(self) -> list[tuple[T, Completion | Exception]]: ...

    def take_waiting(self) -> list[T]: ...


Q = TypeVar("Q", bound=tuple)  # a waiting request: (PreparedRequest, tag, ...)


def take_batch(waiting: "deque[Q]", size: int, max_tokens: int) -> list[Q]:
    """Pop from the front of `waiting` (first come, first served) while the batch has fewer
    than `size` requests and its padded size (count x longest prompt and new tokens) stays
    within `max_tokens`; the first request is taken whatever its size."""
    batch: list[Q] = []
    longest = 0
    while waiting and len(batch) < size:
        longest_after = max(longest, waiting[0][0].tokens)
        if batch and (len(batch) + 1) * longest_after > max_tokens:
            break
        batch.append(waiting.popleft())
        longest = longest_after
    return batch


def never_stop(tag: object, token: int) -> bool:
    return False


def started(tag: object) -> None:
    return None


def eos_ids_of(backend: Any, tokenizer: Any) -> set[int]:
    """The ids that end a text: the backend's `eos_ids`, else the tokenizer's eos token."""
    eos = getattr(backend, "eos_ids", None)
    if eos:
        return set(eos)
    token = getattr(tokenizer, "eos_token_id", None)
    return set() if token is None else {token}


class TextStream:
    """The text of a growing list of token ids, handed out as deltas whose concatenation is the
    final text. A delta never ends inside a UTF-8 character, and text that could still become a
    stop string is held back until it cannot."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], eos_ids: set[int]) -> None:
        self.tokenizer, self.stops, self.eos_ids = tokenizer, stops, eos_ids
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        """The text that `token` makes final, maybe empty."""
        if token in self.eos_ids:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # the rest of the character is in the next token
            return ""
        text, _ = cut_at_stop(text, self.stops)
        safe = text[: len(text) - self._held(text)]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent) :], safe
        return delta

    def finish(self, final_text: str) -> str:
        """What is left to send once the request is done and its final text known."""
        if not final_text.startswith(self.sent):  # a tokenizer whose decoding is not prefix-stable
            log.warning("streamed text is not a prefix of the final text; the rest is dropped")
            return ""
        delta, self.sent = final_text[len(self.sent) :], final_text
        return delta

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that begin some stop string."""
        return max(
            (k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])),
            default=0,
        )


class StaticStreamer(Generic[T]):
    """Whole batches, first come first served, each run to completion, streaming tokens when
    the engine can (`streams = True`: its `generate` takes `on_token`). The
    scheduler for an engine without step-level control, or `scheduling=static`."""

    step_decodes = True  # a step runs a whole batch

    def __init__(
        self, backend: Any, max_batch_size: int, max_batch_tokens: int, max_wait_s: float = 0.0
    ) -> None:
        self.backend = backend
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s = max_wait_s
        self.waiting: deque[tuple[PreparedRequest, T]] = deque()
        self.arrived: deque[float] = deque()
        self.running: list[tuple[PreparedRequest, T]] = []
        self.on_token: OnToken = never_stop
        self.on_start: OnStart = started
        self.streams = getattr(backend, "streams", False)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: PreparedRequest, tag: T) -> None:
        self.waiting.append((request, tag))
        self.arrived.append(time.monotonic())

    def take_waiting(self) -> list[T]:
        tags = [tag for _, tag in self.waiting]
        self.waiting.clear()
        self.arrived.clear()
        return tags

    def step(self) -> list[tuple[T, Completion | Exception]]:
        """Run the next batch to completion; return each request with its result. The batch
        starts once MAX_BATCH_SIZE requests wait or the oldest has waited `max_wait_s` (until
        then this returns nothing after a short sleep: company for the batch may arrive)."""
        if not self.waiting:
            return []
        due = self.arrived[0] + self.max_wait_s - time.monotonic()
        if due > 0 and len(self.waiting) < self.max_batch_size:
            time.sleep(min(due, 0.005))
            return []
        batch = take_batch(self.waiting, self.max_batch_size, self.max_batch_tokens)
        for _ in batch:
            self.arrived.popleft()
        self.running = batch  # seen as running while it generates
        stopped: set[int] = set()
        for _, tag in batch:
            self.on_start(tag)

        def on_token(index: int, token: int) -> bool:
            if index in stopped or self.on_token(batch[index][1], token):
                stopped.add(index)
                return True
            return False

        requests = [request for request, _ in batch]
        try:
            if self.streams:
                results: list[Any] = self.backend.generate(requests, on_token=on_token)
            else:
                results = self.backend.generate(requests)
        except Exception as exc:
            log.exception("a batch of %d requests failed", len(batch))
            results = [exc] * len(batch)
        finally:
            self.running = []
        return [
            (tag, Cancelled() if i in stopped else result)
            for i, ((_, tag), result) in enumerate(zip(batch, results, strict=True))
        ]
