"""The joining prompts' prefill: their keys and values and first tokens, from one pass over them
packed end to end (`llama_step.py` on a Llama, else the model's modules through
`kv_cache.prefill_packed`), or each prompt alone, so that only a prompt that breaks fails."""

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .kv_cache import Layers, PrefixCache, prefill_packed
from .llama_step import LlamaStep, Prompts
from .sampling import pick

log = logging.getLogger(__name__)
Prefilled = tuple[Layers, int]  # a prompt's keys and values, layer by layer, and first token


class Prefill:
    def __init__(self, model: Any, step: LlamaStep | None) -> None:
        self.model, self.step = model, step
        self.packs = getattr(model.config, "_attn_implementation", "") == "sdpa"
        self.prefix = PrefixCache() if self.packs else None
        # transformers renamed `past_key_values` to `cache` in 5.x; pass what this model takes.
        forward = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"

    def isolated(self, rows: Sequence[Any]) -> list[Prefilled | Exception]:
        """The rows' prompts (`rows[i].request.token_ids`) prefilled in one pass where attention
        is SDPA (the packing mask is a boolean one); if that pass fails, or a row of it does (a
        NaN reaches the others through attention's 0 x NaN), each prompt alone, so that only
        the one that breaks fails."""

        def separately() -> list[Prefilled | Exception]:
            return [one for row in rows for one in self.isolated([row])]

        if len(rows) > 1 and not self.packs:
            return separately()
        try:
            results = self._together(rows)
        except Exception as exc:
            if len(rows) > 1:
                return separately()
            log.exception("prefill failed for request %s", rows[0].request.id)
            return [exc]
        return self.again_alone(rows, results)

    def again_alone(
        self, rows: Sequence[Any], results: list[Prefilled | Exception]
    ) -> list[Prefilled | Exception]:
        """`results` of a pass that packed several prompts, with each failed one prefilled
        again alone: a NaN of one prompt's reaches the others through attention's 0 x NaN, as
        NaN, so a prompt whose logits are finite was not reached, and its first token (drawn
        from its generator, if it samples) stands."""
        if len(rows) < 2:
            return results
        pairs = zip(rows, results, strict=True)
        return [self.isolated([row])[0] if isinstance(x, Exception) else x for row, x in pairs]

    def _together(self, rows: Sequence[Any]) -> list[Prefilled | Exception]:
        prompts = [row.request.token_ids for row in rows]
        if self.step is not None:
            passed = self.step.run(None, Prompts(prompts, self.prefix))
            assert passed.prompts is not None
            logits, layers = passed.prompts, passed.layers
        else:
            logits, layers = prefill_packed(self.model, prompts, self.cache_arg, self.prefix)
        return self.first_tokens(logits, layers, rows)

    @staticmethod
    def first_tokens(
        logits: torch.Tensor, layers: list[Layers], rows: Sequence[Any]
    ) -> list[Prefilled | Exception]:
        """Each prompt's first token picked from its logits, with its keys and values."""
        pairs = zip(pick(logits, rows), layers, strict=True)
        return [t if isinstance(t, Exception) else (own, t) for t, own in pairs]
