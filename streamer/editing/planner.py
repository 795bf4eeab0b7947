"""Which boxes to redact on each frame: the detector's boxes, followed through its misses by the tracker.

Per-frame detections alone leak on every frame the detector misses. The planners run `tracker.Tracker` over the
detections and add, per track:

- offline (`RedactionPlanner`, the whole video known in advance): the box interpolated linearly between the last
  sighting before a gap and the next one after it, and the box extrapolated a few frames before the first and
  after the last sighting (at the track's velocity, growing with every frame of guessing). A track that reaches
  a frame edge within `edge_frames` of its first (last) sighting is followed until it is out of the frame: the
  object was already (still) there, only too cut off to be detected.
- causally (`LiveRedactionPlanner`, for a live stream: no look-ahead): a lost track's box extrapolated for up to
  `hold_frames` frames (or until out of the frame) after its last sighting, growing as above.

Everything is xyxy pixels of the frame. Detections at or above `box_threshold` are always redacted; those between
`track_threshold` and `box_threshold` only when a track takes them (ByteTrack's second stage: a partly hidden
object's weak detection extends its track, a weak detection on its own is noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from tracker import TrackerConfig


@dataclass(frozen=True)
class PlannerConfig:
    """Settings of the redaction planners. Frame counts are frames of the video (not seconds)."""

    box_threshold: float = 0.25
    """Detections at or above this score are redacted on their own frame, tracked or not."""
    track_threshold: float = 0.1
    """Detections at or above this (and below `box_threshold`) are redacted only when they extend a track."""
    max_gap: int = 30
    """A track unseen for more than this many frames ends; shorter gaps are bridged."""
    extend_frames: int = 5
    """Frames redacted before a track's first and after its last sighting (at its velocity)."""
    edge_frames: int = 20
    """A track whose extrapolated box leaves the frame within this many frames of its first (last) sighting is
    followed until it is out of the frame (objects enter and leave at the edges, cut off and undetected)."""
    growth: float = 0.1
    """Per frame of extrapolation or interpolation away from a sighting, the box grows by this fraction of its
    width and height on each side (guessing is uncertain), up to `max_growth`."""
    max_growth: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.track_threshold <= self.box_threshold <= 1.0:
            raise ValueError(f"need 0 <= track_threshold ({self.track_threshold}) <= box_threshold "
                             f"({self.box_threshold}) <= 1")
        for name in ("max_gap", "extend_frames", "edge_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.growth < 0 or self.max_growth < 0:
            raise ValueError("growth and max_growth must be >= 0")

    def tracker_config(self) -> TrackerConfig:
        # min_hits=1: a single confident detection is a track at once (for privacy a false track costs a blur,
        # a missed one costs a face).
        return TrackerConfig(high_score=self.box_threshold, new_track_score=self.box_threshold,
                             low_score=self.track_threshold, min_hits=1, max_age=self.max_gap)


@dataclass
class FramePlan:
    """What to redact on one frame, and why (for the redaction report)."""

    detected: list[np.ndarray] = field(default_factory=list)  # (4,) xyxy boxes seen on this frame
    interpolated: list[np.ndarray] = field(default_factory=list)  # bridged through a gap of a track
    extrapolated: list[np.ndarray] = field(default_factory=list)  # before a track's start / after its end

    def boxes(self) -> np.ndarray:
        """(N, 4) float64 xyxy: every box of the frame."""
        every = self.detected + self.interpolated + self.extrapolated
        return np.array(every, dtype=np.float64).reshape(-1, 4)


def _grown(box_xyxy: np.ndarray, steps: int, growth: float, max_growth: float) -> np.ndarray:
    """The box grown by min(steps * growth, max_growth) of its size on each side."""
    fraction = min(steps * growth, max_growth)
    size = box_xyxy[2:] - box_xyxy[:2]
    return np.concatenate([box_xyxy[:2] - fraction * size, box_xyxy[2:] + fraction * size])


def _velocity(frames: Sequence[int], boxes: Sequence[np.ndarray], at_end: bool, span: int = 3) -> np.ndarray:
    """(4,) xyxy pixels per frame over the last (or first) `span` sightings of a track; zero for one sighting."""
    if len(frames) < 2:
        return np.zeros(4)
    k = min(span, len(frames) - 1)
    if at_end:
        (f0, b0), (f1, b1) = (frames[-1 - k], boxes[-1 - k]), (frames[-1], boxes[-1])
    else:
        (f0, b0), (f1, b1) = (frames[0], boxes[0]), (frames[k], boxes[k])
    return (b1 - b0) / max(1, f1 - f0)


def _frames_until_out(box_xyxy: np.ndarray, velocity: np.ndarray, width: int, height: int, limit: int) -> int | None:
    """Steps of `velocity` until the box is wholly outside the frame, or None if not within `limit` steps."""
    for step in range(1, limit + 1):
        x1, y1, x2, y2 = box_xyxy + velocity * step
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            return step
    return None


def _extrapolation(box_xyxy, velocity, width, height, config: PlannerConfig) -> list[np.ndarray]:
    """Boxes for steps 1, 2, ... away from a sighting: `extend_frames` of them, or up to the frame edge."""
    steps = _frames_until_out(box_xyxy, velocity, width, height, config.edge_frames)
    count = max(config.extend_frames, steps or 0)
    return [_grown(box_xyxy + velocity * step, step, config.growth, config.max_growth)
            for step in range(1, count + 1)]


class _Sightings:
    """Runs the tracker over per-frame detections; keeps each track's (frame, box) sightings."""

    def __init__(self, config: PlannerConfig, keep_last: int | None = None) -> None:
        from tracker import Tracker

        self.config = config
        self.keep_last = keep_last  # sightings kept per track (None: all; a live stream keeps a few)
        self.tracker = Tracker(config.tracker_config())
        self.frames: dict[int, list[int]] = {}  # track id -> frame indices of its sightings
        self.boxes: dict[int, list[np.ndarray]] = {}  # track id -> (4,) xyxy boxes of those sightings

    def add(self, frame_index: int, boxes_xyxy, scores, labels: Sequence[Hashable] | None):
        """One frame's detections -> (boxes redacted on sight (N, 4), the TrackUpdate)."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = list(labels) if labels is not None else [None] * len(boxes)
        keep = scores >= self.config.track_threshold
        boxes, scores = boxes[keep], scores[keep]
        labels = [label for label, k in zip(labels, keep) if k]
        update = self.tracker.update(boxes, scores, labels, frame_index)
        sighted = update.detection_indices >= 0
        on_sight = [boxes[d] for d in np.flatnonzero(scores >= self.config.box_threshold)]
        taken = set()
        for track_id, d in zip(update.ids[sighted].tolist(), update.detection_indices[sighted].tolist()):
            self.frames.setdefault(track_id, []).append(frame_index)
            self.boxes.setdefault(track_id, []).append(boxes[d])
            if self.keep_last is not None and len(self.frames[track_id]) > self.keep_last:
                del self.frames[track_id][0], self.boxes[track_id][0]
            taken.add(d)
        # Weak detections a track took are redacted too (strong ones already are).
        on_sight += [boxes[d] for d in sorted(taken) if scores[d] < self.config.box_threshold]
        return on_sight, update


class RedactionPlanner:
    """Offline: feed every frame's detections (`add`), then `plan()` gives each frame's boxes, with look-ahead.

        planner = RedactionPlanner(PlannerConfig(), width, height)
        for index, found in enumerate(detections):
            planner.add(index, found.boxes_xyxy, found.scores, found.phrases)
        plans = planner.plan()      # one FramePlan per frame added; plans[i].boxes() -> (N, 4) xyxy
    """

    def __init__(self, config: PlannerConfig, width: int, height: int) -> None:
        self.config, self.width, self.height = config, width, height
        self._sightings = _Sightings(config)
        self._detected: dict[int, list[np.ndarray]] = {}
        self._count = 0

    def add(self, frame_index: int, boxes_xyxy, scores, labels: Sequence[Hashable] | None = None) -> None:
        """Frames must come in increasing `frame_index` order, starting at 0 (missing indices: no detections)."""
        on_sight, _ = self._sightings.add(frame_index, boxes_xyxy, scores, labels)
        self._detected[frame_index] = on_sight
        self._count = max(self._count, frame_index + 1)

    def plan(self, frame_count: int | None = None) -> list[FramePlan]:
        count = self._count if frame_count is None else frame_count
        plans = [FramePlan(detected=list(self._detected.get(i, []))) for i in range(count)]
        config = self.config
        for track_id, frames in self._sightings.frames.items():
            boxes = self._sightings.boxes[track_id]
            for (f0, b0), (f1, b1) in zip(zip(frames, boxes), zip(frames[1:], boxes[1:])):
                for f in range(f0 + 1, min(f1, count)):
                    t = (f - f0) / (f1 - f0)
                    steps = min(f - f0, f1 - f)
                    plans[f].interpolated.append(_grown(b0 + t * (b1 - b0), steps, config.growth, config.max_growth))
            # A sighting between two others also gets the box interpolated from them: one bad (too small,
            # shifted) detection box between two good ones is covered by its neighbours.
            for (f0, b0), (f, _), (f1, b1) in zip(zip(frames, boxes), zip(frames[1:], boxes[1:]),
                                                   zip(frames[2:], boxes[2:])):
                if f < count and f1 - f0 <= 2 * config.extend_frames:
                    t = (f - f0) / (f1 - f0)
                    plans[f].interpolated.append(_grown(b0 + t * (b1 - b0), min(f - f0, f1 - f), config.growth,
                                                        config.max_growth))
            for direction, frame, box in ((-1, frames[0], boxes[0]), (1, frames[-1], boxes[-1])):
                velocity = _velocity(frames, boxes, at_end=direction > 0) * direction
                for step, extra in enumerate(_extrapolation(box, velocity, self.width, self.height, config), 1):
                    f = frame + direction * step
                    if 0 <= f < count:
                        plans[f].extrapolated.append(extra)
        return plans


class LiveRedactionPlanner:
    """Causal (no look-ahead): one call per frame as it arrives returns the boxes to redact on it now.

        planner = LiveRedactionPlanner(PlannerConfig(), width, height)
        boxes_xyxy = planner.update(frame_index, found.boxes_xyxy, found.scores, found.phrases)   # (N, 4)

    A track the detector loses is redacted where its velocity carries it for `extend_frames` frames (or until
    it is out of the frame, within `edge_frames`); what the detector has not yet seen cannot be redacted.
    """

    def __init__(self, config: PlannerConfig, width: int, height: int) -> None:
        self.config, self.width, self.height = config, width, height
        self._sightings = _Sightings(config, keep_last=4)
        self._held: dict[int, list[np.ndarray]] = {}  # track id -> boxes for the frames after its last sighting

    def update(self, frame_index: int, boxes_xyxy, scores, labels: Sequence[Hashable] | None = None) -> np.ndarray:
        on_sight, update = self._sightings.add(frame_index, boxes_xyxy, scores, labels)
        out = list(on_sight)
        sightings = self._sightings
        for track_id, unseen in zip(update.ids.tolist(), update.frames_unseen.tolist()):
            if unseen == 0:
                self._held.pop(track_id, None)
                continue
            if track_id not in self._held:
                frames, boxes = sightings.frames[track_id], sightings.boxes[track_id]
                velocity = _velocity(frames, boxes, at_end=True)
                self._held[track_id] = _extrapolation(boxes[-1], velocity, self.width, self.height, self.config)
            held = self._held[track_id]
            if unseen <= len(held):
                out.append(held[unseen - 1])
        for track_id in update.ended.tolist():
            self._held.pop(track_id, None)
            sightings.frames.pop(track_id, None)
            sightings.boxes.pop(track_id, None)
        return np.array(out, dtype=np.float64).reshape(-1, 4)
