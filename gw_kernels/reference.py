"""Plain PyTorch multi-scale deformable attention: the definition every fast path is tested against.

One ``F.grid_sample`` per level (bilinear, zero padding, align_corners=False), stacked over levels, weighted and
summed over levels and points. Differentiable through ordinary autograd, in any floating dtype grid_sample takes.
Semantics: ``../shared/reference/ms-deform-attn.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | list[tuple[int, int]],
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by ``grid_sample``.

    Args:
        value: (N, S, M, D), levels concatenated in order, S = sum of H*W.
        spatial_shapes: (L, 2) (H, W) per level.
        level_start_index: (L,); unused here (levels are split by size), kept for the common signature.
        sampling_locations: (N, Lq, M, L, P, 2) x, y in [0, 1] (values outside sample zero padding).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M*D) in value's dtype.
    """
    del level_start_index
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if torch.jit.is_tracing() and torch.is_tensor(spatial_shapes):
        # Exporting (gdino.export): the level sizes stay tensors, so the graph reads them at run time and takes
        # any input size; a Python int here would be recorded as a constant of the traced size.
        shapes = [(spatial_shapes[level, 0], spatial_shapes[level, 1]) for level in range(len(spatial_shapes))]
        value_per_level, start = [], 0
        for height, width in shapes:
            value_per_level.append(value[:, start:start + height * width])
            start = start + height * width
    else:
        shapes = [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes)
                                                else spatial_shapes)]
        value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample's frame is [-1, 1]; with align_corners=False, x=0 and x=1 are the outer edges of the map.
    sampling_grids = 2 * sampling_locations.to(value.dtype) - 1  # (N, Lq, M, L, P, 2)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L, P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    output = None
    for level, (height, width) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_level = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, height,
                                                                               width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(value_level, grid_level, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (N*M, D, Lq, P)
        # Weighted and summed level by level: no (N*M, D, Lq, L*P) stack, whose concatenation along a small axis
        # took 11 % of an exported Swin-T frame in ONNX Runtime.
        term = (sampled * weights[..., level, :]).sum(-1)  # (N*M, D, Lq)
        output = term if output is None else output + term
    return output.view(batch, heads * channels, queries).transpose(1, 2).contiguous()  # (N, Lq, M*D)
