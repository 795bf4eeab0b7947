"""Which boxes to redact on each frame: the detector's boxes, followed through its misses by the tracker.

Per-frame detections alone leak on every frame the detector misses. The planners run `tracker.Tracker` over the
detections and add, per track:

- offline (`RedactionPlanner`, the whole video known in advance): the box interpolated linearly between the last
  sighting before a gap and the next one after it, and the box extrapolated a few frames before the first and
  after the last sighting (at the track's velocity, growing with every frame of guessing). A track that reaches
  a frame edge within `edge_frames` of its first (last) sighting is followed until it is out of the frame: the
  object was already (still) there, only too cut off to be detected. A sighting between two others, and a
  track's first and last sightings, also get the box carried to their frame from the sightings beside them
  (one bad, short or shifted detection box is covered by where the track was going). A detection cut by the
  frame edge grows along that edge (`_along_edge`: the part in view is boxed least surely there), and a weak
  track that the video's first or last frames cut short of `confirm_hits` sightings is redacted.
- causally (`LiveRedactionPlanner`, for a live stream: no look-ahead): a lost track's box extrapolated for up to
  `extend_frames` frames (or until out of the frame) after its last sighting, growing as above; a sighting boxed
  short of its track or cut by the frame edge also gets the box carried from the sightings before it; a weak
  detection cut by the frame edge is redacted at once (an entering object is cut off and scored low).

Everything is xyxy pixels of the frame. Detections at or above `box_threshold` are always redacted; those between
`track_threshold` and `box_threshold` only when a track takes them (ByteTrack's second stage: a partly hidden
object's weak detection extends its track, a weak detection on its own is noise).
"""

from __future__ import annotations

import bisect
import heapq
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
    confirm_hits: int = 3
    tracker_max_age: int = 3
    """Offline: the tracker ends a track unseen for more than this many frames; the planner then links the
    pieces of one object again (up to `max_gap` apart) by where their motion says each would be."""
    """A track of weak detections only (between `track_threshold` and `box_threshold`) is redacted once it has
    this many sightings: redaction favours recall, and weak boxes that follow one object are that object."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.track_threshold <= self.box_threshold <= 1.0:
            raise ValueError(f"need 0 <= track_threshold ({self.track_threshold}) <= box_threshold "
                             f"({self.box_threshold}) <= 1")
        if self.confirm_hits < 1:
            raise ValueError(f"confirm_hits must be >= 1, got {self.confirm_hits}")
        for name in ("max_gap", "extend_frames", "edge_frames", "tracker_max_age"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.growth < 0 or self.max_growth < 0:
            raise ValueError("growth and max_growth must be >= 0")

    def tracker_config(self, max_age: int | None = None) -> TrackerConfig:
        # min_hits=1: a single confident detection is a track at once (for privacy a false track costs a blur,
        # a missed one costs a face).
        # Every detection the planner keeps starts or extends a track, whatever its phrase; which tracks are
        # redacted is decided by confirmation (`confirm_hits`), not by the tracker.
        return TrackerConfig(high_score=self.track_threshold, new_track_score=self.track_threshold,
                             low_score=self.track_threshold, min_hits=1, max_age=self.max_gap if max_age is None else max_age,
                             class_agnostic=True)


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


_EDGE_MARGIN = 2.0  # pixels: a box side this close to (or beyond) the frame edge is where the frame cuts the object


def _cut_sides(box_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """(4,) bool: which sides (x1, y1, x2, y2) of a detection lie on a frame edge, so say nothing of the object."""
    x1, y1, x2, y2 = box_xyxy
    return np.array([x1 <= _EDGE_MARGIN, y1 <= _EDGE_MARGIN, x2 >= width - _EDGE_MARGIN, y2 >= height - _EDGE_MARGIN])


_ALONG_EDGE = 0.3  # a detection cut by the frame edge grows by this fraction of its length along that edge


def _along_edge(box_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """A detection box cut by a frame edge, grown along that edge by `_ALONG_EDGE` of its length there at each end:
    it spans only the part in view, and that part's extent along the edge is the least sure (a rotated or
    cross-shaped object entering shows a thin piece of itself first, boxed short)."""
    cut = _cut_sides(box_xyxy, width, height)
    if not cut.any():
        return box_xyxy
    x1, y1, x2, y2 = box_xyxy
    if cut[0] or cut[2]:
        y1, y2 = y1 - _ALONG_EDGE * (y2 - y1), y2 + _ALONG_EDGE * (y2 - y1)
    if cut[1] or cut[3]:
        x1, x2 = x1 - _ALONG_EDGE * (x2 - x1), x2 + _ALONG_EDGE * (x2 - x1)
    return np.array([x1, y1, x2, y2])


def _robust_velocity(frames: Sequence[int], boxes: Sequence[np.ndarray], width: int, height: int) -> np.ndarray:
    """(4,) xyxy pixels per frame from `frames[0]` towards `frames[-1]`: the median of the slopes between every
    pair of sightings (Theil-Sen), per axis over both sides of the box, each side only where the frame edge does
    not cut it. One bad box among several moves it little, and a cut-off object's box (shorter and shifted as it
    enters or leaves) does not turn its motion. Zero where fewer than two sightings see a side."""
    frames = np.asarray(frames, dtype=np.float64)
    boxes_xyxy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cut = np.array([_cut_sides(box, width, height) for box in boxes_xyxy]).reshape(-1, 4)
    velocity = np.zeros(4)
    for axis in (0, 1):  # x from sides 0 and 2, y from sides 1 and 3
        slopes = []
        for side in (axis, axis + 2):
            for i in range(len(frames)):
                for j in range(i + 1, len(frames)):
                    if not cut[i, side] and not cut[j, side] and frames[j] != frames[i]:
                        slopes.append((boxes_xyxy[j, side] - boxes_xyxy[i, side]) / abs(frames[j] - frames[i]))
        if slopes:
            velocity[axis] = velocity[axis + 2] = float(np.median(slopes))
    return velocity


def _whole_box(box_xyxy: np.ndarray, size: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """The box with each side the frame edge cuts pushed out to the object's whole `size` (w, h), measured where
    it was clear of the edges: the detector boxes only the part of a cut-off object still in view."""
    if size is None:
        return box_xyxy
    x1, y1, x2, y2 = box_xyxy
    cut = _cut_sides(box_xyxy, width, height)
    if cut[0] and not cut[2]:
        x1 = min(x1, x2 - size[0])
    if cut[2] and not cut[0]:
        x2 = max(x2, x1 + size[0])
    if cut[1] and not cut[3]:
        y1 = min(y1, y2 - size[1])
    if cut[3] and not cut[1]:
        y2 = max(y2, y1 + size[1])
    return np.array([x1, y1, x2, y2])


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
    """Runs the tracker over per-frame detections; keeps each track's (frame, box, score) sightings.

    Tracking ignores the phrase: a redactor hides everything its prompt names, and a detector that calls the same
    object "red triangle" on one frame and "black triangle" on the next must not split it into two tracks, each
    too short to bridge the other's misses. A track is *confirmed* (redacted) once it has a detection at
    `box_threshold` or `confirm_hits` sightings: weak detections that follow each other in space and time are an
    object the detector is unsure of, not noise.
    """

    def __init__(self, config: PlannerConfig, keep_last: int | None = None, max_age: int | None = None) -> None:
        from tracker import Tracker

        self.config = config
        self.keep_last = keep_last  # sightings kept per track (None: all; a live stream keeps a few)
        self.tracker = Tracker(config.tracker_config(max_age))
        self.frames: dict[int, list[int]] = {}  # track id -> frame indices of its sightings
        self.boxes: dict[int, list[np.ndarray]] = {}  # track id -> (4,) xyxy boxes of those sightings
        self.scores: dict[int, list[float]] = {}  # track id -> scores of those sightings
        self.hits: dict[int, int] = {}  # track id -> sightings so far (not limited by keep_last)
        self.strong: set[int] = set()  # tracks with a sighting at box_threshold or above

    def confirmed(self, track_id: int) -> bool:
        return track_id in self.strong or self.hits.get(track_id, 0) >= self.config.confirm_hits

    def add(self, frame_index: int, boxes_xyxy, scores, labels: Sequence[Hashable] | None):
        """One frame's detections -> (strong boxes (N, 4), {track id: its weak box on this frame}, the TrackUpdate)."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = list(labels) if labels is not None else [None] * len(boxes)
        keep = (scores >= self.config.track_threshold) & np.isfinite(boxes).all(axis=1)
        boxes, scores = boxes[keep], scores[keep]
        labels = [label for label, k in zip(labels, keep) if k]
        update = self.tracker.update(boxes, scores, labels, frame_index)
        sighted = update.detection_indices >= 0
        strong = [boxes[d] for d in np.flatnonzero(scores >= self.config.box_threshold)]
        weak = {}
        for track_id, d in zip(update.ids[sighted].tolist(), update.detection_indices[sighted].tolist()):
            self.frames.setdefault(track_id, []).append(frame_index)
            self.boxes.setdefault(track_id, []).append(boxes[d])
            self.scores.setdefault(track_id, []).append(float(scores[d]))
            self.hits[track_id] = self.hits.get(track_id, 0) + 1
            if scores[d] >= self.config.box_threshold:
                self.strong.add(track_id)
            else:
                weak[track_id] = boxes[d]
            if self.keep_last is not None and len(self.frames[track_id]) > self.keep_last:
                del self.frames[track_id][0], self.boxes[track_id][0], self.scores[track_id][0]
        return strong, weak, update

    def forget(self, track_id: int) -> None:
        for table in (self.frames, self.boxes, self.scores, self.hits):
            table.pop(track_id, None)
        self.strong.discard(track_id)


class RedactionPlanner:
    """Offline: feed every frame's detections (`add`), then `plan()` gives each frame's boxes, with look-ahead.

        planner = RedactionPlanner(PlannerConfig(), width, height)
        for index, found in enumerate(detections):
            planner.add(index, found.boxes_xyxy, found.scores, found.phrases)
        plans = planner.plan()      # one FramePlan per frame added; plans[i].boxes() -> (N, 4) xyxy
    """

    def __init__(self, config: PlannerConfig, width: int, height: int) -> None:
        self.config, self.width, self.height = config, width, height
        # Short tracker tracks, linked afterwards with the whole video in view (`_linked`): a lost track kept
        # for long takes whatever detection comes near its prediction, another object's included.
        self._sightings = _Sightings(config, max_age=min(config.max_gap, config.tracker_max_age))
        self._detected: dict[int, list[np.ndarray]] = {}
        self._weak: dict[int, dict[int, np.ndarray]] = {}  # frame -> track id -> weak box taken by the track
        self._count = 0

    def add(self, frame_index: int, boxes_xyxy, scores, labels: Sequence[Hashable] | None = None) -> None:
        """Frames must come in increasing `frame_index` order, starting at 0 (missing indices: no detections)."""
        strong, weak, _ = self._sightings.add(frame_index, boxes_xyxy, scores, labels)
        self._detected[frame_index] = strong
        self._weak[frame_index] = weak
        self._count = max(self._count, frame_index + 1)

    def plan(self, frame_count: int | None = None) -> list[FramePlan]:
        count = self._count if frame_count is None else frame_count
        config, sightings = self.config, self._sightings
        plans = [FramePlan(detected=[_along_edge(box, self.width, self.height) for box in self._detected.get(i, [])])
                 for i in range(count)]
        fragments = [_Fragment(list(frames), list(sightings.boxes[track_id]), list(sightings.scores[track_id]))
                     for track_id, frames in sightings.frames.items()]
        for track in _linked(fragments, config, self.width, self.height):
            # A weak track needs `confirm_hits` sightings; one the video's start or end cut short (an object
            # entering on its last frames, leaving on its first) could not have them: redaction favours recall.
            cut_short = count - track.frames[0] < config.confirm_hits or track.frames[-1] + 1 < config.confirm_hits
            if not (max(track.scores) >= config.box_threshold or len(track.frames) >= config.confirm_hits
                    or cut_short):
                continue
            frames, boxes = track.frames, track.boxes
            for f, box, score in zip(frames, boxes, track.scores):
                if score < config.box_threshold and f < count:  # strong ones are in already
                    plans[f].detected.append(_along_edge(box, self.width, self.height))
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
            # The first and last sightings have a neighbour on one side only: each also gets the box carried to
            # its frame from the sightings on that side (after the first, before the last), so one bad box at a track's end (an object half
            # hidden as the video ends) is covered by where the track was going. With two sightings there is no
            # motion to carry (zero velocity): the other sighting's box, grown by the frames between them.
            for direction in (-1, 1):
                ordered = list(zip(frames, boxes)) if direction > 0 else list(zip(frames, boxes))[::-1]
                if len(ordered) >= 2 and ordered[-1][0] < count:
                    end_frame = ordered[-1][0]
                    # velocity is per frame in the order of `ordered` (backwards in time for the first sighting)
                    frame, box, velocity = _end_motions(ordered[:-1], self.width, self.height)[0]
                    steps = abs(end_frame - frame)
                    if steps <= config.extend_frames:
                        plans[end_frame].interpolated.append(
                            _grown(box + velocity * steps, steps, config.growth, config.max_growth))
            for direction in (-1, 1):
                for frame, extra in self._extrapolated(frames, boxes, direction):
                    if 0 <= frame < count:
                        plans[frame].extrapolated.append(extra)
        return plans

    def _extrapolated(self, frames, boxes, direction: int):
        """(frame, box) pairs before (direction -1) or after (+1) a track, at its motion fitted over the sightings
        nearest that end (`_robust_velocity`), from its first (last) sighting made whole where the frame edge cuts
        it, and, when the track meets a frame edge, also from its last sighting clear of the edges: a cut-off
        object's box is only the part in the frame, and shrinks and shifts as it leaves, while the whole box
        moved at its velocity is where the object is."""
        ordered = list(zip(frames, boxes)) if direction > 0 else list(zip(frames, boxes))[::-1]
        for frame, box, velocity in _end_motions(ordered, self.width, self.height):
            for step, extra in enumerate(_extrapolation(box, velocity, self.width, self.height, self.config), 1):
                yield frame + direction * step, extra


_WINDOW = 6  # sightings nearest a track's end that its motion there is fitted over
_SHORT = 0.85  # live: a sighting whose width or height is under this fraction of the track's before is suspect


def _end_motions(ordered, width: int, height: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Where to carry a track on from past its end: [(frame, whole box xyxy, velocity per frame)], from its
    last sighting and, when that one is cut by the frame edge, from its last sighting clear of the edges.
    `ordered`: (frame, box) sightings in the direction of travel (the end last)."""
    window = ordered[-_WINDOW:]
    velocity = _robust_velocity([f for f, _ in window], [b for _, b in window], width, height)
    clear = [i for i, (_, box) in enumerate(ordered) if not _cut_sides(box, width, height).any()]
    size = None
    if clear:
        sizes = [ordered[i][1][2:] - ordered[i][1][:2] for i in clear[-3:]]
        size = np.median(np.array(sizes), axis=0)  # (2,) w, h of the whole object
    last_frame, last_box = ordered[-1]
    motions = [(last_frame, _whole_box(last_box, size, width, height), velocity)]
    if clear and clear[-1] != len(ordered) - 1:
        frame, box = ordered[clear[-1]]
        motions.append((frame, box, velocity))
    return motions


@dataclass
class _Fragment:
    """Sightings of one tracker track (frames increasing), before linking."""

    frames: list[int]
    boxes: list[np.ndarray]
    scores: list[float]

    def velocity(self, at_end: bool) -> np.ndarray:
        return _velocity(self.frames, self.boxes, at_end)


def _link_miss(a: _Fragment, b: _Fragment) -> float:
    """How far (in box sizes) fragment `b`'s first box is from where `a` would be by then, and back (the nearer
    of the two); inf when the sizes differ by more than 2x."""
    gap = b.frames[0] - a.frames[-1]
    end, first = a.boxes[-1], b.boxes[0]
    size_a, size_b = end[2:] - end[:2], first[2:] - first[:2]
    if (size_a <= 0).any() or (size_b <= 0).any() or (np.maximum(size_a / size_b, size_b / size_a) > 2).any():
        return np.inf
    ahead = end + a.velocity(at_end=True) * gap  # a carried forward to b's first frame
    behind = first - b.velocity(at_end=False) * gap  # b carried back to a's last frame
    scale = (size_a + size_b) / 2
    centre = lambda box: (box[:2] + box[2:]) / 2  # noqa: E731
    return min(np.abs(centre(ahead) - centre(first)).max() / scale.max(),
               np.abs(centre(behind) - centre(end)).max() / scale.max())


def _link_allowance(gap: int) -> float:
    """The largest miss (box sizes) a link across `gap` frames may have: the allowance grows with the gap, since
    an unseen object may turn."""
    return _LINK_LIMIT * (0.5 + 0.5 * gap)


_LINK_LIMIT = 1.0  # how far off, in box sizes at a one-frame gap, a fragment may start from its predecessor


def _leaves_frame(ordered, gap: int, width: int, height: int) -> bool:
    """Does the track (sightings `ordered` in its direction of travel) move wholly out of the frame within `gap`
    frames after its end? Then it left (or, backwards, entered) there, and is not the track that starts (ended)
    across that gap inside the frame."""
    frame, box, velocity = _end_motions(ordered, width, height)[0]
    return _frames_until_out(box, velocity, width, height, gap) is not None


def _linked(fragments: list[_Fragment], config: PlannerConfig, width: int | None = None,
            height: int | None = None) -> list[_Fragment]:
    """Chains of fragments that are one object the tracker lost and found again (a fast object after a missed
    frame, a detector whose box jumped): greedily, the pairs nearest in space first (`_link_miss`, in box
    sizes; the gap only breaks ties), a fragment ending at most `max_gap` frames before the next one starts,
    within half a box size plus half a box per frame of gap (`_link_allowance`) of where the first would be by
    then. Ranking by the distance itself, not by its share of the allowance: a stray box far away across a long
    gap must not come before the object's own next sighting. Distances are those of the chains linked so far
    (a piece of one sighting has no motion of its own; the chain it starts or ends has), recomputed for the two
    ends a link changes. Given the frame's size: never across a gap in which the first leaves the frame or the second
    enters it (an object that left is not the one that appears later), judged on the chains linked so far."""
    after: dict[int, list[int]] = {i: [] for i in range(len(fragments))}  # i -> fragments that may follow i
    before: dict[int, list[int]] = {i: [] for i in range(len(fragments))}
    by_start = sorted(range(len(fragments)), key=lambda k: fragments[k].frames[0])
    starts = [fragments[k].frames[0] for k in by_start]
    for i, a in enumerate(fragments):  # those starting 1..max_gap frames after i ends (not all pairs: long videos)
        lo = bisect.bisect_right(starts, a.frames[-1])
        hi = bisect.bisect_right(starts, a.frames[-1] + config.max_gap)
        for j in by_start[lo:hi]:
            after[i].append(j)
            before[j].append(i)
    following, preceding = {}, {}
    stamp = [0] * len(fragments)  # bumped whenever the chain a fragment starts or ends changes

    def sightings(i: int, links: dict, enough: int | None = None) -> list:
        """(frame, box) of fragment i and those linked to it through `links`, in time order (ending at i for
        `preceding`, starting at i for `following`); at least `enough` of them nearest i when given."""
        chain = []
        while i is not None and (enough is None or len(chain) < enough):
            pairs_in_time = list(zip(fragments[i].frames, fragments[i].boxes))
            chain = chain + pairs_in_time if links is following else pairs_in_time + chain
            i = links.get(i)
        return chain

    def entry(i: int, j: int):
        """The heap entry of linking the chain ending at i to the chain starting at j, or None if too far."""
        end = sightings(i, preceding, 4)  # _velocity's span (3 steps): the four sightings nearest the gap
        start = sightings(j, following, 4)
        miss = _link_miss(_Fragment([f for f, _ in end], [b for _, b in end], []),
                          _Fragment([f for f, _ in start], [b for _, b in start], []))
        gap = fragments[j].frames[0] - fragments[i].frames[-1]
        if miss > _link_allowance(gap):
            return None
        return miss, gap, i, j, stamp[i], stamp[j]

    heap = [e for i in range(len(fragments)) for j in after[i] if (e := entry(i, j)) is not None]
    heapq.heapify(heap)
    while heap:
        _, gap, i, j, stamp_i, stamp_j = heapq.heappop(heap)
        if i in following or j in preceding or (stamp_i, stamp_j) != (stamp[i], stamp[j]):
            continue  # taken, or computed on chains that have grown since (re-entered if still in reach)
        if width is not None and (_leaves_frame(sightings(i, preceding), gap, width, height) or
                                  _leaves_frame(sightings(j, following)[::-1], gap, width, height)):
            continue
        following[i], preceding[j] = j, i
        head, tail = i, j  # the merged chain's first and last fragments
        while head in preceding:
            head = preceding[head]
        while tail in following:
            tail = following[tail]
        stamp[head] += 1
        stamp[tail] += 1
        for k in before[head]:  # chains that may end just before the merged one starts
            if k not in following and (e := entry(k, head)) is not None:
                heapq.heappush(heap, e)
        for k in after[tail]:
            if k not in preceding and (e := entry(tail, k)) is not None:
                heapq.heappush(heap, e)
    chains = []
    for i in range(len(fragments)):
        if i in preceding:
            continue
        chain = _Fragment([], [], [])
        while i is not None:
            fragment = fragments[i]
            chain.frames += fragment.frames
            chain.boxes += fragment.boxes
            chain.scores += fragment.scores
            i = following.get(i)
        chains.append(chain)
    return chains


class LiveRedactionPlanner:
    """Causal (no look-ahead): one call per frame as it arrives returns the boxes to redact on it now.

        planner = LiveRedactionPlanner(PlannerConfig(), width, height)
        boxes_xyxy = planner.update(frame_index, found.boxes_xyxy, found.scores, found.phrases)   # (N, 4)

    A track the detector loses is redacted where its velocity carries it for `extend_frames` frames (or until
    it is out of the frame, within `edge_frames`); a sighting boxed short of its track (width or height under
    `_SHORT` of the median of its earlier sightings clear of the edges) or cut by the frame edge also gets the
    box carried to its frame from the sightings before it. A weak detection cut by the frame edge is redacted at
    once, before its track is confirmed, and detections cut by the edge grow along it (`_along_edge`). What the
    detector has not yet seen cannot be redacted.
    """

    def __init__(self, config: PlannerConfig, width: int, height: int) -> None:
        self.config, self.width, self.height = config, width, height
        self._sightings = _Sightings(config, keep_last=_WINDOW)
        self._held: dict[int, list[list[np.ndarray]]] = {}  # track id -> per frame after its last sighting, boxes

    def update(self, frame_index: int, boxes_xyxy, scores, labels: Sequence[Hashable] | None = None) -> np.ndarray:
        strong, weak, update = self._sightings.add(frame_index, boxes_xyxy, scores, labels)
        sightings = self._sightings
        # A weak track is redacted from the frame it is confirmed on (live cannot go back to its first sightings);
        # a weak box cut by the frame edge at once: an object entering is cut off and scored low, and waiting for
        # its confirmation leaked its first frames in view. Detections cut by the edge grow along it (as offline).
        out = strong + [box for track_id, box in weak.items()
                        if sightings.confirmed(track_id) or _cut_sides(box, self.width, self.height).any()]
        out = [_along_edge(box, self.width, self.height) for box in out]
        for track_id, unseen in zip(update.ids.tolist(), update.frames_unseen.tolist()):
            if not sightings.confirmed(track_id):
                continue
            if unseen == 0:
                self._held.pop(track_id, None)
                # A sighting boxed short of the track's size (half hidden) or cut by the frame edge also gets
                # the box carried here from the sightings before it, as offline for a track's last sighting;
                # only then, since every live sighting is a track's last and a second box costs area.
                frames, boxes = sightings.frames[track_id], sightings.boxes[track_id]
                if len(frames) >= 2 and frames[-1] == frame_index:
                    now = boxes[-1]
                    before = list(zip(frames[:-1], boxes[:-1]))
                    clear = [b for _, b in before if not _cut_sides(b, self.width, self.height).any()]
                    sizes = np.array([b[2:] - b[:2] for b in (clear or [b for _, b in before])])
                    short = ((now[2:] - now[:2]) < _SHORT * np.median(sizes, axis=0)).any()
                    if short or _cut_sides(now, self.width, self.height).any():
                        frame, box, velocity = _end_motions(before, self.width, self.height)[0]
                        steps = frame_index - frame
                        if steps <= self.config.extend_frames:
                            out.append(_grown(box + velocity * steps, steps, self.config.growth,
                                              self.config.max_growth))
                continue
            if track_id not in self._held:
                frames, boxes = sightings.frames[track_id], sightings.boxes[track_id]
                # As offline: the motion fitted over the kept sightings, from the last one made whole and the
                # last one clear of the edges (a leaving object's cut box alone misses the rest of it).
                held: list[list[np.ndarray]] = []
                for _, box, velocity in _end_motions(list(zip(frames, boxes)), self.width, self.height):
                    for step, extra in enumerate(_extrapolation(box, velocity, self.width, self.height,
                                                                self.config)):
                        if step == len(held):
                            held.append([])
                        held[step].append(extra)
                self._held[track_id] = held
            held = self._held[track_id]
            if unseen <= len(held):
                out.extend(held[unseen - 1])
        for track_id in update.ended.tolist():
            self._held.pop(track_id, None)
            sightings.forget(track_id)
        return np.array(out, dtype=np.float64).reshape(-1, 4)
