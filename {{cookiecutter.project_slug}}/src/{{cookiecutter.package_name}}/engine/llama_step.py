"""One decode step of a Llama-family model, written out as torch calls on the model's own weights.

A decode step through transformers' modules spends about a fifth of its time in Python (module
calls, mask and cache bookkeeping: 61 ms a step at 8 rows in float32, of which the matrix
products take about 36, measured). This does the same arithmetic in the same order (RMSNorm,
rotary embedding, grouped-query attention through SDPA with the query heads packed per key/value
head, SiLU MLP), so the text is the same, with about 15 torch calls a layer and nothing else:
vLLM and llama.cpp also write their model code. The prompt's prefill stays transformers'.

Only plain Llama (SmolLM2, TinyLlama, Llama 2 and 3) qualifies (`LlamaStep.supports`); any other
model decodes through its transformers modules, on the same KV cache.
"""

from typing import Any

import torch
import torch.nn.functional as F

from .kv_cache import Slab


class LlamaStep:
    def __init__(self, model: Any, slab: Slab) -> None:
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
        rows, groups = ids.shape[0], self.heads // self.kv_heads
        x = F.embedding(ids, self.embed)  # [rows, hidden]
        cos, sin = self.rotary(x, positions)  # [rows, 1, head dim]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over the heads
        attend = mask.bool()[:, None, None, :]
        for index, (norm_in, wq, wk, wv, wo, norm_post, gate, up, down) in enumerate(self.layers):
            h = self._rms(x, norm_in)
            q = _rotate(F.linear(h, wq).view(rows, self.heads, 1, self.head_dim), cos, sin)
            k = _rotate(F.linear(h, wk).view(rows, self.kv_heads, 1, self.head_dim), cos, sin)
            v = F.linear(h, wv).view(rows, self.kv_heads, 1, self.head_dim)
            keys, values = self.slab.write(index, k, v)
            attended = F.scaled_dot_product_attention(
                q.reshape(rows, self.kv_heads, groups, self.head_dim),  # query heads per kv head
                keys,
                values,
                attn_mask=attend,
                scale=self.head_dim**-0.5,
            )
            x = x + F.linear(attended.reshape(rows, -1), wo)
            h = self._rms(x, norm_post)
            x = x + F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)
        return F.linear(self._rms(x, self.norm), self.lm_head)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary position embedding, as transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)
