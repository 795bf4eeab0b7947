"""Evaluation plumbing: the tracker package on shapes-video ground truth scores near-perfect MOTA/IDF1."""

import numpy as np
import pytest

from gdino import shapes
from gdino.evaluate import _track_output, tracking_metrics


def test_tracker_on_ground_truth_boxes_scores_high():
    tracker_package = pytest.importorskip("tracker")
    frames, truths = shapes.render_video(shapes.EVAL_SEED_OFFSET + 5, 60, (120, 160), fps=10)
    tracker = tracker_package.Tracker(tracker_package.TrackerConfig())
    hyp_boxes, hyp_ids = [], []
    for truth in truths:
        update = tracker.update(truth.boxes_xyxy.astype(np.float64), np.full(len(truth.phrases), 0.9),
                                list(truth.categories), truth.frame_index)
        boxes, ids = _track_output(update)
        hyp_boxes.append(boxes)
        hyp_ids.append(ids)
    report = tracking_metrics([t.boxes_xyxy for t in truths], [t.track_ids for t in truths], hyp_boxes, hyp_ids)
    assert report["MOTA"] > 0.8 and report["IDF1"] > 0.8, report
