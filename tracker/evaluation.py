"""Multi-object tracking metrics, and scoring the tracker on a detector's output.

- `evaluate`: CLEAR MOTA, IDF1 and HOTA via the maintained `trackers` evaluator (`trackers.eval`, Roboflow,
  reimplements TrackEval's matching and metrics and works with NumPy 2, unlike `motmetrics` 1.4). It is a
  test/benchmark dependency, so it is imported only when `evaluate` is called.
- `tracking_metrics`: MOTA and IDF1 with no optional dependency, for `groundwatch eval`.
- `score_videos`: the tracker run on per-frame detections (e.g. `gdino.evaluate.tracking_sets`, the model on
  held-out shapes videos) and scored with `tracking_metrics`. The detector's side is passed in as data, so the
  tracker package depends on nothing of gdino.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from scipy.optimize import linear_sum_assignment

from tracker.config import TrackerConfig
from tracker.core import Tracker, TrackUpdate
from tracker.matching import iou_matrix
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


# Thresholds for scoring on the shapes world's evaluation score scale (the mean token probability of a phrase,
# lower than the official max-token scores the tracker's defaults were chosen for).
SHAPES_EVALUATION_TRACKER = TrackerConfig(low_score=0.1, high_score=0.3, new_track_score=0.35)


def score_videos(videos: Iterable[tuple[Sequence, Sequence]],
                 config: TrackerConfig = SHAPES_EVALUATION_TRACKER) -> dict[str, float]:
    """Run a fresh tracker per video and score it: `videos` holds (detections, truths) per video, detections per
    frame (boxes_xyxy (N, 4), scores (N,), labels) and truths per frame (ids (M,), boxes_xyxy (M, 4)); ids must
    not repeat across videos. Returns `tracking_metrics` over all videos."""
    truth_boxes, truth_ids, hyp_boxes, hyp_ids = [], [], [], []
    for video_index, (detections, truths) in enumerate(videos):
        tracker = Tracker(config)
        for frame_index, ((boxes, scores, labels), (ids, boxes_truth)) in enumerate(zip(detections, truths)):
            track_ids, track_boxes = tracked_boxes(tracker.update(np.asarray(boxes, np.float64).reshape(-1, 4),
                                                                  np.asarray(scores, np.float64), list(labels),
                                                                  frame_index))
            truth_boxes.append(boxes_truth)
            truth_ids.append(ids)
            hyp_boxes.append(track_boxes)
            hyp_ids.append(np.asarray(track_ids, np.int64) + video_index * 100_000)
    return tracking_metrics(truth_boxes, truth_ids, hyp_boxes, hyp_ids)


def tracking_metrics(
    truth_boxes: Sequence[np.ndarray], truth_ids: Sequence[np.ndarray],
    hyp_boxes: Sequence[np.ndarray], hyp_ids: Sequence[np.ndarray], iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Per-frame truth and hypothesis boxes (N, 4) xyxy and ids (N,) -> MOTA, IDF1 and counts, with no optional
    dependency (`evaluate` above needs the `trackers` test extra).

    MOTA = 1 - (FN + FP + IDSW) / GT with per-frame matching that keeps the previous frame's pairs when
    they still overlap (CLEAR-MOT), and IDF1 = 2 IDTP / (GT + HYP) with the global one-to-one id assignment
    that maximises the number of frames where both ids overlap."""
    total_gt = total_hyp = fn = fp = idsw = matches = 0
    last_match: dict[int, int] = {}  # truth id -> hypothesis id
    pair_counts: dict[tuple[int, int], int] = {}
    gt_frames: dict[int, int] = {}
    hyp_frames: dict[int, int] = {}
    for gb, gi, hb, hi in zip(truth_boxes, truth_ids, hyp_boxes, hyp_ids):
        gb = np.asarray(gb, np.float64).reshape(-1, 4)
        hb = np.asarray(hb, np.float64).reshape(-1, 4)
        gi = [int(x) for x in np.asarray(gi).reshape(-1)]
        hi = [int(x) for x in np.asarray(hi).reshape(-1)]
        total_gt += len(gi)
        total_hyp += len(hi)
        for g in gi:
            gt_frames[g] = gt_frames.get(g, 0) + 1
        for h in hi:
            hyp_frames[h] = hyp_frames.get(h, 0) + 1
        iou = iou_matrix(gb, hb)  # (G, H); empty when either side is
        # IDF1 co-occurrence: every overlapping pair counts.
        for a, b in zip(*np.nonzero(iou >= iou_threshold)):
            key = (gi[a], hi[b])
            pair_counts[key] = pair_counts.get(key, 0) + 1
        # CLEAR-MOT: keep last frame's correspondences that still hold, then Hungarian on the rest.
        matched: dict[int, int] = {}
        used_g, used_h = set(), set()
        for a, g in enumerate(gi):
            h = last_match.get(g)
            if h is not None and h in hi:
                b = hi.index(h)
                if iou[a, b] >= iou_threshold and b not in used_h:
                    matched[a] = b
                    used_g.add(a)
                    used_h.add(b)
        rest_g = [a for a in range(len(gi)) if a not in used_g]
        rest_h = [b for b in range(len(hi)) if b not in used_h]
        if rest_g and rest_h:
            sub = iou[np.ix_(rest_g, rest_h)]
            rows, cols = linear_sum_assignment(-sub)
            for r, c in zip(rows, cols):
                if sub[r, c] >= iou_threshold:
                    matched[rest_g[r]] = rest_h[c]
        for a, b in matched.items():
            g, h = gi[a], hi[b]
            if g in last_match and last_match[g] != h:
                idsw += 1
            last_match[g] = h
        matches += len(matched)
        fn += len(gi) - len(matched)
        fp += len(hi) - len(matched)
    mota = 1.0 - (fn + fp + idsw) / total_gt if total_gt else float("nan")
    # IDF1: bipartite assignment of truth ids to hypothesis ids maximising co-occurrences.
    g_ids = sorted(gt_frames)
    h_ids = sorted(hyp_frames)
    idtp = 0
    if g_ids and h_ids:
        weights = np.zeros((len(g_ids), len(h_ids)))
        g_index = {g: i for i, g in enumerate(g_ids)}
        h_index = {h: i for i, h in enumerate(h_ids)}
        for (g, h), count in pair_counts.items():
            weights[g_index[g], h_index[h]] = count
        rows, cols = linear_sum_assignment(-weights)
        idtp = int(weights[rows, cols].sum())
    idf1 = 2 * idtp / (total_gt + total_hyp) if total_gt + total_hyp else float("nan")
    return {"MOTA": float(mota), "IDF1": float(idf1), "FN": fn, "FP": fp, "IDSW": idsw, "GT": total_gt,
            "matches": matches}
