"""Standard multi-object tracking metrics (CLEAR MOTA, IDF1, HOTA) via the maintained `trackers` evaluator.

`trackers.eval` (Roboflow) reimplements TrackEval's matching and metrics and works with NumPy 2, unlike
`motmetrics` 1.4. It is a test/benchmark dependency, so it is imported only when a function here is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from tracker.core import Tracker, TrackUpdate
from tracker.synthetic import SyntheticSequence


@dataclass(frozen=True)
class TrackingMetrics:
    mota: float
    idf1: float
    hota: float
    id_switches: int
    true_positives: int
    false_positives: int
    false_negatives: int
    fragmentations: int
    gt_tracks: int
    predicted_tracks: int


def _remap(ids_per_frame: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Ids to 0..K-1 in first-seen order, as TrackEval's metric code expects."""
    mapping: dict[int, int] = {}
    out = []
    for ids in ids_per_frame:
        out.append(np.array([mapping.setdefault(int(i), len(mapping)) for i in ids], dtype=np.int64))
    return out


def evaluate(
    gt: Iterable[tuple[np.ndarray, np.ndarray]],
    predicted: Iterable[tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
) -> TrackingMetrics:
    """Score per-frame predictions against ground truth; both are sequences of (ids (N,), boxes_xyxy (N, 4))
    aligned frame by frame."""
    from trackers.eval import box_iou, compute_clear_metrics, compute_hota_metrics, compute_identity_metrics

    gt = list(gt)
    predicted = list(predicted)
    if len(gt) != len(predicted):
        raise ValueError(f"{len(gt)} ground-truth frames but {len(predicted)} predicted frames")
    gt_ids = _remap([ids for ids, _ in gt])
    predicted_ids = _remap([ids for ids, _ in predicted])
    similarity = [
        box_iou(np.asarray(g_boxes, dtype=np.float64).reshape(-1, 4),
                np.asarray(p_boxes, dtype=np.float64).reshape(-1, 4), box_format="xyxy")
        for (_, g_boxes), (_, p_boxes) in zip(gt, predicted)
    ]
    clear = compute_clear_metrics(gt_ids, predicted_ids, similarity, threshold=iou_threshold)
    identity = compute_identity_metrics(gt_ids, predicted_ids, similarity, threshold=iou_threshold)
    hota = compute_hota_metrics(gt_ids, predicted_ids, similarity)
    return TrackingMetrics(
        mota=float(clear["MOTA"]),
        idf1=float(identity["IDF1"]),
        hota=float(hota["HOTA"]),
        id_switches=int(clear["IDSW"]),
        true_positives=int(clear["CLR_TP"]),
        false_positives=int(clear["CLR_FP"]),
        false_negatives=int(clear["CLR_FN"]),
        fragmentations=int(clear["Frag"]),
        gt_tracks=len({int(i) for ids, _ in gt for i in ids}),
        predicted_tracks=len({int(i) for ids, _ in predicted for i in ids}),
    )


def tracked_boxes(update: TrackUpdate) -> tuple[np.ndarray, np.ndarray]:
    """The tracks matched on this frame, as (ids, boxes_xyxy): what a tracker is scored on."""
    matched = update.tracked
    return update.ids[matched], update.boxes_xyxy[matched]


def run_tracker(tracker: Tracker, sequence: SyntheticSequence) -> list[tuple[np.ndarray, np.ndarray]]:
    """Feed a synthetic sequence through `tracker`; returns per-frame (ids, boxes_xyxy) of matched tracks."""
    out = []
    for frame in sequence:
        update = tracker.update(frame.boxes_xyxy, frame.scores, frame.labels, frame.frame_index)
        out.append(tracked_boxes(update))
    return out


def ground_truth(sequence: SyntheticSequence) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(frame.gt_ids, frame.gt_boxes_xyxy) for frame in sequence]
