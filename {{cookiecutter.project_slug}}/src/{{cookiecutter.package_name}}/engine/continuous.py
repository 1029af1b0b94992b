"""Continuous batching: requests join and leave the running batch between decode steps.

A static batch holds every request until its longest one is done, and an arrival waits for the
batch in flight: under load, latency grows to several batches' time. Here each step decodes one
token for every running request; a finished one leaves at once and a waiting one joins at the
next step (iteration-level scheduling, as in Orca, vLLM and TGI). The KV cache is a preallocated,
left-padded slab (`kv_cache.py`): the newcomers are prefilled together and copied in as rows
(on a Llama model, in the same pass over the weights as the running rows' next tokens: see
`llama_step.py`); a finished row is overwritten by the last one, and columns that hold only
padding are left out of attention. Each sampled row draws from a generator of its own, so a
seeded request's text does not depend on its batchmates.
"""

import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F

from .backend import Cancelled, Completion, stop_in_tail
from .kv_cache import Layers, Slab, pad_left, swap_removal
from .llama_step import Decode, LlamaStep, Prompts
from .prefill import Prefill, Prefilled
from .prompts import PreparedRequest
from .sampling import pick
from .streaming import OnStart, OnToken, never_stop, started

log = logging.getLogger(__name__)
T = TypeVar("T")
# Prompt tokens prefilled together in one step, at most (a longer prompt goes alone, unsplit):
# joining prompts share one pass with the running rows, who wait for that many tokens' products.
PREFILL_CHUNK_TOKENS = 512


@dataclass
class _Row(Generic[T]):
    tag: T
    request: PreparedRequest
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens this row holds in the cache once its last token is fed."""
        return len(self.request.token_ids) + len(self.ids)


class ContinuousBatcher(Generic[T]):
    """Iteration-level scheduling over one transformers model; `step` until it is empty.

    Not thread-safe: one thread adds and steps (the worker's generation thread). A caller that
    streams sets `on_start` and `on_token` (see engine/streaming.py).
    """

    step_decodes = True

    def __init__(
        self,
        backend: Any,
        max_batch_size: int,
        max_batch_tokens: int,
        packed_rows: int = 0,
        attention_kernel: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch_size and max_batch_tokens must be >= 1")
        self.backend = backend
        self.model = backend.model
        self.device = backend.device
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[_Row[T]] = deque()
        self.running: list[_Row[T]] = []
        self._slab = Slab(self.model.config, self.model.dtype, self.device, max_batch_size)
        self._step = None
        if LlamaStep.supports(self.model):
            rows = min(packed_rows, max_batch_size)
            self._step = LlamaStep(self.model, self._slab, rows, attention_kernel)
        self._prefill = Prefill(self.model, self._step)
        self._prefix = self._prefill.prefix
        self._mask: torch.Tensor | None = None  # [rows, slab length]: 0 where padding
        self.on_token: OnToken = never_stop
        self.on_start: OnStart = started

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: PreparedRequest, tag: T) -> None:
        """Queue a request; it joins the running batch at the next step with room for it."""
        params = request.params
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        self.waiting.append(_Row(tag, request, generator))

    def take_waiting(self) -> list[T]:
        """Remove and return the requests that have not started (to requeue them)."""
        tags = [row.tag for row in self.waiting]
        self.waiting.clear()
        return tags

    @torch.inference_mode()
    def step(self) -> list[tuple[T, Completion | Exception]]:
        """Admit what fits, decode one token for every running request; return those done.

        On a written-out Llama, one pass decodes the running requests and prefills the joining
        ones (`LlamaStep.run`); on any other model, the joining ones are prefilled, then every
        request decodes. A request whose prefill or decoding fails comes back with its
        exception; the others go on.
        """
        joining = self._joining()
        for row in joining:
            self.on_start(row.tag)
        if self._step is not None and (joining or self.running):
            return self._pass(joining)
        finished = self._admit(joining) if joining else []
        if self.running:
            finished += self._decode()
        return finished

    # -- admission -------------------------------------------------------------------------------

    def _joining(self) -> list[_Row[T]]:
        """The waiting requests that join at this step: what the batch size, the token budget
        and the prefill chunk leave room for, in order of arrival."""
        joining: list[_Row[T]] = []
        longest = max((r.request.tokens for r in self.running), default=0)
        prompt_tokens = 0
        while self.waiting and len(self.running) + len(joining) < self.max_batch_size:
            candidate = self.waiting[0]
            longest_after = max(longest, candidate.request.tokens)
            rows_after = len(self.running) + len(joining) + 1
            if rows_after > 1 and rows_after * longest_after > self.max_batch_tokens:
                break
            prompt_tokens += len(candidate.request.token_ids)
            if joining and prompt_tokens > PREFILL_CHUNK_TOKENS:
                break  # the rest joins at the next steps: the running rows are not stalled
            joining.append(self.waiting.popleft())
            longest = longest_after
        return joining

    def _admit(
        self, joining: list[_Row[T]], results: list[Prefilled | Exception] | None = None
    ) -> list[tuple[T, Completion | Exception]]:
        """Join the prefilled requests (`results`: prefilled here if not given) to the batch with
        their first tokens; those whose prefill failed come back with their exceptions."""
        prefilled: list[tuple[_Row[T], Layers, int]] = []
        failed: list[tuple[T, Completion | Exception]] = []
        results = self._prefill.isolated(joining) if results is None else results
        for row, result in zip(joining, results, strict=True):
            if isinstance(result, Exception):  # one error reply, the others are served
                failed.append((row.tag, result))
            else:
                prefilled.append((row, *result))
        if not prefilled:
            return failed
        first = len(self.running)
        try:
            self._join([(row, layers) for row, layers, _ in prefilled])
        except (RuntimeError, MemoryError) as exc:  # the slab could not grow (out of memory)
            log.exception("%d requests could not join %d running", len(prefilled), first)
            rows = self.running + [row for row, *_ in prefilled]
            self.running, self._mask = [], None  # the slab may be half moved: start empty
            self._slab.clear()
            return failed + [(row.tag, exc) for row in rows]
        return failed + self._advance([token for *_, token in prefilled], first)

    def _join(self, joining: list[tuple[_Row[T], Layers]]) -> None:
        """Copy the newcomers' keys and values into the slab as rows; extend the mask."""
        self._slab.append([layers for _, layers in joining])
        masks = [] if self._mask is None else [self._mask]
        for row, _ in joining:
            tokens = len(row.request.token_ids)
            masks.append(torch.ones(1, tokens, dtype=torch.long, device=self.device))
        self._mask = torch.cat([pad_left(mask, self._slab.length) for mask in masks])
        self.running += [row for row, _ in joining]

    # -- one pass: the running rows decode, the joining prompts prefill ---------------------------

    def _pass(self, joining: list[_Row[T]]) -> list[tuple[T, Completion | Exception]]:
        """The running rows' next tokens and the joining prompts' first ones from one pass over
        the weights. If it fails, each part runs alone (the prompts each alone if need be), so
        that only what breaks fails; so does a joining prompt whose logits are NaN, which may
        have reached the others through attention's 0 x NaN."""
        assert self._step is not None
        rows = self.running
        decode, mask = None, self._mask
        prompts = Prompts([r.request.token_ids for r in joining], self._prefix) if joining else None
        try:
            if rows:
                last, positions, mask = self._decode_inputs()
                self._slab.reserve(len(rows), self._slab.length + 1)
                decode = Decode(last[:, 0], positions, mask)
            passed = self._step.run(decode, prompts)
        except Exception:  # each part alone: the rows' step, then the prompts (each alone)
            log.exception("a pass of %d rows and %d prompts failed", len(rows), len(joining))
            finished = self._decode() if self.running else []
            return finished + (self._admit(joining) if joining else [])
        finished = []
        if rows:
            assert passed.rows is not None
            self._mask = mask
            self._slab.advance()
            finished += self._advance(pick(passed.rows, rows))
        if joining:
            assert passed.prompts is not None
            results = self._prefill.first_tokens(passed.prompts, passed.layers, joining)
            finished += self._admit(joining, self._prefill.again_alone(joining, results))
        return finished

    # -- decoding --------------------------------------------------------------------------------

    def _decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running rows' last tokens and their positions (`[rows, 1]` each), and their mask
        with a column for those tokens."""
        assert self._mask is not None
        rows = self.running
        last = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.length - 1] for r in rows], device=self.device)
        return last, positions, F.pad(self._mask, (0, 1), value=1)

    @torch.inference_mode()
    def _decode(self) -> list[tuple[T, Completion | Exception]]:
        rows = self.running
        last, positions, self._mask = self._decode_inputs()
        try:
            self._slab.reserve(len(rows), self._slab.length + 1)
            if self._step is not None:
                logits = self._step(last[:, 0], positions, self._mask)
            else:
                out = self.model(
                    input_ids=last,
                    attention_mask=self._mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self._prefill.cache_arg: self._slab.cache},
                )
                logits = out.logits[:, -1, :]
        except Exception as exc:  # the rows in flight get error replies
            log.exception("a decode step of %d requests failed", len(rows))
            self.running, self._mask = [], None
            self._slab.clear()
            return [(r.tag, exc) for r in rows]
        self._slab.advance()
        return self._advance(pick(logits, rows))

    def _advance(
        self, tokens: Sequence[int | Exception], first: int = 0
    ) -> list[tuple[T, Completion | Exception]]:
        """Append the new tokens to the rows from `first` on; remove the rows that are done."""
        assert self._mask is not None
        eos = self.backend.eos_ids
        keep: list[int] = list(range(first))
        done: list[tuple[T, Completion | Exception]] = []
        for i, (row, token) in enumerate(zip(self.running[first:], tokens, strict=True), first):
            if isinstance(token, Exception):
                log.warning("request %s failed while decoding: %s", row.request.id, token)
                done.append((row.tag, token))
                continue
            row.ids.append(token)
            if self.on_token(row.tag, token):  # its client went away
                done.append((row.tag, Cancelled()))
            elif (
                token in eos
                or len(row.ids) >= row.request.params.max_new_tokens
                or _stopped(row, self.backend.tokenizer)
            ):
                done.append((row.tag, self.backend.completion(row.request, row.ids)))
            else:
                keep.append(i)
        if not done:
            return []
        if not keep:
            self.running, self._mask = [], None
            self._slab.clear()
            return done
        leaving = sorted(set(range(len(self.running))) - set(keep))
        moves = swap_removal(len(self.running), leaving)
        for source, target in moves:
            self.running[target] = self.running[source]
            self._mask[target] = self._mask[source]
        self.running = self.running[: len(keep)]
        self._mask = self._mask[: len(keep)]
        start = int(self._mask.any(dim=0).nonzero()[0])  # columns before it are padding only
        self._mask = self._mask[:, start:]
        self._slab.remove(moves, len(keep), start)
        return done


def _stopped(row: _Row[Any], tokenizer: Any) -> bool:
    return stop_in_tail(tokenizer, row.ids, row.request.params.stop)
