"""Sampling one token from a row's logits: temperature and top-p, with a generator of its own."""

import math
from typing import Any

import torch


def sample(logits: torch.Tensor, params: Any, generator: torch.Generator | None) -> int:
    """One token from softmax(logits / temperature) within the top_p nucleus. The largest logit
    is subtracted first, so no temperature the request may ask for can overflow."""
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > params.top_p
        probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
    total = float(probs.sum())
    if not math.isfinite(total) or total <= 0.0:
        raise FloatingPointError("no probability mass left to sample from")
    return int(torch.multinomial(probs, 1, generator=generator))
