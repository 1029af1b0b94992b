"""The continuous batcher's KV cache: preallocated buffers that rows join and leave in place.

transformers' `DynamicCache` concatenates each step's keys and values onto the whole cache, a
copy of every layer's cache per token (10% of a float32 decode step at 8 rows, measured). Here
each layer owns one buffer per keys and values, `[rows, kv heads, columns, head dim]`, that grows
by doubling. The running rows are left-padded to one length: row r's tokens fill columns
`[end - length_r, end)`, every row writes its next token at column `end`, and attention reads
the view `[:rows, :, start:end]`, with no copy. A row that joins is copied in once; a row that
leaves is overwritten by the last row (`swap_removal`), one row's copy. Padding columns are
zeros, never stale NaNs, and the batcher's mask hides them.
"""

import ctypes
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # one prompt's keys and values, layer by layer


# A prefix shorter than this is not worth keeping (SmolLM2's default system prompt is 30 tokens).
MIN_PREFIX_TOKENS = 16


class PrefixCache:
    """The keys and values of the prefix that the latest prompts shared: a prompt that starts
    with it is prefilled from there on, as llama-server's prompt cache and vLLM's prefix caching
    do. A chat template's system prompt is such a prefix: most of a short chat prompt. One prefix
    is kept, the longest that a pass's prompts and the previous pass's first prompt share."""

    def __init__(self, min_tokens: int = MIN_PREFIX_TOKENS) -> None:
        self.tokens: list[int] = []
        self.layers: Layers = []
        self.min_tokens = min_tokens
        self._last: list[int] = []

    def covers(self, prompts: list[list[int]]) -> int:
        """The number of leading tokens of every prompt the cache holds (each keeps at least one
        of its own, for its logits), or 0."""
        n = len(self.tokens)
        return n if n and all(len(p) > n and p[:n] == self.tokens for p in prompts) else 0

    def learn(self, prompts: list[list[int]], layers: list[Layers]) -> None:
        """Keep the prefix these prompts (with their keys and values) share with the last ones."""
        group = prompts + ([self._last] if self._last else [])
        self._last = list(prompts[0])
        shared = min(len(p) for p in prompts) - 1
        for p in group[1:]:
            differs = (i for i, (a, b) in enumerate(zip(group[0], p, strict=False)) if a != b)
            shared = min(shared, next(differs, len(p)))
        if len(group) < 2 or shared < self.min_tokens or prompts[0][:shared] == self.tokens:
            return
        kept = [(k[:, :, :shared].clone(), v[:, :, :shared].clone()) for k, v in layers[0]]
        if all(bool(k.isfinite().all() and v.isfinite().all()) for k, v in kept):
            self.tokens, self.layers = list(prompts[0][:shared]), kept  # never a NaN to reuse


def prefill_packed(
    model: Any,
    prompts: list[list[int]],
    cache_arg: str = "past_key_values",
    prefix: PrefixCache | None = None,
) -> tuple[torch.Tensor, list[Layers]]:
    """The next-token logits (`[prompts, vocab]`) and the keys and values of `prompts`, from one
    pass over them packed end to end, each attending to itself only, causally: one matrix
    product over all their tokens, and no padding. Where `prefix` holds their first tokens, the
    pass starts after them and every token also attends to the prefix's keys and values. The
    mask is boolean: SDPA attention only."""
    device = model.device
    start = prefix.covers(prompts) if prefix is not None else 0
    lengths = [len(ids) - start for ids in prompts]
    positions = torch.tensor([start + p for length in lengths for p in range(length)])
    ends = torch.tensor(lengths).cumsum(0)
    prompt = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(lengths))
    at = torch.arange(sum(lengths))
    mask = (prompt[:, None] == prompt[None, :]) & (at[:, None] >= at[None, :])
    cache = DynamicCache(config=model.config)
    if start:
        assert prefix is not None
        mask = torch.cat([torch.ones(len(at), start, dtype=torch.bool), mask], dim=1)
        for index, (keys, values) in enumerate(prefix.layers):
            cache.update(keys, values, index)
    tokens = [token for ids in prompts for token in ids[start:]]
    out = model(
        input_ids=torch.tensor([tokens], device=device),
        attention_mask=mask[None, None].to(device),  # 4D: used as it is
        position_ids=positions[None].to(device),
        use_cache=True,
        **{cache_arg: cache},
        logits_to_keep=(ends - 1).to(device),
    )
    # transformers types a layer as a union with linear-attention layers (no keys): the
    # models served here have attention layers only (`supports_slab`).
    layers = [(layer.keys, layer.values) for layer in cast(list[Any], cache.layers)]
    owned = [
        torch.cat([torch.arange(start), torch.arange(start + end - length, start + end)])
        for end, length in zip(ends.tolist(), lengths, strict=True)
    ]
    owned_layers = [[(k[:, :, own], v[:, :, own]) for k, v in layers] for own in owned]
    if prefix is not None:
        prefix.learn(prompts, owned_layers)
    return out.logits[0], owned_layers


def supports_slab(config: Any) -> bool:
    """Whether every layer of this model is plain full attention (no sliding window, no linear
    attention): what the slab implements."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def swap_removal(rows: int, leaving: list[int]) -> list[tuple[int, int]]:
    """The (source, target) row moves that remove `leaving` from `rows` rows by moving the last
    row into each hole: rows keep no order, and each removal costs at most one row's copy."""
    moves, order = [], list(range(rows))
    for index in sorted(leaving, reverse=True):
        last = len(order) - 1
        if index != last:
            moves.append((order[last], index))
            order[index] = order[last]
        order.pop()
    return moves


class Slab:
    """Keys and values of the running rows in preallocated buffers (see the module's text)."""

    def __init__(
        self, config: Any, dtype: torch.dtype, device: torch.device, max_rows: int
    ) -> None:
        self.layers = int(config.num_hidden_layers)
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None)
        head_dim = int(head_dim or config.hidden_size // config.num_attention_heads)
        self.shape = (heads, head_dim)
        self.dtype, self.device, self.max_rows = dtype, device, max_rows
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = self.start = self.end = 0
        self._addresses: tuple[Any, Any] | None = None
        self.cache = DynamicCache(config=config)
        self.cache.layers = [_SlabLayer(self, i) for i in range(self.layers)]

    @property
    def length(self) -> int:
        """Columns that attention reads: the longest row's tokens."""
        return self.end - self.start

    def clear(self) -> None:
        self.rows = self.start = self.end = 0

    def append(self, prompts: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Add a row for each prompt: its keys and values, `[1, h, p, d]` for each layer."""
        lengths = [layers[0][0].shape[2] for layers in prompts]
        longest = max(lengths)
        if self.rows == 0:
            self.start = self.end = 0
        self.reserve(self.rows + len(prompts), max(self.length, longest) + 1)
        shift = max(0, longest - self.end)  # too few columns on the left: move the rows right
        if shift and self.rows:
            for buffer in self.keys + self.values:
                region = buffer[: self.rows, :, self.start : self.end].clone()
                buffer[: self.rows, :, self.start + shift : self.end + shift] = region
        self.start, self.end = self.start + shift, self.end + shift
        start = min(self.start, self.end - longest)
        for buffer in self.keys + self.values:  # padding is zeros: 0 x NaN would poison SDPA
            buffer[: self.rows, :, start : self.start] = 0
        self.start = start
        for layers, tokens in zip(prompts, lengths, strict=True):
            first = self.end - tokens
            for i, layer in enumerate(layers):
                for buffers, new in zip((self.keys, self.values), layer, strict=True):
                    buffers[i][self.rows, :, self.start : first] = 0
                    buffers[i][self.rows, :, first : self.end] = new[0]
            self.rows += 1

    def reserve(self, rows: int, columns: int) -> None:
        """Room for `rows` rows and `columns` columns from `start`: move the rows to column 0
        when that makes room, else grow the buffers (doubling) and copy them over."""
        have_rows = self.keys[0].shape[0] if self.keys else 0
        have_columns = self.keys[0].shape[2] if self.keys else 0
        if rows <= have_rows and self.start + columns <= have_columns:
            return
        if rows <= have_rows and columns <= have_columns // 2:
            self._move_to(self.keys, self.values)  # in place, to column 0
            return
        # Each dimension grows only when it is short: the copy below moves the rows to column 0.
        if rows > have_rows:
            rows = min(max(rows, 2 * have_rows), max(rows, self.max_rows))
        else:
            rows = have_rows
        if columns > have_columns or rows == have_rows:
            columns = max(columns, 2 * have_columns, 64)
        else:
            columns = have_columns
        size = (rows, self.shape[0], columns, self.shape[1])
        # Not zeros: columns are written before they are read, or zeroed as padding.
        fresh = [torch.empty(size, dtype=self.dtype, device=self.device)
                 for _ in range(2 * self.layers)]  # fmt: skip
        new_keys, new_values = fresh[: self.layers], fresh[self.layers :]
        self._move_to(new_keys, new_values)
        self.keys, self.values, self._addresses = new_keys, new_values, None

    def addresses(self) -> tuple[Any, Any]:
        """The keys' and the values' buffers' addresses, as C arrays (for `decode_step.c`):
        made once, and again when the buffers are replaced."""
        if self._addresses is None:
            keys, values = ((ctypes.c_void_p * len(b))(*[t.data_ptr() for t in b])
                            for b in (self.keys, self.values))  # fmt: skip
            self._addresses = (keys, values)
        return self._addresses

    def _move_to(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy the rows' columns `[start, end)` to columns `[0, length)` of `keys`/`values`."""
        length = self.length
        for old, new in ((self.keys, keys), (self.values, values)):
            for source, target in zip(old, new[: len(old)], strict=True):  # none at first
                region = source[: self.rows, :, self.start : self.end].clone()
                target[: self.rows, :, :length] = region
        self.start, self.end = 0, length

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's keys and values at column `end` of every row; return the views that
        attention reads. `advance` moves `end` once every layer has written."""
        rows, steps = keys.shape[0], keys.shape[2]  # rows past `rows`: a packed step's padding
        end = self.end + steps
        self.keys[layer][:rows, :, self.end : end] = keys
        self.values[layer][:rows, :, self.end : end] = values
        return (
            self.keys[layer][:rows, :, self.start : end],
            self.values[layer][:rows, :, self.start : end],
        )

    def advance(self, steps: int = 1) -> None:
        self.end += steps

    def remove(self, moves: list[tuple[int, int]], rows: int, start: int) -> None:
        """Apply `swap_removal`'s moves, keep `rows` rows, and let attention begin at column
        `start` (relative to the current start): the columns before it are padding only."""
        columns = slice(self.start, self.end)
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                for source, target in moves:
                    buffer[target, :, columns] = buffer[source, :, columns]
        self.rows = rows
        self.start += start


class _SlabLayer(DynamicLayer):
    """One layer of `Slab.cache`: transformers' model calls `update` with each step's keys."""

    def __init__(self, slab: Slab, index: int) -> None:
        super().__init__()
        self.slab, self.index = slab, index
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slab.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.slab.length


def pad_left(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dimension 2 of a [rows, heads, length, dim] cache (or dimension 1 of a mask)."""
    missing = length - (x.shape[2] if x.dim() == 4 else x.shape[1])
    if missing == 0:
        return x
    return F.pad(x, (0, 0, missing, 0) if x.dim() == 4 else (missing, 0))
