"""Leak rate of a redaction: the fraction of (frame, object) pairs whose ground-truth box is not wholly covered.

Measured on shapes-world videos (`gdino.shapes.render_video`: objects moving, crossing, entering and leaving)
with the real detector's boxes; on a chosen fraction of frames every detection is dropped, as a detector that
misses whole frames (motion blur, a glare, a dropped batch) would. The same detections go through three
planners: per-frame only (the detector's boxes at `box_threshold` on their own frame), the offline planner
(`RedactionPlanner`, what `groundwatch redact` does) and the causal one (`LiveRedactionPlanner`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .masks import box_mask
from .planner import LiveRedactionPlanner, PlannerConfig, RedactionPlanner


@dataclass
class LeakReport:
    pairs: int  # (frame, object) pairs with at least one visible pixel of the object
    leaked: dict  # planner name -> pairs not wholly covered
    frames: int
    dropped_frames: int
    redacted_area: dict  # planner name -> sum over frames of the fraction of the frame redacted
    truth_area: float = 0.0  # sum over frames of the fraction of the frame inside ground-truth boxes

    def rate(self, name: str) -> float:
        return self.leaked[name] / self.pairs if self.pairs else 0.0

    def area(self, name: str) -> float:
        """Mean fraction of the frame a planner redacted (its cost: what is hidden that need not be)."""
        return self.redacted_area[name] / self.frames if self.frames else 0.0


def leaked_pairs(boxes_per_frame, truths, padding: float, width: int, height: int) -> tuple[int, float]:
    """(pairs whose ground-truth box (whole pixels, xyxy) is not wholly inside the union of padded boxes,
    sum over frames of the fraction of the frame redacted)."""
    leaked, area = 0, 0.0
    for boxes, truth in zip(boxes_per_frame, truths):
        covered = box_mask(boxes, padding, width, height)  # (H, W) bool
        area += float(covered.mean())
        for x1, y1, x2, y2 in np.asarray(truth.boxes_xyxy, dtype=np.int64).reshape(-1, 4):
            if not covered[y1:y2, x1:x2].all():
                leaked += 1
    return leaked, area


def shapes_leak(model, seeds, *, num_frames: int = 40, size=(192, 256), drop_fraction: float = 0.1,
                config: PlannerConfig = PlannerConfig(), padding: float = 0.2, batch_size: int = 8,
                drop_seed: int = 0) -> LeakReport:
    """Leak rates of the three planners over shapes videos `seeds`, the prompt naming every category present."""
    from gdino import shapes
    from gdino.predict import detect, encode

    height, width = size
    rng = np.random.default_rng(drop_seed)
    leaked = {"per_frame": 0, "tracked": 0, "live": 0}
    area = {"per_frame": 0.0, "tracked": 0.0, "live": 0.0}
    truth_area = 0.0
    pairs = frames_total = dropped_total = 0
    for seed in seeds:
        frames, truths = shapes.render_video(seed, num_frames, size, fps=10)
        names = sorted({c for t in truths for c in t.categories})
        encoding = encode(model, " . ".join(names) + " .")
        found = []
        for start in range(0, len(frames), batch_size):
            found += detect(model, list(frames[start:start + batch_size]), encoding,
                            box_threshold=config.track_threshold, remove_combined=True)
        dropped = rng.uniform(size=len(frames)) < drop_fraction
        offline = RedactionPlanner(config, width, height)
        live = LiveRedactionPlanner(config, width, height)
        per_frame, live_boxes = [], []
        for index, detections in enumerate(found):
            boxes, scores, phrases = detections.boxes_xyxy, detections.scores, list(detections.phrases)
            if dropped[index]:
                boxes, scores, phrases = boxes[:0], scores[:0], []
            offline.add(index, boxes, scores, phrases)
            live_boxes.append(live.update(index, boxes, scores, phrases))
            per_frame.append(boxes[scores >= config.box_threshold])
        tracked = [plan.boxes() for plan in offline.plan(len(frames))]
        for name, boxes in (("per_frame", per_frame), ("tracked", tracked), ("live", live_boxes)):
            count, covered = leaked_pairs(boxes, truths, padding, width, height)
            leaked[name] += count
            area[name] += covered
        truth_area += sum(float(box_mask(t.boxes_xyxy, 0.0, width, height).mean()) for t in truths)
        pairs += sum(len(t.boxes_xyxy) for t in truths)
        frames_total += len(frames)
        dropped_total += int(dropped.sum())
    return LeakReport(pairs, leaked, frames_total, dropped_total, area, truth_area)
