"""Redact image regions given as boxes: blur, pixelate, fill or inpaint (OpenCV Telea).

Every function takes a frame (H, W, 3) uint8 and boxes (N, 4) xyxy in pixels of that frame, and returns a new
frame; the input is never modified. Boxes are grown by `padding` (a fraction of the box's width and height on
each side), rounded outwards to whole pixels and clipped to the frame, so a box that covers any part of a pixel
covers all of it.
"""

from __future__ import annotations

import cv2
import numpy as np

MODES = ("blur", "pixelate", "fill", "inpaint")


def padded_boxes(boxes_xyxy: np.ndarray, padding: float, width: int, height: int) -> np.ndarray:
    """(N, 4) float xyxy pixels -> (N, 4) int32 xyxy, grown by `padding` of the box size, outward-rounded, clipped."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    size = boxes[:, 2:] - boxes[:, :2]  # (N, 2) width, height
    grown = np.concatenate([boxes[:, :2] - padding * size, boxes[:, 2:] + padding * size], axis=1)
    out = np.concatenate([np.floor(grown[:, :2]), np.ceil(grown[:, 2:])], axis=1)
    out[:, 0::2] = out[:, 0::2].clip(0, width)
    out[:, 1::2] = out[:, 1::2].clip(0, height)
    keep = np.isfinite(boxes).all(axis=1) & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep].astype(np.int32)


def box_mask(boxes_xyxy: np.ndarray, padding: float, width: int, height: int) -> np.ndarray:
    """(H, W) bool: the pixels the padded boxes cover."""
    mask = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in padded_boxes(boxes_xyxy, padding, width, height):
        mask[y1:y2, x1:x2] = True
    return mask


def _smear(region: np.ndarray, cells: int) -> np.ndarray:
    """Shrink a region to about `cells` pixels on its long side and back: detail and shape are gone."""
    h, w = region.shape[:2]
    scale = cells / max(h, w)
    small = cv2.resize(region, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return small


def redact(frame: np.ndarray, boxes_xyxy: np.ndarray, mode: str = "blur", padding: float = 0.1, *,
           fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """A copy of `frame` with every (padded) box blurred, pixelated, filled or inpainted.

    blur: the region is reduced to 4 cells on its long side, smoothed back to full size and blurred again, so no
    edge or letter inside survives, whatever the box's size. pixelate: 8 cells on the long side, nearest
    neighbour. fill: a solid colour. inpaint: OpenCV's Telea inpainting from the surrounding pixels.
    """
    if mode not in MODES:
        raise ValueError(f"unknown redaction mode {mode!r}; one of {', '.join(MODES)}")
    if frame.ndim != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, C) uint8 frame, got {frame.shape} {frame.dtype}")
    height, width = frame.shape[:2]
    boxes = padded_boxes(boxes_xyxy, padding, width, height)
    out = frame.copy()
    if len(boxes) == 0:
        return out
    if mode == "inpaint":
        mask = np.zeros((height, width), dtype=np.uint8)
        for x1, y1, x2, y2 in boxes:
            mask[y1:y2, x1:x2] = 255
        radius = max(3, int(0.02 * max(height, width)))
        return cv2.inpaint(np.ascontiguousarray(frame), mask, radius, cv2.INPAINT_TELEA)
    for x1, y1, x2, y2 in boxes:
        region = out[y1:y2, x1:x2]
        h, w = region.shape[:2]
        if mode == "fill":
            region[:] = np.asarray(fill, dtype=np.uint8)[: region.shape[2]]
        elif mode == "pixelate":
            region[:] = cv2.resize(_smear(region, 8), (w, h), interpolation=cv2.INTER_NEAREST).reshape(region.shape)
        else:
            smooth = cv2.resize(_smear(region, 4), (w, h), interpolation=cv2.INTER_LINEAR).reshape(region.shape)
            k = max(3, (min(h, w) // 4) | 1)
            region[:] = cv2.blur(smooth, (k, k)).reshape(region.shape)
    return out
