"""The bfloat16 decode attention kernel against SDPA: the same attention, built here with the
machine's compiler, and SDPA's wherever it cannot be built."""

import logging
import shutil
import tempfile

import pytest
import torch
import torch.nn.functional as F

from {{ cookiecutter.package_name }}.engine import decode_attention
from {{ cookiecutter.package_name }}.engine.decode_attention import kernel_for
from {{ cookiecutter.package_name }}.engine.hf import TransformersBackend

from .test_continuous import backend, request, run_all, save_tiny_llama  # noqa: F401 - a fixture

CPU = torch.device("cpu")


@pytest.fixture
def kernel() -> decode_attention.DecodeAttention:
    """The kernel for the bundled model's shape: 9 query heads on 3 key/value heads of dim 64."""
    built = kernel_for(CPU, torch.bfloat16, 9, 3, 64)
    assert built is not None, "a CPU with AVX-512 and, here, cc builds it"
    return built


@pytest.fixture
def fresh_build(caplog):
    """The next `kernel_for` builds again, its log captured; the real kernel is built after."""
    caplog.set_level(logging.INFO, logger=decode_attention.__name__)
    decode_attention.build.cache_clear()
    yield
    decode_attention.build.cache_clear()


def slab_views(rows: int, kv_heads: int, columns: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Keys and values as the batcher's slab hands them over: views into bigger buffers."""
    keys, values = (torch.randn(rows + 3, kv_heads, columns + 40, dim) for _ in range(2))
    view = (slice(1, rows + 1), slice(None), slice(7, 7 + columns))
    return keys.bfloat16()[view], values.bfloat16()[view]


def padded_mask(rows: int, columns: int) -> torch.Tensor:
    """Left padding of a different width a row, each row keeping at least its last column."""
    mask = torch.ones(rows, columns, dtype=torch.bool)
    for row in range(rows):
        mask[row, : (row * 5) % columns] = False
    return mask


@pytest.mark.avx512_cpu
@pytest.mark.parametrize(
    ("kv_heads", "groups", "dim"), [(3, 3, 64), (1, 3, 64), (3, 1, 64), (2, 4, 128), (3, 8, 64)]
)
@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (5, 17), (9, 263)])
def test_the_kernel_attends_as_sdpa_does(
    kv_heads: int, groups: int, dim: int, rows: int, columns: int
) -> None:
    torch.manual_seed(rows * columns + groups)
    kernel = kernel_for(CPU, torch.bfloat16, kv_heads * groups, kv_heads, dim)
    assert kernel is not None, "a CPU with bfloat16 instructions has AVX-512 and, here, cc"
    keys, values = slab_views(rows, kv_heads, columns, dim)
    q = torch.randn(rows, kv_heads * groups + kv_heads, dim).bfloat16()[:, : kv_heads * groups]
    q = q.reshape(rows, kv_heads, groups, dim)  # queries and keys side by side, as in a step
    mask = padded_mask(rows, columns)
    additive = torch.zeros(rows, columns).masked_fill_(~mask, float("-inf"))
    with torch.inference_mode():
        ours = kernel.attend(q, keys, values, additive, dim**-0.5).float()
        exact = F.scaled_dot_product_attention(
            q.float(), keys.float(), values.float(), additive[:, None, None], scale=dim**-0.5
        ).flatten(1)
        sdpa = F.scaled_dot_product_attention(
            q, keys, values, additive.bfloat16()[:, None, None], scale=dim**-0.5
        ).flatten(1)
    # float32 inside, one rounding to bfloat16 at the end: as close to exact as SDPA's own
    assert (ours - exact).abs().max() <= max((sdpa.float() - exact).abs().max(), 2**-8)
    assert torch.equal(ours.isfinite(), exact.isfinite())


@pytest.mark.avx512_cpu
def test_a_nan_in_a_rows_keys_makes_that_row_nan_and_only_it(kernel) -> None:
    keys, values = slab_views(4, 3, 20, 64)
    keys[2, 1, 5, 0] = float("nan")
    q = torch.randn(4, 3, 3, 64).bfloat16()
    out = kernel.attend(q, keys, values, torch.zeros(4, 20), 0.125).view(4, 3, 3, 64)
    assert out[2, 1].isnan().all()
    assert out[[0, 1, 3]].isfinite().all() and out[2, [0, 2]].isfinite().all()


@pytest.mark.avx512_cpu
def test_a_nan_in_a_rows_values_makes_that_row_nan_as_in_sdpa(kernel) -> None:
    keys, values = slab_views(2, 3, 12, 64)
    values[1, 0, 3, 7] = float("nan")
    q = torch.randn(2, 3, 3, 64).bfloat16()
    out = kernel.attend(q, keys, values, torch.zeros(2, 12), 0.125).view(2, 3, 3, 64)
    assert out[1, 0, :, 7].isnan().all() and out[0].isfinite().all() and out[1, 1:].isfinite().all()


@pytest.mark.avx512_cpu
def test_a_row_with_every_column_masked_attends_to_nothing_as_in_sdpa(kernel) -> None:
    keys, values = slab_views(2, 3, 12, 64)
    mask = torch.zeros(2, 12)
    mask[0] = float("-inf")
    q = torch.randn(2, 3, 3, 64).bfloat16()
    out = kernel.attend(q, keys, values, mask, 0.125)
    sdpa = F.scaled_dot_product_attention(q, keys, values, mask.bfloat16()[:, None, None])
    assert torch.equal(out[0], sdpa.flatten(1)[0]) and not out[0].any()
    assert out[1].isfinite().all() and out[1].any()


@pytest.mark.avx512_cpu
def test_the_threads_share_the_rows_and_the_result_does_not_depend_on_them(kernel) -> None:
    keys, values = slab_views(7, 3, 40, 64)
    q = torch.randn(7, 3, 3, 64).bfloat16()
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outs.append(kernel.attend(q, keys, values, torch.zeros(7, 40), 0.125))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.avx512_cpu
def test_tensors_it_cannot_read_are_refused_in_one_line(kernel) -> None:
    keys, values = slab_views(2, 3, 10, 64)
    q, mask = torch.randn(2, 3, 3, 64).bfloat16(), torch.zeros(2, 10)
    wrong = [
        (q, keys.transpose(2, 3), values, mask),  # a layout the kernel does not read
        (q.float(), keys, values, mask),  # float32 queries
        (q, keys.float(), values.float(), mask),  # float32 keys and values
        (q, keys[:1], values[:1], mask),  # fewer rows of keys than queries
        (q, keys, values, mask.bfloat16()),  # a bfloat16 mask
        (q, keys, values, mask[:, :9]),  # a mask of other columns
    ]
    for args in wrong:
        with pytest.raises(ValueError, match="unexpected shapes or strides"):
            kernel.attend(*args, 0.125)


def test_float32_other_devices_and_shapes_without_code_stay_on_sdpa(caplog) -> None:
    caplog.set_level(logging.INFO, logger=decode_attention.__name__)
    assert kernel_for(CPU, torch.float32, 9, 3, 64) is None
    assert kernel_for(torch.device("cuda"), torch.bfloat16, 9, 3, 64) is None
    assert kernel_for(CPU, torch.bfloat16, 4, 2, 32) is None  # head dim 32
    assert kernel_for(CPU, torch.bfloat16, 32, 2, 64) is None  # 16 query heads a kv head
    assert "no code for 2 query heads a key/value head of dim 32" in caplog.text


@pytest.mark.parametrize(
    ("compiler", "reason"),
    [
        (None, "no C compiler (cc) on this machine"),
        ("/bin/false", "decode_attention.c did not build"),
    ],
)
def test_without_a_working_compiler_it_is_sdpa_and_the_log_says_why(
    monkeypatch, caplog, fresh_build, compiler: str | None, reason: str
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: compiler)
    assert kernel_for(CPU, torch.bfloat16, 9, 3, 64) is None
    assert f"decode attention through SDPA: {reason}" in caplog.text


def test_a_temporary_folder_it_cannot_write_leaves_sdpa_and_the_log_says_why(
    monkeypatch, caplog, fresh_build, tmp_path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "absent"))
    assert kernel_for(CPU, torch.bfloat16, 9, 3, 64) is None
    said = "decode attention through SDPA: decode_attention.c did not build: [Errno 2]"
    assert said in caplog.text


@pytest.mark.avx512_cpu
def test_a_bfloat16_batcher_decodes_on_the_kernel_with_sdpas_texts(backend, tmp_path):  # noqa: F811
    """A Llama of head dim 64 (3 query heads on 1 key/value head) in bfloat16: the batcher's
    decode attention runs on the kernel, and the texts are SDPA's."""
    save_tiny_llama(tmp_path, hidden_size=192, num_attention_heads=3, num_key_value_heads=1)
    backend.tokenizer.save_pretrained(tmp_path)
    bf16 = TransformersBackend(tmp_path, device="cpu", dtype="bfloat16", num_threads=2)
    requests = [request(i, 3 + (i * 5) % 17, max_new_tokens=4 + i % 9) for i in range(10)]
    batchers = [bf16.continuous(4, 10_000, 8, attention_kernel=on) for on in (True, False)]
    assert batchers[0]._step.kernel is not None and batchers[1]._step.kernel is None
    texts = [run_all(b, {0: requests[:5], 2: requests[5:]}) for b in batchers]
    assert texts[0] == texts[1]
