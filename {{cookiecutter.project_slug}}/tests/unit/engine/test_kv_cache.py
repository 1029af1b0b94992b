"""The continuous batcher's KV cache: rows join, grow and leave in place, and each row keeps its
own keys and values, left-padded with zeros, whatever moves around it."""

import torch
from transformers import LlamaConfig

from {{ cookiecutter.package_name }}.engine.kv_cache import (
    Slab,
    pad_left,
    supports_slab,
    swap_removal,
)

CONFIG = LlamaConfig(
    hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2
)  # head dim 4


def prompt(tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random keys and values of one prompt, for each layer: `[1, 2 heads, tokens, 4]`."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, 2, tokens, 4, generator=generator),
         torch.randn(1, 2, tokens, 4, generator=generator))
        for _ in range(CONFIG.num_hidden_layers)
    ]  # fmt: skip


def row_of(slab: Slab, layer: int, row: int, tokens: int) -> torch.Tensor:
    """The last `tokens` columns of a row's keys, as attention reads them."""
    return slab.keys[layer][row, :, slab.end - tokens : slab.end]


def test_swap_removal_moves_the_last_rows_into_the_holes():
    rows = list("abcdef")
    moves = swap_removal(len(rows), [1, 5, 2])
    for source, target in moves:
        rows[target] = rows[source]
    assert sorted(rows[:3]) == ["a", "d", "e"]
    assert len(moves) <= 3


def test_rows_keep_their_keys_through_joins_growth_and_leaves():
    slab = Slab(CONFIG, torch.float32, torch.device("cpu"), max_rows=4)
    short, long = prompt(3, 1), prompt(7, 2)
    slab.append([short])
    slab.append([long])  # longer than the slab: the first row moves right, padded with zeros
    assert (slab.rows, slab.length) == (2, 7)
    assert torch.equal(row_of(slab, 0, 0, 3), short[0][0][0])
    assert torch.equal(row_of(slab, 1, 1, 7), long[1][0][0])
    assert not slab.keys[0][0, :, slab.start : slab.end - 3].any()  # the padding is zeros
    steps = []
    for step in range(80):  # past the first 64 columns: the buffers grow and keep every row
        new = torch.full((2, 2, 1, 4), float(step))
        slab.reserve(slab.rows, slab.length + 1)  # as the batcher does before each step
        keys, _ = slab.write(0, new, new)
        slab.write(1, new, new)
        slab.advance()
        steps.append(new)
        assert keys.shape == (2, 2, slab.length, 4)
    assert slab.keys[0].shape[2] >= 87
    assert torch.equal(row_of(slab, 0, 1, 87)[:, :7], long[0][0][0])
    assert torch.equal(row_of(slab, 0, 1, 80), torch.cat(steps, dim=2)[1])
    slab.remove(swap_removal(2, [0]), rows=1, start=0)  # the long row takes the first slot
    assert slab.rows == 1
    assert torch.equal(row_of(slab, 1, 0, 87)[:, :7], long[1][0][0])


def test_a_join_of_several_prompts_shifts_once_and_pads_each_row():
    slab = Slab(CONFIG, torch.float32, torch.device("cpu"), max_rows=8)
    prompts = [prompt(n, seed) for seed, n in enumerate((5, 2, 9))]
    slab.append(prompts)
    assert (slab.rows, slab.length) == (3, 9)
    for row, (layers, tokens) in enumerate(zip(prompts, (5, 2, 9), strict=True)):
        assert torch.equal(row_of(slab, 1, row, tokens), layers[1][0][0])
        assert not slab.keys[1][row, :, slab.start : slab.end - tokens].any()


def test_pad_left_pads_masks_and_caches_on_the_left():
    assert pad_left(torch.ones(1, 2), 4).tolist() == [[0, 0, 1, 1]]
    assert pad_left(torch.ones(1, 1, 2, 3), 3)[0, 0, :, 0].tolist() == [0, 1, 1]


def test_a_sliding_window_model_is_not_put_on_the_slab():
    """Its sliding layers keep only the window: continuous batching leaves it to static batches."""
    from transformers import MistralConfig

    sliding = MistralConfig(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        sliding_window=8,
    )  # fmt: skip
    assert supports_slab(CONFIG)
    assert not supports_slab(sliding)
