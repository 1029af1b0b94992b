"""A decode step of a plain Llama in bfloat16 in one call of our own C code (`decode_step.c`).

Through torch's calls, a step of the bundled model at 8 rows took 25 ms on an AMD EPYC (Zen 4),
of which reading its weights at the machine's bandwidth is about 9 and their arithmetic at peak
about 5: the rest was the fixed cost of about 450 small calls (RMSNorm alone is eight) and their
Python, paid at every step whatever the rows. `decode_step.c` does the same arithmetic as
`llama_step.py`, layer by layer, in one call: its products on weights packed for AVX-512 BF16's
dot products (a second copy, made once), its attention `decode_attention.c`'s, its threads torch's
OpenMP ones. llama.cpp's server is built the same way.

It runs the steps in which no prompt joins, most of them under load; a pass with joining prompts
goes through torch's calls, as does every step where it cannot run: another dtype or device, a
CPU without AVX-512 BF16, no C compiler, a shape it has no code for (the log says which).
"""

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .decode_attention import load
from .kv_cache import Slab

log = logging.getLogger(__name__)

SOURCE = "decode_step.c"
# The model's attribute holding the packed weights and their addresses, reused by a later step.
PACKED = "_decode_step_weights"
_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# decode_step's parameters, in order (see decode_step.c)
_ARGS: list[Any] = [
    _P, _I, _I, _I, _I, _I, _I, _F, _P, _P, _P, _P, _I, _P, _P, _I64, _I64, _I, _I, _I,
]  # fmt: skip


def fused_for(
    model: Any, layers: Sequence[tuple[torch.Tensor, ...]], heads: int, kv_heads: int,
    head_dim: int, eps: float,
) -> "FusedStep | None":  # fmt: skip
    """The fused step for this model, or None where torch's calls stay (logged)."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return None
    hidden, inter = layers[0][1].shape[1], layers[0][6].shape[0]
    if hidden % 16 or inter % 16:
        log.info("decode steps through torch's calls: widths %d and %d not in 16s", hidden, inter)
        return None
    function = load(SOURCE, "decode_step", _ARGS, heads, kv_heads, head_dim)
    if function is None:
        return None
    log.info("decode steps: one call of our AVX-512 BF16 code a step")
    return FusedStep(function, model, layers, (heads, kv_heads, head_dim, inter), eps)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([n, k]) in blocks of 16 outputs, `[n / 16, k / 2, 16, 2]`, as the products of
    `decode_step.c` read it."""
    n, k = weight.shape
    return weight.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gate and up weights as one, in alternate blocks of 16 outputs (gate, up, gate...)."""
    n, k = gate.shape
    return torch.stack([gate.view(n // 16, 16, k), up.view(n // 16, 16, k)], 1).reshape(2 * n, k)


class FusedStep:
    """`step(ids, positions, mask, slab)`: every layer of a decode step (see the module's
    text); calling it runs the layers on tokens already embedded."""

    def __init__(
        self, function: Any, model: Any, layers: Sequence[tuple[torch.Tensor, ...]],
        shape: tuple[int, int, int, int], eps: float,
    ) -> None:  # fmt: skip
        self.function, self.shape, self.eps, self.model = function, shape, eps, model
        self.layers, self.hidden = list(layers), layers[0][1].shape[1]
        self.packed: Any = None  # (weights, addresses), at the first step (see `pack_weights`)

    def pack_weights(self) -> None:
        """Pack the weights once, in the thread that generates: packing runs torch's parallel
        copies, and a second thread doing so would keep a second OpenMP pool alive, whose
        threads make libgomp's barriers sleep instead of spin (see `load_service_apart`): the
        step took 10.9 ms at 1 row instead of 6.6, measured. The copy is kept on the model."""
        have = self.model.__dict__.get(PACKED)
        if have is None:
            weights = [
                one
                for norm, wq, wk, wv, wo, post, gate, up, down in self.layers
                for one in (
                    norm.contiguous(), pack(torch.cat([wq, wk, wv])), pack(wo),
                    post.contiguous(), pack(interleave(gate, up)), pack(down),
                )
            ]  # fmt: skip
            addresses = (ctypes.c_void_p * len(weights))(*[w.data_ptr() for w in weights])
            have = (weights, addresses)
            setattr(self.model, PACKED, have)
        self.packed = have  # held here too: the C code reads them by address

    def release(self) -> None:
        """Free the packed copy (this step is not to run again)."""
        self.model.__dict__.pop(PACKED, None)
        self.packed = None

    def step(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, slab: Slab
    ) -> torch.Tensor:
        """The residual stream after every layer (`[rows, hidden]` bfloat16) of the rows' last
        tokens `ids` (`[rows]`) at `positions` (`[rows, 1]`), attending where `mask` (`[rows,
        slab length + 1]`) is not 0."""
        inner = self.model.model
        x = F.embedding(ids.to(self.model.device), inner.embed_tokens.weight)
        cos, sin = inner.rotary_emb(x, positions.to(x.device))  # rope scaling included
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return self(x, cos, sin, additive.masked_fill_(mask == 0, float("-inf")), slab)

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, slab: Slab
    ) -> torch.Tensor:
        """The residual stream after every layer (`[rows, hidden]` bfloat16) of the embedded
        tokens `x` (overwritten); cos and sin `[rows, 1, head dim]`; mask `[rows, slab length +
        1]` float32, additive. Each layer's keys and values go to the slab's column `end`."""
        if self.packed is None:
            self.pack_weights()
        heads, kv_heads, dim, inter = self.shape
        rows, keys, values = x.shape[0], slab.keys, slab.values
        buffer = keys[0].shape if keys else ()
        if not (
            x.dtype == cos.dtype == sin.dtype == torch.bfloat16
            and x.device.type == mask.device.type == "cpu"
            and x.is_contiguous()
            and x.shape == (rows, self.hidden)
            and cos.numel() == sin.numel() == rows * dim
            and mask.dtype == torch.float32
            and mask.is_contiguous()
            and mask.shape == (rows, slab.length + 1)
            and len(keys) == len(values) == len(self.layers)
            and len(buffer) == 4
            and rows <= slab.rows <= buffer[0]
            and buffer[1:] == (kv_heads, buffer[2], dim)
            and buffer[2] > slab.end
            and all(
                t.shape == buffer and t.dtype == torch.bfloat16 and t.device.type == "cpu"
                and t.is_contiguous() for t in keys + values
            )
        ):  # fmt: skip
            raise ValueError("decode step: unexpected shapes or strides")
        cos, sin = cos.reshape(rows, dim).contiguous(), sin.reshape(rows, dim).contiguous()
        failed = self.function(
            self.packed[1], len(self.layers), self.hidden, heads, kv_heads, dim, inter, self.eps,
            x.data_ptr(), cos.data_ptr(), sin.data_ptr(), mask.data_ptr(), rows,
            *slab.addresses(),
            keys[0].stride(0), keys[0].stride(1), slab.start, slab.end, torch.get_num_threads(),
        )  # fmt: skip
        if failed == -2:
            raise MemoryError("decode step: out of memory")
        if failed:
            raise ValueError("decode step: not built for this shape")
        return x
