"""One decode step of a Llama-family model, written out as torch calls on the model's own weights.

A decode step through transformers' modules spends about a fifth of its time in Python (module
calls, mask and cache bookkeeping: 61 ms a step at 8 rows in float32, of which the matrix
products take about 36, measured). This does the same arithmetic in the same order (RMSNorm,
rotary embedding, grouped-query attention through SDPA with the query heads packed per key/value
head, SiLU MLP), so the text is the same, with about 15 torch calls a layer and nothing else:
vLLM and llama.cpp also write their model code. The prompt's prefill stays transformers'.

On a CPU, the weights are prepacked once into oneDNN's blocked layout (`PACKED_DECODE_ROWS`
is the row count they are laid out for; any count runs on them), as torch.compile's CPU backend
does when it freezes a model: an unpacked product repacks each weight on every call, and in
float32 goes through MKL, which on an AMD EPYC (Zen 4) read the 49,152-word output layer at 5 GB/s
at 8 rows (21 ms) where oneDNN's packed kernel reads it at 20 GB/s (5.5 ms). In bfloat16 the
packed product is bit-identical to the unpacked one (both are oneDNN's). The cost is a second
copy of the weights in memory.

Only plain Llama (SmolLM2, TinyLlama, Llama 2 and 3) qualifies (`LlamaStep.supports`); any other
model decodes through its transformers modules, on the same KV cache.
"""

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

from .kv_cache import Slab

log = logging.getLogger(__name__)


def can_pack(model: Any) -> bool:
    """oneDNN's prepacked products apply: float32 or bfloat16 weights on a CPU whose torch has
    oneDNN (bfloat16 only where the CPU computes it natively)."""
    mkldnn = torch.ops.mkldnn
    if model.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(mkldnn, "_reorder_linear_weight") or not hasattr(mkldnn, "_linear_pointwise"):
        return False
    if model.dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    return model.dtype == torch.float32


# The model's attribute holding (rows, {id(weight): packed weight}) once it is packed.
PACKED = "_packed_products"


class LlamaStep:
    def __init__(self, model: Any, slab: Slab, packed_rows: int = 0) -> None:
        config, inner = model.config, model.model
        self.slab = slab
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads or self.heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.eps = float(config.rms_norm_eps)
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb  # cos and sin, rope scaling included
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [
            (
                layer.input_layernorm.weight,
                layer.self_attn.q_proj.weight,
                layer.self_attn.k_proj.weight,
                layer.self_attn.v_proj.weight,
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj.weight,
                layer.mlp.up_proj.weight,
                layer.mlp.down_proj.weight,
            )
            for layer in inner.layers
        ]
        self.packed_rows = packed_rows if packed_rows > 0 and can_pack(model) else 0
        self.model = model
        self.packed: dict[int, torch.Tensor] = {}  # by id of the weight
        if not self.packed_rows:
            unpack(model)  # a step that decodes unpacked prefills unpacked too

    def pack(self) -> None:
        """Pack the weights once, before the first prefill: in the thread that generates, as
        packing runs parallel kernels (see `lifecycle.loading.load_service_apart` for why that
        matters). The model's own linear modules then run on them too: the prompts' prefill,
        which goes through transformers' modules, gains as much (28.5 -> 18 ms of products for a
        7-token prompt in bfloat16, 60.6 -> 44.6 for 66). The packed copy is kept on the model,
        so a later batcher on it (the worker's, after a reconnection) reuses it."""
        if not self.packed_rows or self.packed:
            return
        rows, packed = getattr(self.model, PACKED, (0, {}))
        if rows != self.packed_rows:
            unpack(self.model)  # the previous copy goes before another is made
            products = [m for m in self.model.modules() if type(m) is torch.nn.Linear]
            reorder = torch.ops.mkldnn._reorder_linear_weight
            try:  # all or nothing: a half-packed model would fail every packed step after
                packed = {id(m.weight): reorder(m.weight, self.packed_rows) for m in products}
            except (RuntimeError, MemoryError) as exc:  # a second copy did not fit
                log.warning("packing the weights failed (%s); running unpacked", exc)
                self.packed_rows = 0
                return
            for module in products:
                product = functools.partial(_packed_product, packed[id(module.weight)])
                module.forward = product  # type: ignore[method-assign]  # this instance's only
            setattr(self.model, PACKED, (self.packed_rows, packed))
        self.packed = packed

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return _packed_product(self.packed[id(weight)], x)
        return F.linear(x, weight)

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

    @torch.inference_mode()
    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The next-token logits `[rows, vocab]` of `ids` (`[rows]`, at `positions`, `[rows,
        1]`); `mask` (`[rows, slab length + 1]`, 0 on padding) is what they may attend to. Their
        keys and values go into the slab at its end; the caller advances it."""
        self.pack()
        rows, groups = ids.shape[0], self.heads // self.kv_heads
        x = F.embedding(ids, self.embed)  # [rows, hidden]
        cos, sin = self.rotary(x, positions)  # [rows, 1, head dim]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over the heads
        attend = mask.bool()[:, None, None, :]
        for index, (norm_in, wq, wk, wv, wo, norm_post, gate, up, down) in enumerate(self.layers):
            h = self._rms(x, norm_in)
            q = _rotate(self._linear(h, wq).view(rows, self.heads, 1, self.head_dim), cos, sin)
            k = _rotate(self._linear(h, wk).view(rows, self.kv_heads, 1, self.head_dim), cos, sin)
            v = self._linear(h, wv).view(rows, self.kv_heads, 1, self.head_dim)
            keys, values = self.slab.write(index, k, v)
            attended = F.scaled_dot_product_attention(
                q.reshape(rows, self.kv_heads, groups, self.head_dim),  # query heads per kv head
                keys,
                values,
                attn_mask=attend,
                scale=self.head_dim**-0.5,
            )
            x = x + self._linear(attended.reshape(rows, -1), wo)
            h = self._rms(x, norm_post)
            x = x + self._linear(F.silu(self._linear(h, gate)) * self._linear(h, up), down)
        return self._linear(self._rms(x, self.norm), self.lm_head)


def unpack(model: Any) -> None:
    """Point the model's linear modules back at their own weights; free the packed copy."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _packed_product:
            del module.__dict__["forward"]
    model.__dict__.pop(PACKED, None)


def _packed_product(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` on the weight oneDNN packed (`torch.ops.mkldnn._reorder_linear_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary position embedding, as transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)
