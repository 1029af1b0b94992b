"""A bfloat16 decode step in one call of our C code (`decode_step.c`) against the written-out
torch pass it replaces: the same logits within bfloat16's error of float32's, the same keys and
values in the slab, the same texts from a batcher, and torch's calls wherever it cannot run."""

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from {{ cookiecutter.package_name }}.engine import decode_attention, decode_step
from {{ cookiecutter.package_name }}.engine.decode_step import interleave, pack
from {{ cookiecutter.package_name }}.engine.hf import TransformersBackend
from {{ cookiecutter.package_name }}.engine.kv_cache import Slab, swap_removal
from {{ cookiecutter.package_name }}.engine.llama_step import (
    Decode,
    LlamaStep,
    Prompts,
    _additive,
)

from .test_continuous import backend, request, run_all, save_tiny_llama  # noqa: F401 - a fixture

SHAPES = {  # 3 query heads on each of 3 key/value heads of dim 64: the bundled model's kind
    "groups-3": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3),
    # dim 128, one query head a key/value head; 80 outputs: a product's last tile is one block
    "odd-blocks": dict(
        hidden_size=80,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=128,
        intermediate_size=48,
    ),
    "groups-8": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=1),
}


@pytest.fixture
def fresh_build(caplog):
    """The next build compiles again, its log captured; the real libraries are built after."""
    caplog.set_level(logging.INFO, logger=decode_step.__name__)
    caplog.set_level(logging.INFO, logger=decode_attention.__name__)
    decode_attention.build.cache_clear()
    yield
    decode_attention.build.cache_clear()


def tiny(tmp_path: Path, shape: dict[str, int], dtype: torch.dtype) -> Any:
    """The tiny Llama of this shape in this dtype, its norms' weights random (the same ones in
    either dtype), so that a norm applied wrong or to the wrong place shows."""
    save_tiny_llama(tmp_path, **shape)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
    return model


def step_on(model: Any) -> LlamaStep:
    return LlamaStep(model, Slab(model.config, model.dtype, torch.device("cpu"), 2))


def prompts(rows: int) -> list[list[int]]:
    return [[2 + (r * 7 + k * 3) % 46 for k in range(3 + (r * 5) % 13)] for r in range(rows)]


def prefilled(
    model: Any, ids: list[list[int]], trim: bool = False
) -> tuple[LlamaStep, torch.Tensor, list[list[int]]]:
    """A step on a slab holding `ids` as rows, those rows' mask, and the rows' ids in the
    slab's order. `trim`: a longer row came first and left, so attention starts past column 0
    (at the slab's `start`), as in a batcher once its longest request is done."""
    every = [[3] * (max(map(len, ids)) + 4), *ids] if trim else ids
    slab = Slab(model.config, model.dtype, torch.device("cpu"), len(every))
    step = LlamaStep(model, slab, packed_rows=8)
    slab.append(step.run(None, Prompts(every)).layers)
    mask = torch.zeros(len(every), slab.length, dtype=torch.long)
    for row, tokens in enumerate(every):
        mask[row, slab.length - len(tokens) :] = 1
    if trim:
        moves = swap_removal(len(every), [0])
        order = list(range(len(every)))
        for source, target in moves:
            mask[target], order[target] = mask[source], order[source]
        mask, order = mask[: len(ids)], order[: len(ids)]
        start = int(mask.any(dim=0).nonzero()[0])
        slab.remove(moves, len(ids), start)
        mask, every = mask[:, start:], [every[i] for i in order]
        assert slab.start > 0
    return step, mask, every


@pytest.mark.avx512_bf16_cpu
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("rows", [1, 5, 11])  # 11: a tile of 8 rows and one of 3
def test_the_fused_step_is_as_close_to_float32_as_torchs_and_writes_the_same_keys(
    tmp_path: Path, shape: dict[str, int], rows: int
) -> None:
    model, exact = (tiny(tmp_path, shape, dtype) for dtype in (torch.bfloat16, torch.float32))
    step, mask, ids = prefilled(model, prompts(rows), trim=True)
    fused = step.fused
    assert fused is not None
    tokens = torch.tensor([5 + r for r in range(rows)])
    torchs: list[torch.Tensor] = []  # each step's errors against float32, through torch's calls
    ours: list[torch.Tensor] = []  # and through ours
    for _ in range(3):
        mask = F.pad(mask, (0, 1), value=1)
        positions = torch.tensor([[len(t)] for t in ids])
        step.slab.reserve(rows, step.slab.length + 1)
        outputs, written, buffers = [], [], step.slab.keys + step.slab.values
        for path in (None, fused):
            step.fused = path
            before = [b.view(torch.int16).clone() for b in buffers]
            outputs.append(step.run(Decode(tokens, positions, mask), None).rows.float())
            end = step.slab.end
            written.append([b[:rows, :, end].float() for b in buffers])
        for old, new in zip(before, buffers, strict=True):  # nothing else written
            changed = old != new.view(torch.int16)
            changed[:rows, :, end] = False
            assert not changed.any()
        ids = [[*t, int(token)] for t, token in zip(ids, tokens, strict=True)]
        with torch.inference_mode():
            reference = torch.stack([exact(torch.tensor([t])).logits[0, -1] for t in ids])
        for errors, out in zip((torchs, ours), outputs, strict=True):
            errors.append((out - reference).abs())
        for theirs, mine in zip(*written, strict=True):  # one rounding apart at most
            assert torch.allclose(mine, theirs, rtol=2**-6, atol=2**-6 * theirs.abs().max())
        step.slab.advance()
        tokens = outputs[1].argmax(-1)
    # bfloat16's roundings differ from call to call: as close as torch's, give or take them (a
    # wrong norm, rotation or layout is 30x further, measured)
    theirs, mine = torch.stack(torchs), torch.stack(ours)
    assert mine.mean() <= 1.5 * theirs.mean() + 1e-3, (mine.mean(), theirs.mean())
    assert mine.max() <= 2.5 * theirs.max() + 1e-3, (mine.max(), theirs.max())


@pytest.mark.avx512_bf16_cpu
def test_the_weights_are_packed_at_the_first_step_in_the_thread_that_steps(tmp_path: Path) -> None:
    """Not where the batcher is made (the server's event loop): a thread that runs torch's
    parallel copies keeps an OpenMP pool, and a second pool slows the step's barriers."""
    model = tiny(tmp_path, SHAPES["groups-3"], torch.bfloat16)
    step, mask, _ = prefilled(model, prompts(3))
    assert step.fused is not None and decode_step.PACKED not in model.__dict__
    threads: list[str] = []
    failed: list[BaseException] = []
    original = step.fused.pack_weights
    step.fused.pack_weights = lambda: threads.append(threading.current_thread().name) or original()
    worker = threading.Thread(target=two_steps, args=(step, mask, failed), name="generation")
    worker.start()
    worker.join()
    assert not failed and step.fused is not None
    assert threads == ["generation"] and decode_step.PACKED in model.__dict__


def two_steps(step: LlamaStep, mask: torch.Tensor, failed: list[BaseException]) -> None:
    try:
        rows = mask.shape[0]
        step.slab.reserve(rows, step.slab.length + 1)
        positions = torch.full((rows, 1), step.slab.length)
        for _ in range(2):
            decode = Decode(torch.arange(2, 2 + rows), positions, F.pad(mask, (0, 1), value=1))
            step.run(decode, None)
    except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
        failed.append(exc)


@pytest.mark.avx512_bf16_cpu
def test_a_nan_in_one_rows_tokens_stays_in_that_row_and_threads_do_not_change_the_bits(
    tmp_path: Path,
) -> None:
    model = tiny(tmp_path, SHAPES["groups-3"], torch.bfloat16)
    step, mask, _ = prefilled(model, prompts(6))
    assert step.fused is not None
    step.slab.reserve(6, step.slab.length + 1)
    x = F.embedding(torch.arange(2, 8), step.embed)
    cos, sin = step.rotary(x, torch.tensor([[20]] * 6))
    additive = _additive(F.pad(mask, (0, 1), value=1).bool(), torch.float32)
    results, threads = [], torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(step.fused(x.clone(), cos, sin, additive, step.slab))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])
    x[4, 7] = float("nan")
    poisoned = step.fused(x.clone(), cos, sin, additive, step.slab)
    assert poisoned[4].isnan().all()
    assert torch.equal(poisoned[[0, 1, 2, 3, 5]], results[0][[0, 1, 2, 3, 5]])


@pytest.mark.avx512_bf16_cpu
def test_tensors_it_cannot_read_are_refused_in_one_line(tmp_path: Path) -> None:
    model = tiny(tmp_path, SHAPES["groups-3"], torch.bfloat16)
    step, mask, _ = prefilled(model, prompts(2))
    assert step.fused is not None
    slab = step.slab
    slab.reserve(2, slab.length + 1)
    x3 = F.embedding(torch.tensor([3, 4, 5]), step.embed)
    cos3, sin3 = step.rotary(x3, torch.tensor([[9], [9], [9]]))
    fine = _additive(F.pad(mask, (0, 1), value=1).bool(), torch.float32)
    x, cos, sin = x3[:2], cos3[:2], sin3[:2]
    wrong = [
        (x.float(), cos, sin, fine),  # float32 tokens
        (x[:, ::2], cos, sin, fine),  # not the hidden width
        (x.t().contiguous().t(), cos, sin, fine),  # the right shape, not contiguous
        (x, cos[:1], sin, fine),  # one row's cos
        (x, cos, sin, fine[:, :-1]),  # no column for the step's token
        (x, cos, sin, fine.bfloat16()),  # a bfloat16 mask
        (x3, cos3, sin3, torch.cat([fine, fine[:1]])),  # three rows on a slab of two
    ]
    for args in wrong:
        with pytest.raises(ValueError, match=r"^decode step: unexpected shapes or strides$"):
            step.fused(*args, slab)
    slab.end = slab.keys[0].shape[2]  # no column left for the step's keys
    with pytest.raises(ValueError, match=r"^decode step: unexpected shapes or strides$"):
        step.fused(x, cos, sin, torch.zeros(2, slab.length + 1), slab)


@pytest.mark.avx512_bf16_cpu
def test_a_bfloat16_batcher_decodes_on_the_fused_step_with_torchs_texts(
    backend,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Requests joining and leaving: the steps without a joining prompt run fused, the texts
    are those of torch's calls."""
    save_tiny_llama(tmp_path, hidden_size=192, num_attention_heads=3, num_key_value_heads=1)
    backend.tokenizer.save_pretrained(tmp_path)
    bf16 = TransformersBackend(tmp_path, device="cpu", dtype="bfloat16", num_threads=2)
    requests = [request(i, 3 + (i * 5) % 17, max_new_tokens=4 + i % 9) for i in range(10)]
    batchers = [bf16.continuous(4, 10_000, 8) for _ in range(2)]
    fused = batchers[0]._step.fused
    assert fused is not None
    batchers[1]._step.fused = None
    calls: list[int] = []
    function = fused.function
    fused.function = lambda *args: calls.append(args[12]) or function(*args)
    texts = [run_all(b, {0: requests[:5], 2: requests[5:]}) for b in batchers]
    assert texts[0] == texts[1]
    assert len(calls) > 10 and max(calls) == 4  # steps fused, four rows at most


@pytest.mark.avx512_bf16_cpu
def test_a_fused_step_that_fails_leaves_torchs_calls_for_good_and_no_request_fails(
    backend,  # noqa: F811
    tmp_path: Path,
    caplog,
) -> None:
    save_tiny_llama(tmp_path, hidden_size=192, num_attention_heads=3, num_key_value_heads=1)
    backend.tokenizer.save_pretrained(tmp_path)
    bf16 = TransformersBackend(tmp_path, device="cpu", dtype="bfloat16", num_threads=2)
    requests = [request(i, 3 + (i * 5) % 17, max_new_tokens=4 + i % 9) for i in range(6)]
    batchers = [bf16.continuous(4, 10_000, 8) for _ in range(2)]
    step = batchers[0]._step
    assert step.fused is not None
    step.fused.function = lambda *args: -2  # its scratch memory could not be had
    batchers[1]._step.fused = None
    texts = [run_all(b, {0: requests[:3], 2: requests[3:]}) for b in batchers]
    assert texts[0] == texts[1]
    assert all(not isinstance(text, Exception) for text in texts[0].values())
    assert step.fused is None and decode_step.PACKED not in step.model.__dict__  # freed
    said = "decode step: out of memory: decode steps through torch's calls from now on"
    assert said in caplog.text


def test_the_weights_are_packed_in_blocks_of_16_outputs_and_pairs_of_inputs() -> None:
    weight = torch.arange(64 * 6, dtype=torch.float32).view(64, 6)
    packed = pack(weight)
    assert packed.shape == (4, 3, 16, 2)
    for block, pair, lane, half in [(0, 0, 0, 0), (2, 1, 5, 1), (1, 2, 15, 0)]:
        assert packed[block, pair, lane, half] == weight[16 * block + lane, 2 * pair + half]
    gate, up = weight[:32], weight[32:] + 1000
    both = interleave(gate, up)
    assert torch.equal(both[:16], gate[:16]) and torch.equal(both[16:32], up[:16])
    assert torch.equal(both[32:48], gate[16:]) and torch.equal(both[48:], up[16:])


def test_float32_and_shapes_without_code_stay_on_torchs_calls(tmp_path: Path, caplog) -> None:
    for module in (decode_step, decode_attention):
        caplog.set_level(logging.INFO, logger=module.__name__)
    model = tiny(tmp_path, SHAPES["groups-3"], torch.float32)
    assert step_on(model).fused is None
    odd = dict(hidden_size=72, num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    model = tiny(tmp_path / "odd", odd, torch.bfloat16)
    assert step_on(model).fused is None
    assert "decode steps through torch's calls: widths 72 and 64 not in 16s" in caplog.text
    wide = dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=3, head_dim=32)
    model = tiny(tmp_path / "wide", wide, torch.bfloat16)
    assert step_on(model).fused is None
    said = "no code for 1 query heads a key/value head of dim 32"
    assert f"decode steps through torch's calls: {said}" in caplog.text


@pytest.mark.parametrize(
    ("compiler", "reason"),
    [(None, "no C compiler (cc) on this machine"), ("/bin/false", "decode_step.c did not build")],
)
def test_without_a_working_compiler_steps_stay_on_torchs_calls_and_the_log_says_why(
    monkeypatch, caplog, fresh_build, tmp_path: Path, compiler: str | None, reason: str
) -> None:
    model = tiny(tmp_path, SHAPES["groups-3"], torch.bfloat16)
    monkeypatch.setattr(shutil, "which", lambda name: compiler)
    assert step_on(model).fused is None
    assert f"decode steps through torch's calls: {reason}" in caplog.text
