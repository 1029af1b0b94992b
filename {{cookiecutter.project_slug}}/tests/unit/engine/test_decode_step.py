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
from {{ cookiecutter.package_name }}.engine.kv_cache import Slab
from {{ cookiecutter.package_name }}.engine.llama_step import (
    Decode,
    LlamaStep,
    Prompts,
    _additive,
)

from .test_continuous import backend, request, run_all, save_tiny_llama  # noqa: F401 - a fixture

SHAPES = {  # 3 query heads a key/value head of dim 64, as the bundled model
    "groups-3": dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1),
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
    save_tiny_llama(tmp_path, **shape)
    return LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="sdpa")


def step_on(model: Any) -> LlamaStep:
    return LlamaStep(model, Slab(model.config, model.dtype, torch.device("cpu"), 2))


def prompts(rows: int) -> list[list[int]]:
    return [[2 + (r * 7 + k * 3) % 46 for k in range(3 + (r * 5) % 13)] for r in range(rows)]


def prefilled(model: Any, ids: list[list[int]]) -> tuple[LlamaStep, torch.Tensor]:
    """A step on a slab holding `ids` as rows, and those rows' mask."""
    slab = Slab(model.config, model.dtype, torch.device("cpu"), len(ids))
    step = LlamaStep(model, slab, packed_rows=8)
    slab.append(step.run(None, Prompts(ids)).layers)
    mask = torch.zeros(len(ids), slab.length, dtype=torch.long)
    for row, tokens in enumerate(ids):
        mask[row, slab.length - len(tokens) :] = 1
    return step, mask


@pytest.mark.avx512_bf16_cpu
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("rows", [1, 5, 11])  # 11: a tile of 8 rows and one of 3
def test_the_fused_step_is_as_close_to_float32_as_torchs_and_writes_the_same_keys(
    tmp_path: Path, shape: dict[str, int], rows: int
) -> None:
    model, exact = (tiny(tmp_path, shape, dtype) for dtype in (torch.bfloat16, torch.float32))
    ids = prompts(rows)
    step, mask = prefilled(model, ids)
    fused = step.fused
    assert fused is not None
    tokens = torch.tensor([5 + r for r in range(rows)])
    for _ in range(3):
        mask = F.pad(mask, (0, 1), value=1)
        positions = torch.tensor([[len(t)] for t in ids])
        step.slab.reserve(rows, step.slab.length + 1)
        outputs, written = [], []
        for path in (None, fused):
            step.fused = path
            outputs.append(step.run(Decode(tokens, positions, mask), None).rows.float())
            end = step.slab.end
            written.append([b[:rows, :, end].float() for b in step.slab.keys + step.slab.values])
        ids = [[*t, int(token)] for t, token in zip(ids, tokens, strict=True)]
        with torch.inference_mode():
            reference = torch.stack([exact(torch.tensor([t])).logits[0, -1] for t in ids])
        torchs, ours = ((out - reference).abs().max() for out in outputs)
        assert ours <= 1.5 * torchs + 1e-3, (ours, torchs)
        for theirs, mine in zip(*written, strict=True):  # one rounding apart at most
            assert torch.allclose(mine, theirs, rtol=2**-6, atol=2**-6 * theirs.abs().max())
        step.slab.advance()
        tokens = outputs[1].argmax(-1)


@pytest.mark.avx512_bf16_cpu
def test_the_weights_are_packed_at_the_first_step_in_the_thread_that_steps(tmp_path: Path) -> None:
    """Not where the batcher is made (the server's event loop): a thread that runs torch's
    parallel copies keeps an OpenMP pool, and a second pool slows the step's barriers."""
    model = tiny(tmp_path, SHAPES["groups-3"], torch.bfloat16)
    step, _ = prefilled(model, prompts(3))
    assert step.fused is not None and decode_step.PACKED not in model.__dict__
    threads: list[str] = []
    original = step.fused.pack_weights
    step.fused.pack_weights = lambda: threads.append(threading.current_thread().name) or original()
    worker = threading.Thread(target=two_steps, args=(step, 3), name="generation")
    worker.start()
    worker.join()
    assert threads == ["generation"] and decode_step.PACKED in model.__dict__


def two_steps(step: LlamaStep, rows: int) -> None:
    mask = torch.ones(rows, step.slab.length + 1, dtype=torch.long)
    step.slab.reserve(rows, step.slab.length + 1)
    positions = torch.full((rows, 1), step.slab.length)
    for _ in range(2):
        step.run(Decode(torch.arange(2, 2 + rows), positions, mask), None)


@pytest.mark.avx512_bf16_cpu
def test_a_nan_in_one_rows_tokens_stays_in_that_row_and_threads_do_not_change_the_bits(
    tmp_path: Path,
) -> None:
    model = tiny(tmp_path, SHAPES["groups-3"], torch.bfloat16)
    step, mask = prefilled(model, prompts(6))
    assert step.fused is not None
    step.slab.reserve(6, step.slab.length + 1)
    x = F.embedding(torch.arange(2, 8), step.embed)
    cos, sin = step.rotary(x, torch.tensor([[20]] * 6))
    additive = _additive(F.pad(mask, (0, 1), value=1).bool(), torch.float32)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(step.fused(x.clone(), cos, sin, additive, step.slab))
    torch.set_num_threads(2)
    assert all(torch.equal(results[0], other) for other in results[1:])
    x[4, 7] = float("nan")
    poisoned = step.fused(x.clone(), cos, sin, additive, step.slab)
    assert poisoned[4].isnan().all()
    assert torch.equal(poisoned[[0, 1, 2, 3, 5]], results[0][[0, 1, 2, 3, 5]])


@pytest.mark.avx512_bf16_cpu
def test_tensors_it_cannot_read_are_refused_in_one_line(tmp_path: Path) -> None:
    model = tiny(tmp_path, SHAPES["groups-3"], torch.bfloat16)
    step, mask = prefilled(model, prompts(2))
    assert step.fused is not None
    step.slab.reserve(2, step.slab.length + 1)
    x = F.embedding(torch.tensor([3, 4]), step.embed)
    cos, sin = step.rotary(x, torch.tensor([[9], [9]]))
    additive = _additive(F.pad(mask, (0, 1), value=1).bool(), torch.float32)
    wrong = [
        (x.float(), cos, sin, additive),  # float32 tokens
        (x[:, ::2], cos, sin, additive),  # not the hidden width
        (x, cos, sin, additive[:, :-1]),  # no column for the step's token
        (x, cos, sin, additive.bfloat16()),  # a bfloat16 mask
    ]
    for args in wrong:
        with pytest.raises(ValueError, match=r"^decode step: unexpected shapes or strides$"):
            step.fused(*args, step.slab)


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
    calls = []
    function = fused.function
    fused.function = lambda *args: calls.append(args[12]) or function(*args)
    texts = [run_all(b, {0: requests[:5], 2: requests[5:]}) for b in batchers]
    assert texts[0] == texts[1]
    assert len(calls) > 10 and max(calls) == 4  # steps fused, four rows at most


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
    caplog.set_level(logging.INFO, logger=decode_step.__name__)
    model = tiny(tmp_path, SHAPES["groups-3"], torch.float32)
    assert step_on(model).fused is None
    odd = dict(hidden_size=72, num_attention_heads=1, num_key_value_heads=1, head_dim=64)
    model = tiny(tmp_path / "odd", odd, torch.bfloat16)
    assert step_on(model).fused is None
    assert "decode steps through torch's calls: widths 72 and 64 not in 16s" in caplog.text


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
