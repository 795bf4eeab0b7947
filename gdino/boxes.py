"""Box formats and overlaps: the one home of every conversion and IoU in ``gdino``.

Formats, named in the variables that hold them:
- ``cxcywh``: (..., 4) centre x, centre y, width, height, normalised to [0, 1] by the image size (what the model
  predicts and the losses compare);
- ``xyxy``: (..., 4) left, top, right, bottom; in pixels of the original image unless a name says otherwise.

The tracker keeps its own compiled IoU (``tracker.matching.iou_matrix``, Numba, in its per-frame hot path): the
tracker package depends on nothing of ``gdino``.
"""

from __future__ import annotations

import numpy as np
import torch


def cxcywh_to_xyxy(boxes_cxcywh: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy in the same units."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def xyxy_to_cxcywh(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh in the same units."""
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def to_pixels_xyxy(boxes_cxcywh: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., 4) cxcywh in [0, 1] -> (..., 4) xyxy in pixels of a (height, width) image (not clipped)."""
    boxes_xyxy = cxcywh_to_xyxy(boxes_cxcywh)
    return boxes_xyxy * boxes_xyxy.new_tensor([width, height, width, height])


def from_pixels_xyxy(boxes_xyxy, height: int, width: int) -> torch.Tensor:
    """(N, 4) xyxy pixels (array or tensor) -> (N, 4) float32 cxcywh in [0, 1] (clamped), the training target."""
    boxes_xyxy = torch.as_tensor(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4))
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    boxes_cxcywh = torch.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width,
                                (y1 - y0) / height], dim=-1)
    return boxes_cxcywh.clamp(0, 1)


def iou_matrix(boxes_a_xyxy, boxes_b_xyxy) -> np.ndarray:
    """(N, 4) and (M, 4) xyxy (any array-like) -> (N, M) float64 IoU; 0 where the union is empty."""
    a = np.asarray(boxes_a_xyxy, np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b_xyxy, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def generalized_iou_matrix(boxes_a_xyxy: torch.Tensor, boxes_b_xyxy: torch.Tensor) -> torch.Tensor:
    """(N, 4) and (M, 4) xyxy tensors -> (N, M) generalised IoU, differentiable (torchvision's, as DETR uses)."""
    # torchvision is imported on use: only training needs it.
    from torchvision.ops import generalized_box_iou

    return generalized_box_iou(boxes_a_xyxy, boxes_b_xyxy)
