"""The contract every inference engine keeps; the rest of the service sees only this."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..messages import FinishReason
from .prompts import PreparedRequest


class Cancelled(Exception):
    """The result of a request stopped before its end (its client went away)."""


OnIndexToken = Callable[[int, int], bool]  # (index in the batch, token id) -> True to stop it


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class Backend(Protocol):
    name: str
    tokenizer: Any  # renders chat templates and counts tokens for PromptBuilder
    context_window: int

    def generate(self, batch: list[PreparedRequest]) -> list[Completion]:
        """Return one completion per request, in order. Raises only when the whole batch fails."""
        ...

    def describe(self) -> dict[str, str]:
        """What tracking records of the engine as loaded: device, precision, threads, model."""
        ...


def generate_grouped(
    batch: list[PreparedRequest],
    generate_group: Callable[[list[PreparedRequest], OnIndexToken | None], list[Completion]],
    on_token: OnIndexToken | None = None,
    groups: Callable[[list[PreparedRequest]], list[list[int]]] | None = None,
) -> list[Completion]:
    """Run `generate_group` once per group of `groups(batch)` (indices; by default the
    sampling groups); return the completions in batch order. `on_token` hears each decoded
    token by the request's index in `batch`."""
    results: dict[int, Completion] = {}
    for indices in (groups or sampling_groups)(batch):
        group = [batch[i] for i in indices]
        heard = None
        if on_token is not None:
            heard = lambda i, token, indices=indices: on_token(indices[i], token)  # noqa: E731
        for i, completion in zip(indices, generate_group(group, heard), strict=True):
            results[i] = completion
    return [results[i] for i in range(len(batch))]


def sampling_groups(batch: list[PreparedRequest]) -> list[list[int]]:
    """Indices of requests that can share one engine call: greedy ones together, sampled ones
    by (temperature, top_p), and each seeded one alone, so that its text does not depend on its
    batchmates."""
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(batch):
        p = request.params
        if p.greedy:
            key: tuple = ("greedy",)
        elif p.seed is not None:
            key = ("seeded", i)
        else:
            key = ("sample", p.temperature, p.top_p)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


# Tokens decoded beyond the longest stop string's length in UTF-8 bytes: a token that decodes to
# nothing on its own (a skipped special token, a piece of a multi-byte character) must not hide a
# stop string that spans it, and the window never starts inside the stop string.
STOP_TAIL_MARGIN = 8


def stop_in_tail(tokenizer: Any, ids: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether the text of the generated `ids` holds a stop string ending in its last tokens.
    Checked after every token, so only a stop string the last token completed can be new, and
    one of n UTF-8 bytes spans at most n tokens: the tail is decoded, not the whole text on every
    step (quadratic in the reply's length)."""
    if not stops:
        return False
    window = max(len(s.encode()) for s in stops) + STOP_TAIL_MARGIN  # a token: a byte or more
    text = tokenizer.decode(list(ids[-window:]), skip_special_tokens=True)
    return any(s in text for s in stops)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Return `text` up to the earliest stop string and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
