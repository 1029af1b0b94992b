"""Products on weights prepacked by oneDNN, for the written-out Llama pass (`llama_step.py`).

On a CPU, the weights are prepacked once into oneDNN's blocked layout (`PACKED_DECODE_ROWS`
is the row count they are laid out for; any count runs on them), as torch.compile's CPU backend
does when it freezes a model: an unpacked product repacks each weight on every call, and in
float32 goes through MKL, which on an AMD EPYC (Zen 4) read the 49,152-word output layer at 5 GB/s
at 8 rows (21 ms) where oneDNN's packed kernel reads it at 20 GB/s (5.5 ms). The query, key and
value projections are packed as one product, and so are the gate and up projections: 4 products
a layer instead of 7 (on Zen 5 in bfloat16, 1 ms less of a 15 ms step at 8 rows). The cost is a
second copy of the weights in memory.
"""

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

# The model's attribute holding (rows, packed products) once it is packed: a later pass on the
# same model (the worker's, after a reconnection) reuses them.
PACKED = "_packed_products"


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


def pack_llama(
    model: Any, layers: Sequence[tuple[torch.Tensor, ...]], lm_head: torch.Tensor, rows: int
) -> list[torch.Tensor]:
    """Per layer (norm, q, k, v, o, norm, gate, up, down weights) the query-key-value product,
    the output one, the gate-up one and the down one, then the output layer, packed for `rows`
    rows; [] if they do not fit. Run in the thread that generates, as packing runs parallel
    kernels (see `lifecycle.loading.load_service_apart` for why that matters). The copy is kept
    on the model and reused while `rows` is the same."""
    have, packed = getattr(model, PACKED, (0, []))
    if have == rows:
        return packed
    unpack(model)  # the previous copy goes before another is made
    reorder = torch.ops.mkldnn._reorder_linear_weight
    weights = [
        one
        for _, wq, wk, wv, wo, _, gate, up, down in layers
        for one in (torch.cat([wq, wk, wv]), wo, torch.cat([gate, up]), down)
    ] + [lm_head]
    try:  # all or nothing: a half-packed model would fail every packed pass after
        packed = [reorder(weight, rows) for weight in weights]
    except (RuntimeError, MemoryError) as exc:  # a second copy did not fit
        log.warning("packing the weights failed (%s); running unpacked", exc)
        return []
    setattr(model, PACKED, (rows, packed))
    return packed


def unpack(model: Any) -> None:
    """Free the model's packed copy."""
    model.__dict__.pop(PACKED, None)


def packed_product(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` on the weight oneDNN packed (`torch.ops.mkldnn._reorder_linear_weight`).
    Call it under `torch.inference_mode` (or `no_grad`), as `LlamaStep.run` does: with autograd
    on, the bfloat16 output layer's product for one row took 400 ms instead of 1 (Zen 5)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
