"""Overlapping batches ("waves") for an engine that runs several batches at once but cannot add
a request to a batch in flight: CTranslate2, whose `generate_batch` decodes a batch to its end
(it has no continuous batching: OpenNMT/CTranslate2#1333).

The engine has `lanes` batches running in parallel (CTranslate2's `inter_threads`, each batch on
threads of its own). A request that arrives while a batch decodes starts on a free lane as soon
as it is due, instead of waiting for that batch to end: the closest CTranslate2 allows to
requests joining between steps. Requests that are due together are spread evenly over the free
lanes, so that every lane's cores work. A batch is due once MAX_BATCH_SIZE requests wait or the
oldest has waited `max_wait_s`, as `StaticStreamer`'s are (company for the batch may arrive).
Tokens stream as they are decoded; a request whose `on_token` returns True stops alone.

Each batch runs on a thread of its own, so `step` never holds its caller for a whole batch:
arrivals are taken, and finished requests returned, while batches decode. `on_token` is called
from those threads (as CTranslate2 calls back from its own): the callers' hooks are thread-safe.
"""

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .backend import Cancelled, Completion
from .prompts import PreparedRequest
from .streaming import OnStart, OnToken, never_stop, started, take_batch

log = logging.getLogger(__name__)
T = TypeVar("T")
# The longest `step` waits for a batch to end when it has nothing else to do: arrivals are taken
# between steps, so this bounds how long a request that could start on a free lane waits.
POLL_S = 0.01


@dataclass(eq=False)
class _Wave(Generic[T]):
    batch: list[tuple[PreparedRequest, T]]
    stopped: set[int] = field(default_factory=set)  # rows whose caller said stop
    heard: set[int] = field(default_factory=set)  # rows that streamed a token
    results: list[Completion | Exception] = field(default_factory=list)
    fatal: BaseException | None = None  # what killed its thread: the caller's loop dies with it


class WaveScheduler(Generic[T]):
    """Whole batches, up to `lanes` at once, each started as soon as it is due and a lane is
    free; `step` until it is empty. One thread adds and steps (`Scheduler`'s contract)."""

    step_decodes = False  # a step polls the batches; it does not decode a token for each

    def __init__(
        self,
        backend: Any,
        lanes: int,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float = 0.0,
    ) -> None:
        if lanes < 1 or max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("lanes, max_batch_size and max_batch_tokens must be >= 1")
        self.backend, self.lanes = backend, lanes
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_wait_s = max_wait_s
        self.waiting: deque[tuple[PreparedRequest, T, float]] = deque()
        self.waves: list[_Wave[T]] = []
        self.finished: queue.SimpleQueue[_Wave[T]] = queue.SimpleQueue()
        self.on_token: OnToken = never_stop
        self.on_start: OnStart = started
        self.streams = getattr(backend, "streams", False)
        self.closing = False

    @property
    def running(self) -> list[T]:
        return [tag for wave in self.waves for _, tag in wave.batch]

    def __len__(self) -> int:
        return len(self.waiting) + sum(len(wave.batch) for wave in self.waves)

    def add(self, request: PreparedRequest, tag: T) -> None:
        self.waiting.append((request, tag, time.monotonic()))

    def take_waiting(self) -> list[T]:
        """Remove and return the requests that have not started (to requeue them)."""
        tags = [tag for _, tag, _ in self.waiting]
        self.waiting.clear()
        return tags

    def step(self) -> list[tuple[T, Completion | Exception]]:
        """Start the batches that are due on free lanes; return the requests whose batch ended.

        Waits at most POLL_S (less when a batch ends sooner) when there is nothing to return.
        Raises what killed a batch's thread, if anything did (not an engine error: those come
        back as each request's result).
        """
        self._start_due()
        done = self._collect(block=False)
        if not done and (self.waves or self.waiting):
            done = self._collect(block=True)
            self._start_due()
        return done

    def _start_due(self) -> None:
        free = self.lanes - len(self.waves)
        if free < 1 or not self.waiting:
            return
        due = self.waiting[0][2] + self.max_wait_s - time.monotonic()
        if due > 0 and len(self.waiting) < self.max_batch_size:
            return
        # spread evenly over the free lanes: every lane's cores decode
        size = min(self.max_batch_size, math.ceil(len(self.waiting) / free))
        while free and self.waiting:
            self._launch(self._take(size))
            free -= 1

    def _take(self, size: int) -> list[tuple[PreparedRequest, T]]:
        taken = take_batch(self.waiting, size, self.max_batch_tokens)
        return [(request, tag) for request, tag, _ in taken]

    def close(self) -> None:
        """Stop the batches in flight at their next token and wait for them (the caller is
        going away: a worker whose connection dropped, whose requests the broker redelivers),
        so that no batch of the model runs on behind a new scheduler. Their results are lost."""
        self.closing = True
        while self.waves:
            self.finished.get()
            self.waves = [wave for wave in self.waves if self._running(wave)]
        self.waiting.clear()

    def _running(self, wave: _Wave[T]) -> bool:
        return not (wave.results or wave.fatal)

    def _launch(self, batch: list[tuple[PreparedRequest, T]]) -> None:
        wave = _Wave(batch)
        for _, tag in batch:
            self.on_start(tag)
        thread = threading.Thread(target=self._run, args=(wave,), name="wave", daemon=True)
        thread.start()
        self.waves.append(wave)

    def _run(self, wave: _Wave[T]) -> None:
        """One batch, on its own thread; the wave goes to `finished` whatever happens."""
        requests = [request for request, _ in wave.batch]
        try:
            wave.results = self._generate(wave, requests, list(range(len(requests))))
        except Exception as exc:
            if len(requests) == 1:
                log.exception("request %s failed", requests[0].id)
                wave.results = [exc]
            else:  # as `InferenceService.run`: each request alone, so only the culprit fails
                log.warning("a batch of %d requests failed (%s): each alone", len(requests), exc)
                wave.results = [self._alone(wave, requests, i, exc) for i in range(len(requests))]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which dies of it
            wave.fatal = exc
        finally:
            self.finished.put(wave)

    def _alone(
        self, wave: _Wave[T], requests: list[PreparedRequest], i: int, error: Exception
    ) -> Completion | Exception:
        if i in wave.heard:  # its text has begun streaming: a second run would repeat it
            return error
        try:
            return self._generate(wave, [requests[i]], [i])[0]
        except Exception as exc:
            log.exception("request %s failed", requests[i].id)
            return exc

    def _generate(
        self, wave: _Wave[T], requests: list[PreparedRequest], rows: list[int]
    ) -> list[Completion | Exception]:
        """The engine's results for `requests`, rows `rows` of `wave`, streaming their tokens."""

        def on_token(index: int, token: int) -> bool:
            row = rows[index]
            if self.closing or row in wave.stopped or self.on_token(wave.batch[row][1], token):
                wave.stopped.add(row)
                return True
            wave.heard.add(row)
            return False

        if self.streams:
            results = list(self.backend.generate(requests, on_token=on_token))
        else:
            results = list(self.backend.generate(requests))
        if len(results) != len(requests):
            raise RuntimeError(f"the engine returned {len(results)} results for {len(requests)}")
        return results

    def _collect(self, block: bool) -> list[tuple[T, Completion | Exception]]:
        done: list[tuple[T, Completion | Exception]] = []
        while True:
            try:
                wave = self.finished.get(block=block and not done, timeout=POLL_S)
            except queue.Empty:
                return done
            self.waves.remove(wave)
            if wave.fatal is not None:
                raise wave.fatal
            for i, ((_, tag), result) in enumerate(zip(wave.batch, wave.results, strict=True)):
                done.append((tag, Cancelled() if i in wave.stopped else result))
