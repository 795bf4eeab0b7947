"""Tracker settings: one frozen dataclass, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass


class TrackerConfigError(ValueError):
    """Bad tracker settings; `problems` holds every one as (field name, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("invalid TrackerConfig:\n  " + "\n  ".join(f"{name}: {message}" for name, message in problems))


@dataclass(frozen=True)
class TrackerConfig:
    """Thresholds and ages of the ByteTrack-style IoU tracker. Ages count frames (by `frame_index`).

    Detection scores split the input in three: `score >= high_score` feeds the first association and may start
    tracks; `low_score <= score < high_score` only extends tracks that were matched on the previous frame
    (ByteTrack's second stage, which keeps partly occluded objects); below `low_score` is ignored.
    """

    high_score: float = 0.5
    """Scores at or above this are high-confidence detections (first association stage)."""
    low_score: float = 0.1
    """Scores below this are ignored; between this and `high_score` they enter the second stage only."""
    new_track_score: float = 0.6
    """An unmatched high-confidence detection starts a tentative track only at this score or above."""
    match_iou: float = 0.2
    """Minimum IoU between a track's predicted box and a high-confidence detection."""
    low_match_iou: float = 0.5
    """Minimum IoU in the second stage (low-confidence detections): stricter, as those are noisier."""
    tentative_match_iou: float = 0.3
    """Minimum IoU for a tentative (not yet confirmed) track to take a detection."""
    min_hits: int = 2
    """Consecutive matched frames before a tentative track is confirmed (emits `started`, gets its id).
    A tentative track that misses one frame is dropped without an event. 1 confirms on the first detection."""
    max_age: int = 30
    """A confirmed track unseen for more than this many frames is removed (emits `ended`)."""
    velocity_smoothing: float = 0.4
    """Weight of the newest observed displacement in the constant-velocity estimate (1 = no smoothing)."""
    motion: str = "velocity"
    """How a track's box is predicted for association: "kalman" (a constant-velocity Kalman filter on centre,
    aspect ratio and height, noise proportional to the box height, as ByteTrack's) or "velocity" (the last box
    moved by an exponentially smoothed velocity, `velocity_smoothing`)."""
    kalman_position_noise: float = 1.0 / 20
    """Kalman filter: standard deviation of position noise (process and measurement) per pixel of box height."""
    kalman_velocity_noise: float = 1.0 / 160
    """Kalman filter: standard deviation of the per-frame velocity change per pixel of box height."""
    recovery: bool = True
    """Observation-centric recovery (OC-SORT): confirmed tracks left unmatched after the two ByteTrack stages get
    a second chance against the free high-confidence detections, by IoU (>= `recovery_iou`) with their last
    observed box instead of their prediction."""
    recovery_iou: float = 0.3
    """Minimum IoU with the last observed box in recovery: stricter than `match_iou`, as a box that has not
    moved with its track is more easily another object's."""
    recovery_buffer: float = 0.3
    """Recovery compares buffered boxes (C-BIoU, Yang et al. 2023): the last observed box and the detection each
    grown by this fraction of their width and height on every side before the IoU, so an object that turned or
    stopped while unseen for a few frames, near its last box but off it, is still found. 0: plain IoU."""
    max_predict_frames: int = 20
    """Constant-velocity extrapolation stops after this many unseen frames, so a lost box does not fly away."""
    class_agnostic: bool = False
    """False: a track only takes detections with its own label (the grounded phrase). True: labels ignored
    for association; the track reports the label of its latest detection."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("high_score", "low_score", "new_track_score", "velocity_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append((name, f"must be in [0, 1] (got {value!r})"))
        for name in ("match_iou", "low_match_iou", "tentative_match_iou", "recovery_iou"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                problems.append((name, f"must be in (0, 1] (got {value!r})"))
        if self.low_score > self.high_score:
            problems.append(("low_score", f"{self.low_score!r} is above high_score {self.high_score!r}"))
        for name, least in (("min_hits", 1), ("max_age", 0), ("max_predict_frames", 0)):
            value = getattr(self, name)
            if value < least:
                problems.append((name, f"must be at least {least} (got {value!r})"))
        if self.motion not in ("kalman", "velocity"):
            problems.append(("motion", f"must be 'kalman' or 'velocity' (got {self.motion!r})"))
        if not 0.0 <= self.recovery_buffer <= 2.0:
            problems.append(("recovery_buffer", f"must be in [0, 2] (got {self.recovery_buffer!r})"))
        for name in ("kalman_position_noise", "kalman_velocity_noise"):
            if not getattr(self, name) > 0.0:
                problems.append((name, f"must be positive (got {getattr(self, name)!r})"))
        if problems:
            raise TrackerConfigError(problems)
