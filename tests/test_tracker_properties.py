"""Invariants of the track lifecycle on arbitrary (hypothesis-drawn) detection streams."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker import Tracker, TrackerConfig

# Boxes on a coarse grid so that drawn streams overlap, cross and repeat often.
box_strategy = st.tuples(
    st.integers(0, 12), st.integers(0, 12), st.integers(1, 5), st.integers(1, 5),
    st.sampled_from([0.05, 0.3, 0.55, 0.7, 0.95]), st.sampled_from(["a", "b"]),
)
frame_strategy = st.lists(box_strategy, max_size=8)
stream_strategy = st.lists(
    st.one_of(frame_strategy, st.just("finish")), min_size=1, max_size=25
)
config_strategy = st.builds(
    TrackerConfig,
    min_hits=st.integers(1, 3),
    max_age=st.integers(0, 6),
    class_agnostic=st.booleans(),
)


def as_arrays(frame):
    boxes = np.array([[x * 10.0, y * 10.0, (x + w) * 10.0, (y + h) * 10.0] for x, y, w, h, _, _ in frame])
    return boxes.reshape(-1, 4), np.array([s for *_, s, _ in frame]), [label for *_, label in frame]


class LifecycleLedger:
    """Checks every TrackUpdate against what was announced before."""

    def __init__(self):
        self.started: set[int] = set()
        self.ended: set[int] = set()
        self.highest = 0

    def check(self, result):
        started = result.started.tolist()
        ended = result.ended.tolist()
        assert len(set(started)) == len(started)
        for track_id in started:
            assert track_id not in self.started, f"id {track_id} started twice (reused)"
            assert track_id > self.highest, "ids must increase"
            self.highest = track_id
        self.started.update(started)
        for track_id in ended:
            assert track_id in self.started, f"id {track_id} ended without starting"
            assert track_id not in self.ended, f"id {track_id} ended twice"
        self.ended.update(ended)
        current = set(result.ids.tolist())
        assert len(current) == len(result)
        assert current <= self.started - self.ended, "a current track was never started or already ended"
        for events in (result.updated, result.lost):
            assert set(events.tolist()) <= current
        assert set(started) <= current


@settings(max_examples=120, deadline=None)
@given(config_strategy, stream_strategy)
def test_ids_never_reused_and_every_started_track_ends_once_input_stops(config, stream):
    tracker = Tracker(config)
    ledger = LifecycleLedger()
    frame_index = 0
    for frame in stream:
        if frame == "finish":
            ledger.check(tracker.finish(frame_index))
            continue
        ledger.check(tracker.update(*as_arrays(frame), frame_index))
        frame_index += 1
    # The input stops: empty frames until every track has aged out.
    for _ in range(config.max_age + 1):
        ledger.check(tracker.update(None, None, None, frame_index))
        frame_index += 1
    assert ledger.started == ledger.ended, f"never ended: {sorted(ledger.started - ledger.ended)}"
    assert tracker.active_count == 0
    assert tracker.counters.tracks_started == tracker.counters.tracks_ended == len(ledger.started)


@settings(max_examples=60, deadline=None)
@given(config_strategy, st.lists(frame_strategy, min_size=1, max_size=20))
def test_finish_ends_every_started_track(config, frames):
    tracker = Tracker(config)
    ledger = LifecycleLedger()
    for frame_index, frame in enumerate(frames):
        ledger.check(tracker.update(*as_arrays(frame), frame_index))
    ledger.check(tracker.finish())
    assert ledger.started == ledger.ended
