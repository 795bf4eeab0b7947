"""Tracker lifecycle, events, labels and config: small hand-made sequences with known answers."""

import numpy as np
import pytest

from tracker import Track, Tracker, TrackerConfig, TrackState

BOX_A = np.array([100.0, 100.0, 150.0, 180.0])
BOX_B = np.array([400.0, 300.0, 480.0, 360.0])


def feed(tracker, frame, boxes, scores=None, labels=None):
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.full(len(boxes), 0.9) if scores is None else scores
    labels = ["car"] * len(boxes) if labels is None else labels
    return tracker.update(boxes, scores, labels, frame)


def test_confirmation_after_min_hits_then_updated():
    tracker = Tracker(TrackerConfig(min_hits=3))
    assert len(feed(tracker, 0, [BOX_A])) == 0
    assert len(feed(tracker, 1, [BOX_A + 2])) == 0
    third = feed(tracker, 2, [BOX_A + 4])
    assert third.started.tolist() == [1] and third.updated.size == 0
    assert third.ids.tolist() == [1]
    (track,) = third.tracks
    assert track == Track(1, tuple(BOX_A + 4), 0.9, "car", 2, 3, TrackState.TRACKED, 0)
    fourth = feed(tracker, 3, [BOX_A + 6])
    assert fourth.updated.tolist() == [1] and fourth.started.size == 0


def test_min_hits_one_confirms_immediately():
    tracker = Tracker(TrackerConfig(min_hits=1))
    first = feed(tracker, 0, [BOX_A, BOX_B])
    assert sorted(first.started.tolist()) == [1, 2]


def test_tentative_track_missing_a_frame_is_dropped_silently():
    tracker = Tracker(TrackerConfig(min_hits=3))
    feed(tracker, 0, [BOX_A])
    feed(tracker, 1, [BOX_A])
    gap = feed(tracker, 2, [])
    assert gap.lost.size == 0 and gap.ended.size == 0
    feed(tracker, 3, [BOX_A])
    assert feed(tracker, 4, [BOX_A]).started.size == 0  # a fresh tentative track: only 2 hits so far


def test_lost_then_recovered_keeps_id():
    tracker = Tracker(TrackerConfig(min_hits=1, max_age=5))
    feed(tracker, 0, [BOX_A])
    missed = feed(tracker, 1, [])
    assert missed.lost.tolist() == [1]
    assert missed.states.tolist() == [TrackState.LOST] and missed.frames_unseen.tolist() == [1]
    assert feed(tracker, 2, []).lost.size == 0  # `lost` fires once, on the first missed frame
    back = feed(tracker, 3, [BOX_A])
    assert back.updated.tolist() == [1] and back.states.tolist() == [TrackState.TRACKED]


def test_removed_after_max_age_unseen_frames():
    tracker = Tracker(TrackerConfig(min_hits=1, max_age=3))
    feed(tracker, 0, [BOX_A])
    for frame in (1, 2, 3):
        assert feed(tracker, frame, []).ended.size == 0
    gone = feed(tracker, 4, [])
    assert gone.ended.tolist() == [1] and len(gone) == 0
    assert gone.ended_tracks[0].state == TrackState.ENDED and gone.ended_tracks[0].label == "car"


def test_frame_gap_ages_tracks_by_the_gap():
    tracker = Tracker(TrackerConfig(min_hits=1, max_age=10))
    feed(tracker, 0, [BOX_A])
    assert feed(tracker, 11, []).ended.tolist() == [1]


def test_constant_velocity_keeps_a_fast_mover():
    """A box that speeds up to twice its own width per frame has IoU 0 with its last position; the
    constant-velocity prediction must carry its id."""
    tracker = Tracker(TrackerConfig(min_hits=1))
    box = np.array([0.0, 0.0, 40.0, 40.0])
    x = 0.0
    ids = set()
    for frame in range(20):
        x += min(10.0 + 5.0 * frame, 80.0)
        result = feed(tracker, frame, [box + np.array([x, 0.0, x, 0.0])])
        ids.update(result.ids.tolist())
    assert ids == {1}


def test_low_score_detection_extends_a_tracked_track_but_starts_nothing():
    tracker = Tracker(TrackerConfig(min_hits=1))
    feed(tracker, 0, [BOX_A])
    kept = feed(tracker, 1, [BOX_A, BOX_B], scores=np.array([0.3, 0.3]))
    assert kept.updated.tolist() == [1] and kept.started.size == 0
    assert kept.detection_indices.tolist() == [0]


def test_labels_separate_tracks_by_default_and_not_when_class_agnostic():
    per_label = Tracker(TrackerConfig(min_hits=1))
    feed(per_label, 0, [BOX_A], labels=["red car"])
    switched = feed(per_label, 1, [BOX_A], labels=["person"])
    assert switched.started.tolist() == [2] and switched.lost.tolist() == [1]

    agnostic = Tracker(TrackerConfig(min_hits=1, class_agnostic=True))
    feed(agnostic, 0, [BOX_A], labels=["red car"])
    same = feed(agnostic, 1, [BOX_A], labels=["person"])
    assert same.updated.tolist() == [1] and same.labels == ["person"]


def test_integer_labels_and_no_labels():
    tracker = Tracker(TrackerConfig(min_hits=1))
    result = tracker.update(np.stack([BOX_A, BOX_B]), np.array([0.9, 0.9]), np.array([3, 7]), 0)
    assert sorted(result.labels) == [3, 7]
    unlabelled = Tracker(TrackerConfig(min_hits=1)).update(np.stack([BOX_A]), np.array([0.9]), None, 0)
    assert unlabelled.labels == [None]


def test_finish_ends_everything_and_ids_continue():
    tracker = Tracker(TrackerConfig(min_hits=1))
    feed(tracker, 0, [BOX_A, BOX_B])
    feed(tracker, 1, [BOX_A])
    finished = tracker.finish()
    assert sorted(finished.ended.tolist()) == [1, 2] and len(finished) == 0
    assert {t.state for t in finished.ended_tracks} == {TrackState.ENDED}
    assert tracker.finish().ended.size == 0
    assert feed(tracker, 2, [BOX_A]).started.tolist() == [3]
    assert tracker.counters.tracks_started == 3 and tracker.counters.tracks_ended == 2


def test_frame_index_defaults_to_next_frame():
    tracker = Tracker(TrackerConfig(min_hits=1))
    assert tracker.update([BOX_A], [0.9]).frame_index == 0
    assert tracker.update([BOX_A], [0.9]).frame_index == 1


def test_config_validation_reports_every_bad_field():
    with pytest.raises(ValueError) as error:
        TrackerConfig(high_score=1.5, min_hits=0, match_iou=0.0)
    message = str(error.value)
    assert "high_score" in message and "min_hits" in message and "match_iou" in message


def test_many_tracks_grow_capacity():
    tracker = Tracker(TrackerConfig(min_hits=1), initial_capacity=2)
    corners = np.stack(np.meshgrid(np.arange(30) * 50.0, np.arange(10) * 50.0), -1).reshape(-1, 2)
    boxes = np.concatenate([corners, corners + 40.0], axis=1)
    for frame in range(3):
        result = tracker.update(boxes + frame, np.full(300, 0.9), None, frame)
    assert len(result) == 300 and result.updated.size == 300
