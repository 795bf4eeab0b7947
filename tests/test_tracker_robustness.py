"""What real detectors emit: each case is a regression test naming the failure it guards."""

import numpy as np
import pytest

from tracker import Tracker, TrackerConfig

GOOD = np.array([[10.0, 10.0, 60.0, 80.0], [200.0, 200.0, 260.0, 240.0]])


def tracker_with_two_tracks() -> Tracker:
    tracker = Tracker(TrackerConfig(min_hits=1))
    tracker.update(GOOD, [0.9, 0.9], ["a", "a"], 0)
    return tracker


def test_nan_coordinates_are_dropped_and_counted():
    """A NaN box used to poison the IoU matrix and hand the NaN to the assignment solver."""
    tracker = tracker_with_two_tracks()
    boxes = np.vstack([GOOD, [[np.nan, 10.0, 60.0, 80.0], [10.0, 10.0, 60.0, np.nan]]])
    result = tracker.update(boxes, [0.9] * 4, ["a"] * 4, 1)
    assert result.updated.size == 2 and result.started.size == 0
    assert result.dropped_detections == 2
    assert tracker.counters.dropped_nonfinite_box == 2
    assert np.isfinite(result.boxes_xyxy).all()


def test_infinite_coordinates_are_dropped_and_counted():
    """An inf box has inf area, so inf/inf IoU is NaN: it must never reach the matcher."""
    tracker = tracker_with_two_tracks()
    boxes = np.vstack([GOOD, [[-np.inf, -np.inf, np.inf, np.inf]]])
    result = tracker.update(boxes, [0.9] * 3, ["a"] * 3, 1)
    assert result.updated.size == 2 and tracker.counters.dropped_nonfinite_box == 1


def test_finite_coordinates_whose_area_overflows_are_dropped():
    """Coordinates near float max are finite but their area is inf; they used to yield NaN IoU."""
    tracker = tracker_with_two_tracks()
    boxes = np.vstack([GOOD, [[-1e200, -1e200, 1e200, 1e200]]])
    result = tracker.update(boxes, [0.9] * 3, ["a"] * 3, 1)
    assert result.updated.size == 2 and tracker.counters.dropped_nonfinite_box == 1


def test_zero_area_boxes_are_dropped_and_counted():
    """A zero-width box has zero union with another degenerate box: 0/0 in the IoU."""
    tracker = Tracker(TrackerConfig(min_hits=1))
    boxes = np.array([[10.0, 10.0, 10.0, 50.0], [10.0, 10.0, 50.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    result = tracker.update(boxes, [0.9] * 3, None, 0)
    assert len(result) == 0 and tracker.counters.dropped_zero_area == 3


def test_inverted_boxes_are_dropped_and_counted():
    """x2 < x1 gives a negative area, which made a larger 'IoU' than any real overlap."""
    tracker = tracker_with_two_tracks()
    inverted = GOOD[:, [2, 3, 0, 1]]
    result = tracker.update(inverted, [0.9, 0.9], ["a", "a"], 1)
    assert result.updated.size == 0 and result.started.size == 0
    assert tracker.counters.dropped_inverted_box == 2


def test_scores_outside_unit_interval_are_clipped_and_counted():
    """A logit-like score of 3.2 or -0.5 must not crash nor be thrown away when its box is fine."""
    tracker = Tracker(TrackerConfig(min_hits=1))
    result = tracker.update(GOOD, [3.2, -0.5], None, 0)
    assert result.scores.tolist() == [1.0]  # the clipped 1.0 starts a track; 0.0 is below low_score
    assert tracker.counters.clipped_scores == 2 and result.dropped_detections == 0


def test_nan_scores_are_dropped_and_counted():
    """A NaN score compares false with every threshold, so it used to slip between the stages."""
    tracker = Tracker(TrackerConfig(min_hits=1))
    result = tracker.update(GOOD, [np.nan, 0.9], None, 0)
    assert len(result) == 1 and tracker.counters.dropped_nonfinite_score == 1


@pytest.mark.parametrize("empty", [None, [], np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 4), np.float32)])
def test_empty_input_ages_tracks(empty):
    """A frame without detections (in any empty form) used to fail on reshaping."""
    tracker = tracker_with_two_tracks()
    result = tracker.update(empty, empty if empty is None else [], [], 1)
    assert sorted(result.lost.tolist()) == [1, 2]


def test_empty_input_on_a_fresh_tracker():
    """The first frame of a stream may have nothing in it."""
    result = Tracker().update(np.zeros((0, 4)), np.zeros(0), [], 0)
    assert len(result) == 0 and result.ended.size == 0


def test_hundreds_of_detections_including_duplicates():
    """A detector without NMS can emit hundreds of overlapping boxes; the matcher must stay one-to-one."""
    rng = np.random.default_rng(0)
    tracker = Tracker(TrackerConfig(min_hits=1))
    centres = rng.uniform(0, 800, (300, 2))
    for frame in range(5):
        jittered = np.repeat(centres, 2, axis=0) + rng.normal(0, 2, (600, 2))
        boxes = np.concatenate([jittered - 20, jittered + 20], axis=1)
        result = tracker.update(boxes, rng.uniform(0, 1, 600), None, frame)
        assert np.unique(result.ids).size == len(result)
        matched = result.detection_indices[result.detection_indices >= 0]
        assert np.unique(matched).size == matched.size


def test_float32_and_nested_lists_are_accepted():
    """The detector hands float32 arrays; hand-written callers pass lists."""
    tracker = Tracker(TrackerConfig(min_hits=1))
    assert len(tracker.update(GOOD.astype(np.float32), np.array([0.9, 0.9], np.float32), None, 0)) == 2
    assert len(tracker.update(GOOD.tolist(), [0.9, 0.9], ["x", "y"], 1)) == 4  # new labels: 2 new, 2 lost


def test_scores_array_is_not_modified():
    """Clipping happens on a copy: the caller's score array belongs to the caller."""
    scores = np.array([3.0, 0.9])
    Tracker().update(GOOD, scores, None, 0)
    assert scores.tolist() == [3.0, 0.9]


def test_frame_index_going_backwards_is_counted_not_fatal():
    """A replayed or restarted source can repeat frame indices; ages must still move forward."""
    tracker = tracker_with_two_tracks()
    result = tracker.update(GOOD, [0.9, 0.9], None, 0)
    assert tracker.counters.out_of_order_frames == 1
    assert (result.ages >= 0).all() and result.updated.size == 0  # labels None != "a": separate tracks


def test_mismatched_lengths_raise_value_error():
    """A caller bug (3 boxes, 2 scores) is reported clearly instead of reading past an array."""
    with pytest.raises(ValueError, match="scores"):
        Tracker().update(np.zeros((3, 4)), [0.5, 0.5], None, 0)
    with pytest.raises(ValueError, match="labels"):
        Tracker().update(GOOD, [0.5, 0.5], ["a"], 0)
    with pytest.raises(ValueError, match="shape"):
        Tracker().update(np.zeros((2, 5)), [0.5, 0.5], None, 0)
