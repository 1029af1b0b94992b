"""A pass of a Llama-family model, written out as torch calls on the model's own weights: the
running rows' next tokens and the joining prompts' prefill, in one pass.

Through transformers' modules a decode step spent about a fifth of its time in Python (61 ms a
step at 8 rows in float32, the products 36). This does the same arithmetic in the same order
with about 15 torch calls a layer: vLLM and llama.cpp also write their model code. A pass
carries the running rows' last tokens and the joining prompts' tokens, packed end to end,
through every product together (as vLLM's chunked prefill, though a prompt is not split), so
the weights are read once for both; only attention is apart. On an AMD EPYC (Zen 5) in
bfloat16, a 37-token prompt joining 7 running rows took 37 ms as two passes, 22 as one.

On a CPU the products run on weights prepacked by oneDNN (`packing.py`); in bfloat16, a step
with no joining prompt is one call of our C code (`decode_step.py`), and the rows' attention in
the other passes our kernel (`decode_attention.py`). Only plain Llama (SmolLM2, TinyLlama, Llama
2 and 3) qualifies (`LlamaStep.supports`); any other model runs through its modules.
"""

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .decode_attention import kernel_for
from .decode_step import fused_for
from .kv_cache import Layers, PrefixCache, Slab
from .packing import can_pack, pack_llama, packed_product, unpack

log = logging.getLogger(__name__)
# SDPA's kernels without cuDNN's: on an H200 (torch 2.11) cuDNN's attention built a plan at each
# call, 2.8 ms of CPU a layer, as the keys grow a column a step (113 ms a step, the GPU's 3).
ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Decode:
    """The running rows' last tokens (`[rows]`) at `positions` (`[rows, 1]`), attending where
    `mask` (`[rows, slab length + 1]`) is not 0; their keys and values go to the slab's end."""

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


@dataclass
class Prompts:
    """The joining prompts' part of a pass: their tokens after the prefix that `prefix` caches
    for all of them (`start` tokens), packed end to end."""

    ids: list[list[int]]
    prefix: PrefixCache | None = None

    def __post_init__(self) -> None:
        self.start = self.prefix.covers(self.ids) if self.prefix is not None else 0
        self.lengths = [len(ids) - self.start for ids in self.ids]
        self.tokens = [token for ids in self.ids for token in ids[self.start :]]
        self.ends = torch.tensor(self.lengths).cumsum(0)


@dataclass
class Passed:
    """The rows' next-token logits (`[rows, vocab]`), the prompts' (of their last tokens) and
    each prompt's keys and values, prefix included."""

    rows: torch.Tensor | None
    prompts: torch.Tensor | None
    layers: list[Layers]


class LlamaStep:
    def __init__(self, model: Any, slab: Slab, packed_rows: int = 0, kernel: bool = True) -> None:
        config, inner, self.slab = model.config, model.model, slab
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads or self.heads)
        self.qk_heads = self.heads + self.kv_heads  # queries and keys, rotated together
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb  # cos and sin, rope scaling included
        self.norm, self.lm_head = inner.norm.weight, model.lm_head.weight
        self.layers = [
            (
                layer.input_layernorm.weight,
                *(getattr(layer.self_attn, f"{name}_proj").weight for name in "qkvo"),
                layer.post_attention_layernorm.weight,
                *(getattr(layer.mlp, f"{name}_proj").weight for name in ("gate", "up", "down")),
            )
            for layer in inner.layers
        ]
        self.packed_rows = packed_rows if packed_rows > 0 and can_pack(model) else 0
        shape = (self.heads, self.kv_heads, self.head_dim)
        self.kernel = kernel_for(model.device, model.dtype, *shape) if kernel else None
        self.fused = fused_for(model, self.layers, *shape, self.eps) if kernel else None
        self.model = model
        self.packed: list[torch.Tensor] = []  # qkv, out, gate-up, down a layer; output layer
        if not self.packed_rows:
            unpack(model)  # a step that runs unpacked frees the packed copy

    def pack(self) -> None:
        """Pack the weights once, before the first pass (see `packing.pack_llama`)."""
        if self.packed_rows and not self.packed:
            self.packed = pack_llama(self.model, self.layers, self.lm_head, self.packed_rows)
            self.packed_rows = self.packed_rows if self.packed else 0

    @staticmethod
    def supports(model: Any) -> bool:
        """Plain Llama: no biases, SiLU, no tensor-parallel slicing, no sliding window."""
        config = model.config
        return (
            getattr(config, "model_type", "") == "llama"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and getattr(config, "hidden_act", "silu") == "silu"
            and getattr(config, "pretraining_tp", 1) == 1
            and hasattr(model, "lm_head")
            and getattr(config, "_attn_implementation", "") == "sdpa"  # the same attention math
            and getattr(model, "hf_quantizer", None) is None  # plain weights, not packed ones
            and all(
                type(module) is torch.nn.Linear and module.bias is None  # packed: no bias
                for module in model.modules()
                if isinstance(module, torch.nn.Linear)
            )
        )

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    def _qkv(self, index: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries and keys of `h` (`[tokens, hidden]`) side by side, `[tokens, (heads + kv
        heads) x head dim]`, for one rotary embedding of both; and its values."""
        _, wq, wk, wv, *_ = self.layers[index]
        if not self.packed:
            return torch.cat([F.linear(h, wq), F.linear(h, wk)], -1), F.linear(h, wv)
        qkv = packed_product(self.packed[4 * index], h)
        return qkv.split([wq.shape[0] + wk.shape[0], wv.shape[0]], -1)

    def _mlp(self, index: int, h: torch.Tensor) -> torch.Tensor:
        *_, gate, up, down = self.layers[index]
        if not self.packed:
            return F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
        both = packed_product(self.packed[4 * index + 2], h)
        return packed_product(
            self.packed[4 * index + 3], F.silu(both[:, : gate.shape[0]]) * both[:, gate.shape[0] :]
        )

    def _out(self, index: int, attended: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(attended, self.layers[index][4])
        return packed_product(self.packed[4 * index + 1], attended)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._rms(x, self.norm)
        return packed_product(self.packed[-1], x) if self.packed else F.linear(x, self.lm_head)

    @torch.inference_mode()
    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The next-token logits `[rows, vocab]` of a decode step alone (see `Decode`)."""
        logits = self.run(Decode(ids, positions, mask), None).rows
        assert logits is not None
        return logits

    @torch.inference_mode()
    def run(self, decode: Decode | None, prompts: Prompts | None) -> Passed:
        """One pass over the running rows' tokens and the joining prompts' tokens together."""
        with sdpa_kernel(ATTENTION):
            return self._run(decode, prompts)

    def _run(self, decode: Decode | None, prompts: Prompts | None) -> Passed:
        self.pack()
        rows = 0 if decode is None else int(decode.ids.shape[0])
        if self.fused is not None and decode is not None and prompts is None:
            return self._fused(decode)
        device = self.embed.device
        tokens = torch.tensor(prompts.tokens if prompts else [], dtype=torch.long, device=device)
        if decode is not None:
            tokens = torch.cat([decode.ids.to(device), tokens])
        x = F.embedding(tokens, self.embed)  # [rows + prompt tokens, hidden]
        decoding = self._decoding(x, decode) if decode is not None else None
        prefilling = self._prefilling(x, prompts) if prompts is not None else None
        layers: list[Layers] = [[] for _ in (prompts.ids if prompts else [])]
        for index, (norm_in, *_, norm_post, _, _, _) in enumerate(self.layers):
            h = self._rms(x, norm_in)
            qk, v = self._qkv(index, h)
            parts = []
            if decoding is not None:
                parts.append(self._attend_rows(index, decoding, qk[:rows], v[:rows]))
            if prefilling is not None:
                assert prompts is not None
                attended, owned = self._attend_prompts(
                    index, prompts, prefilling, qk[rows:], v[rows:]
                )
                parts.append(attended)
                for mine, own in zip(layers, owned, strict=True):
                    mine.append(own)
            x = x + self._out(index, torch.cat(parts) if len(parts) > 1 else parts[0])
            x = x + self._mlp(index, self._rms(x, norm_post))
        keep = torch.arange(rows, device=x.device)
        if prompts is not None:
            keep = torch.cat([keep, rows + prompts.ends.to(x.device) - 1])
        logits = self._logits(x[keep])
        if prompts is not None and prompts.prefix is not None:
            prompts.prefix.learn(prompts.ids, layers)
        return Passed(logits[:rows] if rows else None, logits[rows:] if prompts else None, layers)

    def _fused(self, decode: Decode) -> Passed:
        """A decode step in one call of our code; if that fails, torch's calls from then on
        (the batcher runs the step again), and the log says why."""
        assert self.fused is not None
        try:
            x = self.fused.step(decode.ids, decode.positions, decode.mask, self.slab)
        except (ValueError, MemoryError) as exc:
            log.warning("%s: decode steps through torch's calls from now on", exc)
            self.fused.release()  # its packed copy of the weights
            self.fused = None
            raise
        return Passed(self._logits(x), None, [])

    def _decoding(self, x: torch.Tensor, decode: Decode) -> tuple[torch.Tensor, ...]:
        """cos, sin and the attention mask of the running rows, for every layer."""
        cos, sin = self.rotary(x, decode.positions.to(x.device))  # [rows, 1, head dim]
        mask = decode.mask.to(x.device).bool()  # the kernel's: float32, `[rows, columns]`
        sdpa = self.kernel is None
        attend = _additive(mask[:, None, None], x.dtype) if sdpa else _additive(mask, torch.float32)
        return cos[:, None], sin[:, None], attend

    def _attend_rows(
        self, index: int, decoding: tuple[torch.Tensor, ...], qk: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """The rows' attention: one query a row against the slab, the query heads of each
        key/value head packed as one head's queries."""
        cos, sin, attend = decoding
        rows, groups = qk.shape[0], self.heads // self.kv_heads
        qk = _rotate(qk.view(rows, self.qk_heads, 1, self.head_dim), cos, sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        keys, values = self.slab.write(index, k, v.reshape(rows, self.kv_heads, 1, self.head_dim))
        q = q.reshape(rows, self.kv_heads, groups, self.head_dim)  # query heads per kv head
        scale = self.head_dim**-0.5
        if self.kernel is not None:
            return self.kernel.attend(q, keys, values, attend, scale)
        return F.scaled_dot_product_attention(q, keys, values, attend, scale=scale).flatten(1)

    def _prefilling(self, x: torch.Tensor, prompts: Prompts) -> tuple[torch.Tensor, ...]:
        """cos, sin and the attention mask of the prompts' tokens: each attends to the cached
        prefix and, causally, to its own tokens."""
        start, lengths = prompts.start, torch.tensor(prompts.lengths)
        positions = torch.cat([torch.arange(start, start + n) for n in prompts.lengths])
        cos, sin = self.rotary(x, positions[None].to(x.device))  # [1, tokens, head dim]
        prompt = torch.repeat_interleave(torch.arange(len(prompts.lengths)), lengths)
        at = torch.arange(len(positions))
        mask = (prompt[:, None] == prompt[None, :]) & (at[:, None] >= at[None, :])
        mask = torch.cat([torch.ones(len(at), start, dtype=torch.bool), mask], dim=1)
        return cos[:, None], sin[:, None], _additive(mask[None, None].to(x.device), x.dtype)

    def _attend_prompts(
        self, index: int, prompts: Prompts, prefilling: tuple[torch.Tensor, ...],
        qk: torch.Tensor, v: torch.Tensor,
    ) -> tuple[torch.Tensor, Layers]:  # fmt: skip
        """The prompts' attention, and each prompt's keys and values (`[1, kv heads, prefix +
        its tokens, head dim]`) for the slab."""
        cos, sin, mask = prefilling
        tokens = qk.shape[0]
        qk = _rotate(qk.view(1, tokens, self.qk_heads, self.head_dim).transpose(1, 2), cos, sin)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = v.view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        if prompts.start:
            assert prompts.prefix is not None
            before_k, before_v = prompts.prefix.layers[index]
            k, v = torch.cat([before_k, k], dim=2), torch.cat([before_v, v], dim=2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.head_dim**-0.5, enable_gqa=True
        )
        start, owned = prompts.start, []
        for end, length in zip(prompts.ends.tolist(), prompts.lengths, strict=True):
            own = slice(start + end - length, start + end)
            owned.append(
                (torch.cat([k[:, :, :start], k[:, :, own]], dim=2),
                 torch.cat([v[:, :, :start], v[:, :, own]], dim=2))
            )  # fmt: skip
        return attended.transpose(1, 2).reshape(tokens, -1), owned


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one SDPA makes of it at every call (0 where
    True, -inf where False), made once a pass for all the layers."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary position embedding, as transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)
