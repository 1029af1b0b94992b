"""Dynamic batching: pure logic, no model, no broker, no threads.

A batch is due when enough items wait, when their padded token cost reaches `max_batch_tokens`,
or when the oldest has waited `max_wait_s` (whichever comes first, the contract of Ray Serve's
`@serve.batch`). Enough is `max_batch_size`, or twice that with `sort_by_length`: under a burst
the batcher then chooses among two batches' worth, as an offline job sorting its whole input
would, instead of taking the first arrivals whatever their length; `max_wait_s` bounds the wait.
The oldest item always goes into the next batch, so nothing starves; with `sort_by_length` its
companions are the waiting items closest to it in length, which cuts padding.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Pending(Generic[T]):
    item: T
    tokens: int  # prompt tokens + new tokens: what the item occupies in a padded batch
    arrived: float
    seq: int = field(compare=False)


class DynamicBatcher(Generic[T]):
    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        max_batch_tokens: int,
        sort_by_length: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1, max_wait_s >= 0")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_batch_tokens = max_batch_tokens
        self.sort_by_length = sort_by_length
        self._clock = clock
        self._pending: list[Pending[T]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, item: T, tokens: int) -> None:
        self._pending.append(Pending(item, max(1, tokens), self._clock(), self._seq))
        self._seq += 1

    def seconds_until_due(self) -> float | None:
        """Seconds until the next batch is due: 0 if it is due now, None if nothing waits."""
        if not self._pending:
            return None
        if self._full():
            return 0.0
        waited = self._clock() - self._pending[0].arrived
        return max(0.0, self.max_wait_s - waited)

    def pop_batch(self, force: bool = False) -> list[T]:
        """Return the next batch if one is due (or anything waiting, when `force`), else []."""
        if not self._pending or (not force and self.seconds_until_due() != 0.0):
            return []
        chosen = self._choose()
        taken = {p.seq for p in chosen}
        self._pending = [p for p in self._pending if p.seq not in taken]
        return [p.item for p in chosen]

    def drain(self) -> list[list[T]]:
        """Every waiting item, in batches, regardless of time: for shutdown and offline jobs."""
        batches = []
        while self._pending:
            batches.append(self.pop_batch(force=True))
        return batches

    def _full(self) -> bool:
        lookahead = 2 if self.sort_by_length else 1
        if len(self._pending) >= lookahead * self.max_batch_size:
            return True
        return padded_cost(self._pending) >= self.max_batch_tokens

    def _choose(self) -> list[Pending[T]]:
        oldest = self._pending[0]
        if not self.sort_by_length:
            return self._fill([oldest], iter(self._pending[1:]))
        # Grow a window around the oldest item over the pending items sorted by length.
        ordered = sorted(self._pending, key=lambda p: (p.tokens, p.seq))
        at = ordered.index(oldest)
        lo, hi = at, at + 1
        while hi - lo < self.max_batch_size:
            below = ordered[lo - 1] if lo > 0 else None
            above = ordered[hi] if hi < len(ordered) else None
            if below is None and above is None:
                break
            take_below = above is None or (
                below is not None and oldest.tokens - below.tokens <= above.tokens - oldest.tokens
            )
            candidate = below if take_below else above
            assert candidate is not None  # not both None: that broke out above
            if padded_cost([*ordered[lo:hi], candidate]) > self.max_batch_tokens:
                break
            lo, hi = (lo - 1, hi) if take_below else (lo, hi + 1)
        return sorted(ordered[lo:hi], key=lambda p: p.seq)

    def _fill(self, batch: list[Pending[T]], rest: Iterator[Pending[T]]) -> list[Pending[T]]:
        for p in rest:
            if len(batch) >= self.max_batch_size:
                break
            if padded_cost([*batch, p]) > self.max_batch_tokens:
                break
            batch.append(p)
        return batch


def padded_cost(items: list[Pending[T]]) -> int:
    """Tokens a left-padded batch of `items` occupies: count times the longest."""
    return len(items) * max((p.tokens for p in items), default=0)
