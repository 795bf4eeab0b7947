"""Tracking quality against ground truth on small synthetic scenes, with the standard metrics (fast)."""

import numpy as np
import pytest

from tracker import Tracker, TrackerConfig, synthetic
from tracker.evaluation import evaluate, ground_truth, run_tracker


@pytest.fixture(scope="module")
def crossing_scene():
    return synthetic.generate(synthetic.crossing(seed=3, num_frames=120))


def test_quality_on_crossing_scene(crossing_scene):
    metrics = evaluate(ground_truth(crossing_scene), run_tracker(Tracker(TrackerConfig()), crossing_scene))
    # 10% of detections are dropped and cannot be reported, so MOTA tops out near 0.9.
    assert metrics.mota >= 0.8, metrics
    assert metrics.idf1 >= 0.8, metrics
    assert metrics.id_switches <= 3, metrics
    assert metrics.false_positives <= 5, metrics


def bytetrack_predictions(scene):
    sv = pytest.importorskip("supervision")
    trackers = pytest.importorskip("trackers")
    reference = trackers.ByteTrackTracker()
    predicted = []
    for frame in scene:
        detections = sv.Detections(
            xyxy=frame.boxes_xyxy.astype(np.float64), confidence=frame.scores,
            class_id=np.zeros(len(frame.scores), dtype=int),
        )
        out = reference.update(detections)
        keep = out.tracker_id >= 0
        predicted.append((out.tracker_id[keep], out.xyxy[keep]))
    return predicted


def test_at_least_as_good_as_bytetrack():
    """The issue's quality bar on scenes small enough for the test suite (the benchmark has the rest).
    Averaged over a few seeds: on one 120-frame clip the two can differ by a single frame either way."""
    ours, theirs = [], []
    for seed in range(4):
        scene = synthetic.generate(synthetic.crossing(seed=seed, num_frames=120))
        truth = ground_truth(scene)
        ours.append(evaluate(truth, run_tracker(Tracker(TrackerConfig()), scene)))
        theirs.append(evaluate(truth, bytetrack_predictions(scene)))
    for metric in ("mota", "idf1"):
        mine = np.mean([getattr(m, metric) for m in ours])
        reference = np.mean([getattr(m, metric) for m in theirs])
        assert mine >= reference, (metric, mine, reference)
    assert sum(m.id_switches for m in ours) <= sum(m.id_switches for m in theirs)


def test_perfect_detections_give_perfect_scores():
    scene = synthetic.generate(synthetic.SceneConfig(
        num_frames=60, num_objects=5, drop_rate=0.0, jitter=0.0, false_positives_per_frame=0.0,
        reenter_probability=0.0, min_visibility=0.0, seed=1,
    ))
    # Perfect detections deserve full trust: every score is "high", every detection may start a track.
    config = TrackerConfig(min_hits=1, high_score=0.0, low_score=0.0, new_track_score=0.0)
    metrics = evaluate(ground_truth(scene), run_tracker(Tracker(config), scene))
    assert metrics.id_switches == 0 and metrics.false_positives == 0
    assert metrics.mota >= 0.99


def test_generator_is_deterministic_and_drops_at_the_configured_rate():
    config = synthetic.SceneConfig(num_frames=150, drop_rate=0.2, seed=7)
    first = synthetic.generate(config)
    second = synthetic.generate(config)
    assert all(np.array_equal(a.boxes_xyxy, b.boxes_xyxy) and a.labels == b.labels for a, b in zip(first, second))
    rate = first.missed_detections / first.gt_box_count
    assert abs(rate - 0.2) < 0.03, rate
    other = synthetic.generate(synthetic.SceneConfig(num_frames=150, drop_rate=0.2, seed=8))
    assert not np.array_equal(first.frames[0].boxes_xyxy, other.frames[0].boxes_xyxy)


def test_generator_covers_reentry_false_positives_and_occlusion():
    scene = synthetic.generate(synthetic.crowded(seed=0, num_frames=200))
    present = np.zeros((len(scene), scene.config.num_objects + 2 * scene.config.crossing_pairs), dtype=bool)
    for frame in scene:
        present[frame.frame_index, frame.gt_ids] = True
    # Re-entry: some id present, then absent for a while, then present again.
    gaps = [np.diff(np.flatnonzero(column)).max() for column in present.T if column.sum() > 1]
    assert max(gaps) > 10
    assert sum(int((frame.detection_gt_ids < 0).sum()) for frame in scene) > 100
    assert min(float(frame.gt_visibility.min()) for frame in scene if frame.gt_ids.size) < 0.9
    for frame in scene:
        boxes = frame.boxes_xyxy
        assert boxes.dtype == np.float32 and frame.scores.dtype == np.float32
        assert ((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])).all()
