"""Matching two sets of detections of one image: the yardstick for bfloat16 and for the backends end to end."""

from __future__ import annotations

import numpy as np


def match_detections(reference, other, height: int, width: int, box_tolerance: float = 0.01) -> tuple[int, int]:
    """(matched, total): a detection of ``reference`` is matched by an unused one of ``other`` with the same phrase
    whose box corners are all within ``box_tolerance`` of the image size. total = the larger of the two counts, so
    extra and missing detections both count against the match."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    ref_boxes = np.asarray(reference.boxes_xyxy, dtype=np.float64).reshape(-1, 4) / scale
    other_boxes = np.asarray(other.boxes_xyxy, dtype=np.float64).reshape(-1, 4) / scale
    used = np.zeros(len(other_boxes), dtype=bool)
    matched = 0
    for box, phrase in zip(ref_boxes, reference.phrases):
        error = np.abs(other_boxes - box).max(-1) if len(other_boxes) else np.zeros(0)
        candidates = [j for j in np.argsort(error) if not used[j] and other.phrases[j] == phrase
                      and error[j] <= box_tolerance]
        if candidates:
            used[candidates[0]] = True
            matched += 1
    return matched, max(len(ref_boxes), len(other_boxes))
