"""Mixed bfloat16 for CPU inference: the big matrix products in bfloat16, the numerically sensitive steps in float32.

Casting the whole model to bfloat16 (8 mantissa bits) loses more than the matmuls need to:

- the residual streams (backbone, feature enhancer, decoder) accumulate many small updates, and a bfloat16 sum
  drops an update's low bits at every layer;
- the query selection ranks ~6,000 image tokens by their best text logit (values ~20-50, where bfloat16's step is
  0.125-0.25) and gives the k-th ranked token the k-th content query: rounding the scores reorders the ranks;
- the boxes are refined through sigmoid / inverse-sigmoid across the decoder layers, and the sampling locations
  of the deformable attention are offsets of a few cells on maps up to 160 cells wide.

``to_mixed_bfloat16(model)`` therefore stores only the weights of the matmul-heavy layers (``nn.Linear``,
``nn.Conv2d``, the attention in-projections) in bfloat16 and keeps in float32 the norms, the embeddings and the
heads listed in ``FLOAT32_MODULES``; ``GroundingDino.forward`` then runs under ``torch.autocast("cpu", bfloat16)``
(matmul inputs cast to bfloat16, results cast to float32 and added to float32 residual streams), and the steps
above run in ``float32_region`` with autocast off: query selection, box refinement, the final class and box heads.
The deformable attentions' sampling offsets and attention weights are bfloat16 products (at 6,380 encoder queries
they were the largest float32 matmuls left) whose results come back to float32 before the softmax and before the
reference point is added, so the sampling locations stay float32. The text encoder (once per prompt) stays float32.
"""

from __future__ import annotations

import torch
from torch import nn

# Module name prefixes (relative to GroundingDino) whose weights stay float32.
FLOAT32_MODULES = ("bert", "feat_map", "bbox_embed", "transformer.enc_output", "transformer.enc_output_norm",
                   "transformer.enc_out_bbox_embed", "transformer.decoder.bbox_embed",
                   "transformer.decoder.ref_point_head")


def _keeps_float32(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in FLOAT32_MODULES)


def to_mixed_bfloat16(model: nn.Module) -> nn.Module:
    """Cast ``model`` (a float32 ``GroundingDino`` on the CPU) to mixed bfloat16 in place and return it."""
    model.float()
    for name, module in model.named_modules():
        if _keeps_float32(name):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(torch.bfloat16)
        elif hasattr(module, "in_proj_weight"):  # gdino.model.layers.MultiheadAttention's fused projection
            module.in_proj_weight.data = module.in_proj_weight.data.bfloat16()
            module.in_proj_bias.data = module.in_proj_bias.data.bfloat16()
    return model


def mixed_dtype(model: nn.Module) -> torch.dtype | None:
    """bfloat16 if ``model`` is in mixed precision (matmul weights bfloat16, norms and embeddings float32)."""
    matmul = model.transformer.encoder.layers[0].linear1.weight.dtype
    return matmul if matmul != model.transformer.level_embed.dtype else None


def float32_region(device: torch.device):
    """Autocast off: a numerically sensitive step runs in its own modules' dtype (float32 in mixed precision)."""
    return torch.autocast(device.type, enabled=False)
