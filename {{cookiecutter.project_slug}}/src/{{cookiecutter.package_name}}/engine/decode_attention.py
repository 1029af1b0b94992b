"""Decode attention in bfloat16 on a CPU with AVX-512: a kernel of our own, built at start.

SDPA's CPU kernel runs a task per row and key/value head, each two tiny products through
oneDNN, whose fixed cost per call makes it about 7 us a task whatever the columns: on an AMD
EPYC (Zen 4), 21 us a row a layer at 263 columns (167 us at 8 rows, 658 at 32), 0.64 ms a row a
decode step of the bundled model, the main reason a step grows with its rows. `decode_attention.c`
computes the same (one query token a row against the row's keys and values, the query heads of
a key/value head together, in float32) with AVX-512 directly: 42-44 us at 8 rows, 147 at 32, on
the same machine. llama.cpp and vLLM's CPU backend also bring their own attention.

It is compiled here, once a process (about 0.3 s), for this CPU (`-march=native`) and the model's
shape, with the C compiler found as `cc`, and it runs on the OpenMP threads of the torch already
loaded. Without a compiler, without AVX-512, or for a shape it has no code for (a head dim other
than 64 or 128, more than 8 query heads a key/value head), decode attention stays SDPA's, and the
log says why.
"""

import ctypes
import functools
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
SOURCE = "decode_attention.c"
HEAD_DIMS = (64, 128)
MAX_GROUPS = 8
_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# decode_attention's parameters, in order (see decode_attention.c)
_ARGS: list[type[ctypes._SimpleCData]] = [
    _P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I,
]  # fmt: skip


def kernel_for(
    device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
) -> "DecodeAttention | None":
    """The kernel for a model of this shape, or None where SDPA stays (see the module's text)."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    function = load(SOURCE, "decode_attention", _ARGS, heads, kv_heads, head_dim)
    if function is None:
        return None
    groups = heads // kv_heads
    log.info("decode attention: our AVX-512 kernel (%d query heads a key/value head)", groups)
    return DecodeAttention(function, groups)


def load(
    source: str, symbol: str, argtypes: list[Any], heads: int, kv_heads: int, head_dim: int
) -> Any:
    """`symbol` of `source` built for this attention shape, typed (`argtypes`, returning an
    int), or None where it has no code for the shape or does not build (logged)."""
    groups = heads // kv_heads if kv_heads else 0
    if head_dim not in HEAD_DIMS or heads % max(kv_heads, 1) or not 1 <= groups <= MAX_GROUPS:
        _explain(source, f"no code for {groups} query heads a key/value head of dim {head_dim}")
        return None
    library = build(source, groups, head_dim // 16)
    if library is None:
        return None
    function = getattr(library, symbol)
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


class DecodeAttention:
    """`attend(q, keys, values, mask, scale)`, as SDPA on those, `[rows, heads x head dim]`."""

    def __init__(self, function: Callable[..., int], groups: int) -> None:
        self.function, self.groups = function, groups

    def attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q `[rows, kv heads, groups, head dim]`; keys and values `[rows, kv heads, columns,
        head dim]` (views of the slab, the same strides); mask `[rows, columns]` float32,
        additive. Every last dimension contiguous, as is each row's group of query heads."""
        rows, kv_heads, groups, dim = q.shape
        columns = keys.shape[2]
        if not (
            groups == self.groups
            and q.dtype == keys.dtype == values.dtype == torch.bfloat16
            and q.device.type == keys.device.type == values.device.type == mask.device.type == "cpu"
            and keys.shape == values.shape == (rows, kv_heads, columns, dim)
            and q.stride()[1:] == (groups * dim, dim, 1)
            and keys.stride() == values.stride()
            and keys.stride()[2:] == (dim, 1)
            and mask.dtype == torch.float32
            and mask.is_contiguous()
            and mask.shape == (rows, columns)
        ):
            raise ValueError("decode attention: unexpected shapes or strides")
        threads = torch.get_num_threads()
        out = torch.empty(rows, kv_heads * groups * dim, dtype=q.dtype)
        scratch = torch.empty(threads * groups * columns, dtype=torch.float32)
        failed = self.function(
            q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(),
            keys.stride(0), keys.stride(1), mask.data_ptr(), out.data_ptr(), scratch.data_ptr(),
            rows, kv_heads, groups, columns, dim, scale, threads,
        )  # fmt: skip
        if failed:
            raise ValueError(f"decode attention was not built for {groups} groups of dim {dim}")
        return out


@functools.cache
def build(source: str, groups: int, chunks: int) -> ctypes.CDLL | None:
    """Compile one of this folder's C files for this shape and load it, or None (logged)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _explain(source, "no C compiler (cc) on this machine")
        return None
    try:  # a failed compile, a read-only or noexec /tmp, a hung compiler: torch's, and why
        return _compile(compiler, source, groups, chunks)
    except subprocess.CalledProcessError as exc:
        errors = [line for line in exc.stderr.splitlines() if "error" in line]
        _explain(source, f"{source} did not build: {(errors or ['?'])[0].strip()}")
    except (OSError, subprocess.SubprocessError) as exc:
        _explain(source, f"{source} did not build: {exc}")
    return None


def _compile(compiler: str, source: str, groups: int, chunks: int) -> ctypes.CDLL:
    """Build the library in a folder of its own and load it; the folder goes once it is loaded."""
    folder = tempfile.TemporaryDirectory(prefix="llm-kernel-", ignore_cleanup_errors=True)
    with folder:
        library = Path(folder.name) / "kernel.so"
        command = [
            compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
            f"-DGROUPS={groups}", f"-DCHUNKS={chunks}", str(FOLDER / source), "-o", str(library),
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        return ctypes.CDLL(str(library))  # on torch's libgomp, loaded


def _explain(source: str, reason: str) -> None:
    steps = source == "decode_step.c"
    what = "decode steps through torch's calls" if steps else "decode attention through SDPA"
    log.info("%s: %s", what, reason)
