"""The tracker: per-stream state, the compiled per-frame step, and the typed results it returns.

State lives in fixed-capacity NumPy arrays indexed by slot (struct of arrays), so one `update` is one call
into compiled code plus a handful of array slices; no Python object per track on the hot path. A slot is
recycled after its track ends; a track's public id is never recycled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Hashable, NamedTuple, Sequence

import numpy as np
from numba import njit

from tracker.config import TrackerConfig
from tracker.matching import match_weights


class TrackState(enum.IntEnum):
    """Lifecycle of a track. Only TRACKED and LOST tracks are reported; TENTATIVE ones have no id yet."""

    TENTATIVE = 1
    """Seen, but fewer than `min_hits` consecutive times."""
    TRACKED = 2
    """Confirmed and matched on this frame."""
    LOST = 3
    """Confirmed, not matched on this frame, kept for up to `max_age` unseen frames."""
    ENDED = 4
    """Removed; reported once, in the frame it ended."""


# Internal slot status values; the non-free ones equal TrackState.
_FREE = 0
_TENTATIVE = 1
_TRACKED = 2
_LOST = 3
_ENDED = 4  # ended this frame: its data must survive until the caller has read it, freed on the next step

# Event kinds written by the kernel.
_EVENT_STARTED = 0
_EVENT_UPDATED = 1
_EVENT_LOST = 2
_EVENT_ENDED = 3

# Indices into the counters array the kernel increments.
_COUNT_NONFINITE_BOX = 0
_COUNT_NONFINITE_SCORE = 1
_COUNT_ZERO_AREA = 2
_COUNT_INVERTED = 3
_COUNT_CLIPPED_SCORE = 4
_COUNTER_SLOTS = 5


class Track(NamedTuple):
    """One track as reported in a `TrackUpdate`."""

    id: int
    box_xyxy: tuple[float, float, float, float]
    """Latest detection box that the track took (xyxy pixels); for a LOST track, its last seen box."""
    score: float
    """Score of that detection, clipped to [0, 1]."""
    label: Hashable
    age: int
    """Frames since the track's first detection (0 on the frame it was first seen)."""
    hits: int
    """Frames on which the track was matched to a detection."""
    state: TrackState
    frames_unseen: int
    """Frames since the track was last matched (0 when TRACKED)."""


@dataclass(frozen=True, slots=True, eq=False)
class TrackUpdate:
    """What `Tracker.update` returns for one frame.

    Current tracks come as parallel arrays over the T confirmed tracks alive after this frame (in no
    particular order; `ids` tells them apart), and lifecycle events as arrays of track ids:
    - `started`: became confirmed on this frame (first report of the id);
    - `updated`: matched a detection on this frame (includes a LOST track coming back, excludes `started`);
    - `lost`: confirmed track not matched on this frame after being matched on the previous one;
    - `ended`: removed on this frame (unseen for more than `max_age` frames, or `Tracker.finish`). Ended
      tracks are not among the current tracks; their last state is in `ended_tracks`.
    """

    frame_index: int
    ids: np.ndarray  # (T,) int64
    boxes_xyxy: np.ndarray  # (T, 4) float64 xyxy pixels
    scores: np.ndarray  # (T,) float64 in [0, 1]
    labels: list  # T labels as given to `update` (str phrase or int class)
    ages: np.ndarray  # (T,) int64
    hits: np.ndarray  # (T,) int64
    states: np.ndarray  # (T,) int8, TrackState values (TRACKED or LOST)
    frames_unseen: np.ndarray  # (T,) int64
    detection_indices: np.ndarray  # (T,) int64 index into this frame's input, -1 when not matched
    started: np.ndarray  # (S,) int64 ids
    updated: np.ndarray  # (U,) int64 ids
    lost: np.ndarray  # (L,) int64 ids
    ended: np.ndarray  # (E,) int64 ids
    ended_tracks: tuple[Track, ...]
    dropped_detections: int
    """Detections of this frame dropped as invalid (see `Tracker.counters`)."""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def tracks(self) -> list[Track]:
        """The current tracks as records (built on each access; the arrays are the cheap view)."""
        return [
            Track(
                id=int(self.ids[k]),
                box_xyxy=tuple(float(v) for v in self.boxes_xyxy[k]),
                score=float(self.scores[k]),
                label=self.labels[k],
                age=int(self.ages[k]),
                hits=int(self.hits[k]),
                state=TrackState(int(self.states[k])),
                frames_unseen=int(self.frames_unseen[k]),
            )
            for k in range(len(self))
        ]

    @property
    def tracked(self) -> np.ndarray:
        """(T,) bool: which current tracks were matched on this frame."""
        return self.states == _TRACKED


@dataclass(frozen=True, slots=True)
class TrackerCounters:
    """Running totals for one stream since the tracker was built."""

    frames: int
    detections: int
    """Detections received (before dropping)."""
    dropped_nonfinite_box: int
    """NaN or infinite coordinate, or an area too large to represent."""
    dropped_nonfinite_score: int
    dropped_zero_area: int
    """Zero width or zero height."""
    dropped_inverted_box: int
    """x2 < x1 or y2 < y1."""
    clipped_scores: int
    """Finite scores outside [0, 1], clipped and kept."""
    out_of_order_frames: int
    """`frame_index` not above the previous one; treated as the next frame."""
    tracks_started: int
    tracks_ended: int

    @property
    def dropped(self) -> int:
        return (
            self.dropped_nonfinite_box
            + self.dropped_nonfinite_score
            + self.dropped_zero_area
            + self.dropped_inverted_box
        )


@njit(cache=True, nogil=True)
def _stage_weights(
    predicted_xyxy, track_labels, track_slots, track_count, boxes_xyxy, labels, det_indices, det_count,
    class_agnostic, buffer,
):
    """IoU between predicted track boxes and detection boxes for one stage, 0 across labels: (T, D).

    buffer > 0: buffered IoU (C-BIoU): each box first grown by `buffer` times its width and height on each side."""
    weights = np.zeros((track_count, det_count))
    for a in range(track_count):
        slot = track_slots[a]
        grow_x = buffer * (predicted_xyxy[slot, 2] - predicted_xyxy[slot, 0])
        grow_y = buffer * (predicted_xyxy[slot, 3] - predicted_xyxy[slot, 1])
        ax1 = predicted_xyxy[slot, 0] - grow_x
        ay1 = predicted_xyxy[slot, 1] - grow_y
        ax2 = predicted_xyxy[slot, 2] + grow_x
        ay2 = predicted_xyxy[slot, 3] + grow_y
        area_a = (ax2 - ax1) * (ay2 - ay1)
        label = track_labels[slot]
        for b in range(det_count):
            d = det_indices[b]
            if not class_agnostic and labels[d] != label:
                continue
            bw = boxes_xyxy[d, 2] - boxes_xyxy[d, 0]
            bh = boxes_xyxy[d, 3] - boxes_xyxy[d, 1]
            bx1 = boxes_xyxy[d, 0] - buffer * bw
            by1 = boxes_xyxy[d, 1] - buffer * bh
            bx2 = boxes_xyxy[d, 2] + buffer * bw
            by2 = boxes_xyxy[d, 3] + buffer * bh
            inter_w = min(ax2, bx2) - max(ax1, bx1)
            if inter_w <= 0.0:
                continue
            inter_h = min(ay2, by2) - max(ay1, by1)
            if inter_h <= 0.0:
                continue
            intersection = inter_w * inter_h
            area_b = (bx2 - bx1) * (by2 - by1)
            weights[a, b] = intersection / (area_a + area_b - intersection)
    return weights


# Motion models (TrackerConfig.motion).
_MOTION_VELOCITY = 0
_MOTION_KALMAN = 1


@njit(cache=True, nogil=True)
def _kalman_initiate(mean, cov, slot, box_xyxy, d, position_noise, velocity_noise):
    """Start the filter of `slot` at detection `d`: state (cx, cy, aspect, height, and their velocities), the
    uncertainty proportional to the box height as in ByteTrack's filter."""
    width = box_xyxy[d, 2] - box_xyxy[d, 0]
    height = box_xyxy[d, 3] - box_xyxy[d, 1]
    mean[slot, 0] = box_xyxy[d, 0] + width / 2
    mean[slot, 1] = box_xyxy[d, 1] + height / 2
    mean[slot, 2] = width / height
    mean[slot, 3] = height
    for i in range(4, 8):
        mean[slot, i] = 0.0
    for i in range(8):
        for j in range(8):
            cov[slot, i, j] = 0.0
    position = 2.0 * position_noise * height
    velocity = 10.0 * velocity_noise * height
    cov[slot, 0, 0] = position * position
    cov[slot, 1, 1] = position * position
    cov[slot, 2, 2] = 1e-4
    cov[slot, 3, 3] = position * position
    cov[slot, 4, 4] = velocity * velocity
    cov[slot, 5, 5] = velocity * velocity
    cov[slot, 6, 6] = 1e-10
    cov[slot, 7, 7] = velocity * velocity


@njit(cache=True, nogil=True)
def _kalman_predict(mean, cov, slot, steps, freeze_height, position_noise, velocity_noise, out_mean, out_cov):
    """`steps` constant-velocity steps of `slot`'s filter into out_mean[slot] (8,), out_cov[slot] (8, 8).

    Process noise scales with the box height (a big box's pixels move more). `freeze_height` zeroes the height
    velocity first, as ByteTrack does for a track it has lost, so an unseen box does not grow or vanish."""
    for i in range(8):
        out_mean[slot, i] = mean[slot, i]
        for j in range(8):
            out_cov[slot, i, j] = cov[slot, i, j]
    if freeze_height:
        out_mean[slot, 7] = 0.0
    for _ in range(steps):
        height = out_mean[slot, 3]
        for i in range(4):
            out_mean[slot, i] += out_mean[slot, i + 4]
        # P <- F P F^T with F = [[I, I], [0, I]]: rows then columns, i += i + 4.
        for i in range(4):
            for j in range(8):
                out_cov[slot, i, j] += out_cov[slot, i + 4, j]
        for j in range(4):
            for i in range(8):
                out_cov[slot, i, j] += out_cov[slot, i, j + 4]
        position = position_noise * height
        velocity = velocity_noise * height
        out_cov[slot, 0, 0] += position * position
        out_cov[slot, 1, 1] += position * position
        out_cov[slot, 2, 2] += 1e-4
        out_cov[slot, 3, 3] += position * position
        out_cov[slot, 4, 4] += velocity * velocity
        out_cov[slot, 5, 5] += velocity * velocity
        out_cov[slot, 6, 6] += 1e-10
        out_cov[slot, 7, 7] += velocity * velocity


@njit(cache=True, nogil=True)
def _kalman_update(predicted_mean, predicted_cov, slot, box_xyxy, d, position_noise, mean, cov):
    """Correct `slot`'s prediction with detection `d`; the result goes to mean[slot], cov[slot]."""
    width = box_xyxy[d, 2] - box_xyxy[d, 0]
    height = box_xyxy[d, 3] - box_xyxy[d, 1]
    measured = np.empty(4)
    measured[0] = box_xyxy[d, 0] + width / 2
    measured[1] = box_xyxy[d, 1] + height / 2
    measured[2] = width / height
    measured[3] = height
    noise = position_noise * predicted_mean[slot, 3]
    innovation_cov = np.empty((4, 4))  # S = H P H^T + R, the top-left block plus measurement noise
    for i in range(4):
        for j in range(4):
            innovation_cov[i, j] = predicted_cov[slot, i, j]
    innovation_cov[0, 0] += noise * noise
    innovation_cov[1, 1] += noise * noise
    innovation_cov[2, 2] += 1e-2
    innovation_cov[3, 3] += noise * noise
    cross = np.empty((8, 4))  # P H^T: the first four columns of P
    for i in range(8):
        for j in range(4):
            cross[i, j] = predicted_cov[slot, i, j]
    gain = np.linalg.solve(innovation_cov, cross.T).T  # (8, 4) K = P H^T S^-1 (S symmetric)
    residual = np.empty(4)
    for j in range(4):
        residual[j] = measured[j] - predicted_mean[slot, j]
    for i in range(8):
        value = predicted_mean[slot, i]
        for j in range(4):
            value += gain[i, j] * residual[j]
        mean[slot, i] = value
    # P <- P - K S K^T = P - K (P H^T)^T
    for i in range(8):
        for j in range(8):
            value = predicted_cov[slot, i, j]
            for k in range(4):
                value -= gain[i, k] * cross[j, k]
            cov[slot, i, j] = value


@njit(cache=True, nogil=True)
def _kalman_box(mean, slot, out, row):
    """The filter's box of `slot` as xyxy into out[row]."""
    height = mean[slot, 3]
    width = mean[slot, 2] * height
    out[row, 0] = mean[slot, 0] - width / 2
    out[row, 1] = mean[slot, 1] - height / 2
    out[row, 2] = mean[slot, 0] + width / 2
    out[row, 3] = mean[slot, 1] + height / 2


@njit(cache=True, nogil=True)
def _take_detection(
    slot, d, now, boxes_xyxy, scores, labels, track_box, track_velocity, track_label, track_score, track_hits,
    track_last_frame, track_detection, velocity_smoothing,
    motion, kalman_mean, kalman_cov, predicted_mean, predicted_cov, position_noise,
):
    if motion == _MOTION_KALMAN:
        _kalman_update(predicted_mean, predicted_cov, slot, boxes_xyxy, d, position_noise, kalman_mean, kalman_cov)
    gap = now - track_last_frame[slot]
    if gap < 1:
        gap = 1
    for c in range(4):
        measured = (boxes_xyxy[d, c] - track_box[slot, c]) / gap
        if track_hits[slot] == 1:
            track_velocity[slot, c] = measured
        else:
            track_velocity[slot, c] += velocity_smoothing * (measured - track_velocity[slot, c])
        track_box[slot, c] = boxes_xyxy[d, c]
    track_label[slot] = labels[d]
    track_score[slot] = scores[d]
    track_hits[slot] += 1
    track_last_frame[slot] = now
    track_detection[slot] = d


@njit(cache=True, nogil=True)
def _not_flagged(indices, count, flags):
    """The entries of `indices[:count]` whose `flags` entry is unset (detections no stage has taken, tracks no
    stage has matched): (indices, count)."""
    out = np.empty(count, dtype=np.int64)
    out_count = 0
    for i in range(count):
        if not flags[indices[i]]:
            out[out_count] = indices[i]
            out_count += 1
    return out, out_count


@njit(cache=True, nogil=True)
def _associate(track_boxes_xyxy, track_slots, track_count, det_indices, det_count, min_iou, buffer, state):
    """One association stage: the tracks `track_slots[:track_count]`, compared by IoU of their
    `track_boxes_xyxy` (the prediction, or the last observation), take the detections `det_indices[:det_count]`
    by optimal assignment at IoU >= min_iou. `state` is the frame's shared tuple built in `_step`; matched tracks
    and taken detections are marked in it."""
    (now, boxes_xyxy, scores, labels, track_box, track_velocity, track_label, track_score, track_hits,
     track_last_frame, track_detection, velocity_smoothing,
     motion, kalman_mean, kalman_cov, predicted_mean, predicted_cov, position_noise,
     class_agnostic, track_matched, detection_taken) = state
    if track_count == 0 or det_count == 0:
        return
    weights = _stage_weights(
        track_boxes_xyxy, track_label, track_slots, track_count, boxes_xyxy, labels, det_indices, det_count,
        class_agnostic, buffer,
    )
    assignment = match_weights(weights, min_iou)
    for a in range(track_count):
        b = assignment[a]
        if b >= 0:
            slot = track_slots[a]
            d = det_indices[b]
            _take_detection(
                slot, d, now, boxes_xyxy, scores, labels, track_box, track_velocity, track_label, track_score,
                track_hits, track_last_frame, track_detection, velocity_smoothing,
                motion, kalman_mean, kalman_cov, predicted_mean, predicted_cov, position_noise,
            )
            track_matched[slot] = True
            detection_taken[d] = True


@njit(cache=True, nogil=True)
def _step(
    boxes_xyxy, scores, labels, now,
    track_box, track_velocity, track_label, track_score, track_hits, track_first_frame, track_last_frame,
    track_status, track_id, track_detection, kalman_mean, kalman_cov,
    high_score, low_score, new_track_score, match_iou, low_match_iou, tentative_match_iou,
    min_hits, max_age, velocity_smoothing, max_predict_frames, class_agnostic, motion, position_noise, velocity_noise,
    recovery, recovery_iou, recovery_buffer, next_id, counters, event_kinds, event_slots, reported_slots,
):
    """Advance one stream by one frame. Detections: boxes (D, 4) xyxy, scores (D,), label codes (D,).

    Track arrays have one row per slot (capacity N >= occupied slots + D, ensured by the caller) and are
    updated in place. Writes events into `event_kinds`/`event_slots` and the confirmed slots alive after the
    frame into `reported_slots`; returns (next_id, event_count, reported_count, dropped_count).
    """
    capacity = track_status.shape[0]
    detection_count = boxes_xyxy.shape[0]

    for slot in range(capacity):
        if track_status[slot] == _ENDED:
            track_status[slot] = _FREE
        track_detection[slot] = -1

    # Validate detections and split them by score; invalid ones are counted and never looked at again.
    high = np.empty(detection_count, dtype=np.int64)
    low = np.empty(detection_count, dtype=np.int64)
    high_count = 0
    low_count = 0
    dropped = 0
    for d in range(detection_count):
        x1 = boxes_xyxy[d, 0]
        y1 = boxes_xyxy[d, 1]
        x2 = boxes_xyxy[d, 2]
        y2 = boxes_xyxy[d, 3]
        if not (np.isfinite(x1) and np.isfinite(y1) and np.isfinite(x2) and np.isfinite(y2)):
            counters[_COUNT_NONFINITE_BOX] += 1
            dropped += 1
            continue
        if x2 < x1 or y2 < y1:
            counters[_COUNT_INVERTED] += 1
            dropped += 1
            continue
        if x2 == x1 or y2 == y1:
            counters[_COUNT_ZERO_AREA] += 1
            dropped += 1
            continue
        if not np.isfinite((x2 - x1) * (y2 - y1)):
            counters[_COUNT_NONFINITE_BOX] += 1
            dropped += 1
            continue
        score = scores[d]
        if not np.isfinite(score):
            counters[_COUNT_NONFINITE_SCORE] += 1
            dropped += 1
            continue
        if score < 0.0 or score > 1.0:
            counters[_COUNT_CLIPPED_SCORE] += 1
            score = min(max(score, 0.0), 1.0)
            scores[d] = score
        if score >= high_score:
            high[high_count] = d
            high_count += 1
        elif score >= low_score:
            low[low_count] = d
            low_count += 1

    # Prediction (constant velocity, smoothed or Kalman-filtered); confirmed tracks are candidates for stage 1,
    # tentative ones for stage 3.
    predicted = np.empty((capacity, 4))
    kalman_rows = capacity if motion == _MOTION_KALMAN else 0
    predicted_mean = np.empty((kalman_rows, 8))
    predicted_cov = np.empty((kalman_rows, 8, 8))
    confirmed = np.empty(capacity, dtype=np.int64)
    tentative = np.empty(capacity, dtype=np.int64)
    confirmed_count = 0
    tentative_count = 0
    for slot in range(capacity):
        status = track_status[slot]
        if status == _FREE:
            continue
        steps = min(now - track_last_frame[slot], max_predict_frames)
        if motion == _MOTION_KALMAN:
            _kalman_predict(kalman_mean, kalman_cov, slot, steps, status == _LOST, position_noise, velocity_noise,
                            predicted_mean, predicted_cov)
            _kalman_box(predicted_mean, slot, predicted, slot)
        else:
            for c in range(4):
                predicted[slot, c] = track_box[slot, c] + track_velocity[slot, c] * steps
        # A shrinking box extrapolated too far would invert; keep at least the last size in that case.
        if predicted[slot, 2] <= predicted[slot, 0] or predicted[slot, 3] <= predicted[slot, 1]:
            for c in range(4):
                predicted[slot, c] = track_box[slot, c]
        if status == _TENTATIVE:
            tentative[tentative_count] = slot
            tentative_count += 1
        else:
            confirmed[confirmed_count] = slot
            confirmed_count += 1

    detection_taken = np.zeros(detection_count, dtype=np.bool_)
    track_matched = np.zeros(capacity, dtype=np.bool_)

    # Stage 1: high-confidence detections against every confirmed track (tracked or lost).
    state = (
        now, boxes_xyxy, scores, labels, track_box, track_velocity, track_label, track_score, track_hits,
        track_last_frame, track_detection, velocity_smoothing,
        motion, kalman_mean, kalman_cov, predicted_mean, predicted_cov, position_noise,
        class_agnostic, track_matched, detection_taken,
    )
    _associate(predicted, confirmed, confirmed_count, high, high_count, match_iou, 0.0, state)

    # Stage 2: low-confidence detections against tracks matched on the previous frame but not yet here.
    remaining = np.empty(confirmed_count, dtype=np.int64)
    remaining_count = 0
    for a in range(confirmed_count):
        slot = confirmed[a]
        if not track_matched[slot] and track_status[slot] == _TRACKED:
            remaining[remaining_count] = slot
            remaining_count += 1
    _associate(predicted, remaining, remaining_count, low, low_count, low_match_iou, 0.0, state)

    # Stage 2b, observation-centric recovery (OC-SORT's OCR): confirmed tracks still unmatched against the
    # high-confidence detections still free, by IoU with the track's last observed box instead of its
    # prediction. After a sharp turn, a stop or a bounce the prediction has flown the wrong way; where the
    # object was last seen has not. Both boxes are grown first (C-BIoU's buffered IoU): an object that turned
    # while unseen for a few frames is near its last box but no longer on it.
    if recovery:
        remaining, remaining_count = _not_flagged(confirmed, confirmed_count, track_matched)
        free, free_count = _not_flagged(high, high_count, detection_taken)
        _associate(track_box, remaining, remaining_count, free, free_count, recovery_iou, recovery_buffer, state)

    # Stage 3: leftover high-confidence detections against tentative tracks.
    leftover, leftover_count = _not_flagged(high, high_count, detection_taken)
    _associate(predicted, tentative, tentative_count, leftover, leftover_count, tentative_match_iou, 0.0, state)

    # Lifecycle of existing tracks.
    event_count = 0
    for slot in range(capacity):
        status = track_status[slot]
        if status == _FREE:
            continue
        if track_matched[slot]:
            if status == _TENTATIVE:
                if track_hits[slot] >= min_hits:
                    track_status[slot] = _TRACKED
                    track_id[slot] = next_id
                    next_id += 1
                    event_kinds[event_count] = _EVENT_STARTED
                    event_slots[event_count] = slot
                    event_count += 1
            else:
                track_status[slot] = _TRACKED
                event_kinds[event_count] = _EVENT_UPDATED
                event_slots[event_count] = slot
                event_count += 1
        elif status == _TENTATIVE:
            track_status[slot] = _FREE
        elif now - track_last_frame[slot] > max_age:
            track_status[slot] = _ENDED
            event_kinds[event_count] = _EVENT_ENDED
            event_slots[event_count] = slot
            event_count += 1
        elif status == _TRACKED:
            track_status[slot] = _LOST
            event_kinds[event_count] = _EVENT_LOST
            event_slots[event_count] = slot
            event_count += 1

    # New tentative tracks from unmatched confident detections, in free slots.
    free_cursor = 0
    for b in range(leftover_count):
        d = leftover[b]
        if detection_taken[d] or scores[d] < new_track_score:
            continue
        while track_status[free_cursor] != _FREE:
            free_cursor += 1
        slot = free_cursor
        for c in range(4):
            track_box[slot, c] = boxes_xyxy[d, c]
            track_velocity[slot, c] = 0.0
        if motion == _MOTION_KALMAN:
            _kalman_initiate(kalman_mean, kalman_cov, slot, boxes_xyxy, d, position_noise, velocity_noise)
        track_label[slot] = labels[d]
        track_score[slot] = scores[d]
        track_hits[slot] = 1
        track_first_frame[slot] = now
        track_last_frame[slot] = now
        track_detection[slot] = d
        track_id[slot] = -1
        if min_hits <= 1:
            track_status[slot] = _TRACKED
            track_id[slot] = next_id
            next_id += 1
            event_kinds[event_count] = _EVENT_STARTED
            event_slots[event_count] = slot
            event_count += 1
        else:
            track_status[slot] = _TENTATIVE

    reported_count = 0
    for slot in range(capacity):
        status = track_status[slot]
        if status == _TRACKED or status == _LOST:
            reported_slots[reported_count] = slot
            reported_count += 1
    return next_id, event_count, reported_count, dropped


_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_EMPTY_IDS.setflags(write=False)


class Tracker:
    """Multi-object IoU tracker for one stream (ByteTrack-style association, constant-velocity prediction).

    `update(boxes_xyxy, scores, labels, frame_index)` once per frame, in frame order; `finish()` when the
    stream stops or its prompt changes. Invalid detections (NaN/inf coordinates, inverted or zero-area boxes,
    NaN scores) are dropped and counted in `counters`; finite scores outside [0, 1] are clipped and counted.
    Not thread-safe: one tracker per stream, driven by one thread.
    """

    def __init__(self, config: TrackerConfig | None = None, *, initial_capacity: int = 64) -> None:
        self.config = config if config is not None else TrackerConfig()
        self._params = (
            float(self.config.high_score),
            float(self.config.low_score),
            float(self.config.new_track_score),
            float(self.config.match_iou),
            float(self.config.low_match_iou),
            float(self.config.tentative_match_iou),
            int(self.config.min_hits),
            int(self.config.max_age),
            float(self.config.velocity_smoothing),
            int(self.config.max_predict_frames),
            bool(self.config.class_agnostic),
            _MOTION_KALMAN if self.config.motion == "kalman" else _MOTION_VELOCITY,
            float(self.config.kalman_position_noise),
            float(self.config.kalman_velocity_noise),
            bool(self.config.recovery),
            float(self.config.recovery_iou),
            float(self.config.recovery_buffer),
        )
        self._allocate(max(int(initial_capacity), 1))
        self._next_id = 1
        self._clock = 0  # internal frame counter: strictly increasing even if frame indices are not
        self._last_frame_index: int | None = None
        self._code_of_label: dict[Hashable, int] = {}
        self._label_of_code: list[Hashable] = []
        self._counters = np.zeros(_COUNTER_SLOTS, dtype=np.int64)
        self._frames = 0
        self._detections = 0
        self._out_of_order = 0
        self._started = 0
        self._ended = 0

    # -- state arrays -------------------------------------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        self._box = np.zeros((capacity, 4))  # (N, 4) xyxy, last matched detection
        self._velocity = np.zeros((capacity, 4))  # (N, 4) xyxy per frame
        self._label = np.zeros(capacity, dtype=np.int64)
        self._score = np.zeros(capacity)
        self._hits = np.zeros(capacity, dtype=np.int64)
        self._first_frame = np.zeros(capacity, dtype=np.int64)
        self._last_frame = np.zeros(capacity, dtype=np.int64)
        self._status = np.zeros(capacity, dtype=np.int8)
        self._id = np.full(capacity, -1, dtype=np.int64)
        self._detection = np.full(capacity, -1, dtype=np.int64)
        self._kalman_mean = np.zeros((capacity, 8))  # (N, 8) cx, cy, aspect w/h, height and their velocities
        self._kalman_cov = np.zeros((capacity, 8, 8))
        self._event_kinds = np.zeros(capacity, dtype=np.int8)
        self._event_slots = np.zeros(capacity, dtype=np.int64)
        self._reported = np.zeros(capacity, dtype=np.int64)

    def _grow(self, needed: int) -> None:
        old = self._status.shape[0]
        capacity = old
        while capacity < needed:
            capacity *= 2
        arrays = (
            "_box", "_velocity", "_label", "_score", "_hits", "_first_frame", "_last_frame", "_status", "_id",
            "_detection", "_kalman_mean", "_kalman_cov",
        )
        saved = {name: getattr(self, name) for name in arrays}
        self._allocate(capacity)
        for name, values in saved.items():
            getattr(self, name)[:old] = values

    # -- input --------------------------------------------------------------------------------------------

    def _encode_labels(self, labels, count: int) -> np.ndarray:
        if labels is None:
            return np.full(count, self._code(None), dtype=np.int64)
        if isinstance(labels, np.ndarray) and labels.dtype.kind in "iub":
            values, inverse = np.unique(labels.reshape(-1), return_inverse=True)
            codes = np.array([self._code(v.item()) for v in values], dtype=np.int64)
            return codes[inverse]
        if isinstance(labels, (str, bytes)):
            raise ValueError("labels must be a sequence with one label per detection, not a single string")
        code_of = self._code_of_label
        codes = [code_of.get(label, -1) for label in labels]
        if -1 in codes:
            codes = [self._code(label) for label in labels]
        return np.array(codes, dtype=np.int64)

    def _code(self, label: Hashable) -> int:
        code = self._code_of_label.get(label)
        if code is None:
            code = len(self._label_of_code)
            self._code_of_label[label] = code
            self._label_of_code.append(label)
        return code

    # -- public -------------------------------------------------------------------------------------------

    def update(
        self,
        boxes_xyxy: np.ndarray | Sequence[Sequence[float]] | None,
        scores: np.ndarray | Sequence[float] | None,
        labels: np.ndarray | Sequence[Hashable] | None = None,
        frame_index: int | None = None,
    ) -> TrackUpdate:
        """Feed one frame's detections; returns the tracks and events after it.

        boxes_xyxy: (D, 4) pixels (any float dtype; an empty array or None for no detections).
        scores: (D,), or None for all 1. labels: D strings (grounded phrases) or ints, or None for one class.
        frame_index: the frame's index in the stream, or None for "the next one". Gaps age tracks by the gap.
        Raises ValueError only for mismatched shapes (a caller bug); bad values are dropped and counted.
        """
        boxes = np.asarray(boxes_xyxy if boxes_xyxy is not None else (), dtype=np.float64)
        if boxes.size == 0:
            boxes = np.zeros((0, 4))
        elif boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes_xyxy must have shape (D, 4), got {boxes.shape}")
        count = boxes.shape[0]
        if scores is None:
            score_values = np.ones(count)
        else:
            # A copy: the kernel clips scores in place.
            score_values = np.array(scores, dtype=np.float64).reshape(-1)
        if score_values.shape[0] != count:
            raise ValueError(f"got {count} boxes but {score_values.shape[0]} scores")
        label_codes = self._encode_labels(labels, count)
        if label_codes.shape[0] != count:
            raise ValueError(f"got {count} boxes but {label_codes.shape[0]} labels")
        if not boxes.flags.c_contiguous:
            boxes = np.ascontiguousarray(boxes)

        if frame_index is None:
            frame_index = 0 if self._last_frame_index is None else self._last_frame_index + 1
        frame_index = int(frame_index)
        if self._last_frame_index is None:
            self._clock += 1
        elif frame_index > self._last_frame_index:
            self._clock += frame_index - self._last_frame_index
        else:
            self._out_of_order += 1
            self._clock += 1
        self._last_frame_index = frame_index

        occupied = int(np.count_nonzero(self._status))
        if occupied + count > self._status.shape[0]:
            self._grow(occupied + count)

        next_id, event_count, reported_count, dropped = _step(
            boxes, score_values, label_codes, self._clock,
            self._box, self._velocity, self._label, self._score, self._hits, self._first_frame, self._last_frame,
            self._status, self._id, self._detection, self._kalman_mean, self._kalman_cov,
            *self._params,
            self._next_id, self._counters, self._event_kinds, self._event_slots, self._reported,
        )
        self._next_id = next_id
        self._frames += 1
        self._detections += count
        return self._build_update(frame_index, event_count, reported_count, dropped)

    def _build_update(self, frame_index: int, event_count: int, reported_count: int, dropped: int) -> TrackUpdate:
        slots = self._reported[:reported_count]
        ids = self._id[slots]
        label_of_code = self._label_of_code
        labels = [label_of_code[code] for code in self._label[slots].tolist()]

        started = updated = lost = ended = _EMPTY_IDS
        ended_tracks: tuple[Track, ...] = ()
        if event_count:
            kinds = self._event_kinds[:event_count]
            event_slots = self._event_slots[:event_count]
            event_ids = self._id[event_slots]
            started = event_ids[kinds == _EVENT_STARTED]
            updated = event_ids[kinds == _EVENT_UPDATED]
            lost = event_ids[kinds == _EVENT_LOST]
            ended_slots = event_slots[kinds == _EVENT_ENDED]
            ended = self._id[ended_slots]
            if ended_slots.shape[0]:
                ended_tracks = tuple(self._record(int(slot), TrackState.ENDED) for slot in ended_slots)
            self._started += int(started.shape[0])
            self._ended += int(ended.shape[0])

        return TrackUpdate(
            frame_index=frame_index,
            ids=ids,
            boxes_xyxy=self._box[slots],
            scores=self._score[slots],
            labels=labels,
            ages=self._clock - self._first_frame[slots],
            hits=self._hits[slots],
            states=self._status[slots],
            frames_unseen=self._clock - self._last_frame[slots],
            detection_indices=self._detection[slots],
            started=started,
            updated=updated,
            lost=lost,
            ended=ended,
            ended_tracks=ended_tracks,
            dropped_detections=int(dropped),
        )

    def _record(self, slot: int, state: TrackState) -> Track:
        return Track(
            id=int(self._id[slot]),
            box_xyxy=tuple(float(v) for v in self._box[slot]),
            score=float(self._score[slot]),
            label=self._label_of_code[int(self._label[slot])],
            age=int(self._clock - self._first_frame[slot]),
            hits=int(self._hits[slot]),
            state=state,
            frames_unseen=int(self._clock - self._last_frame[slot]),
        )

    def finish(self, frame_index: int | None = None, labels=None) -> TrackUpdate:
        """End every track (or, with `labels`, only the tracks of those labels): `ended` for each confirmed
        one, tentative ones dropped silently.

        Call when the stream stops or its prompt changes (a prompt that keeps a phrase keeps that phrase's
        tracks: pass the labels that left). The tracker stays usable; ids keep counting up.
        """
        if frame_index is None:
            frame_index = self._last_frame_index if self._last_frame_index is not None else 0
        chosen = np.ones(self._status.shape[0], dtype=bool)
        if labels is not None:
            codes = [self._code_of_label[label] for label in labels if label in self._code_of_label]
            chosen = np.isin(self._label, np.array(codes, dtype=np.int64))
        confirmed = np.flatnonzero(((self._status == _TRACKED) | (self._status == _LOST)) & chosen)
        ended_tracks = tuple(self._record(int(slot), TrackState.ENDED) for slot in confirmed)
        ended = self._id[confirmed]
        self._status[chosen] = _FREE
        self._detection[chosen] = -1
        self._ended += int(ended.shape[0])
        empty_boxes = np.zeros((0, 4))
        return TrackUpdate(
            frame_index=int(frame_index),
            ids=_EMPTY_IDS,
            boxes_xyxy=empty_boxes,
            scores=np.zeros(0),
            labels=[],
            ages=_EMPTY_IDS,
            hits=_EMPTY_IDS,
            states=np.zeros(0, dtype=np.int8),
            frames_unseen=_EMPTY_IDS,
            detection_indices=_EMPTY_IDS,
            started=_EMPTY_IDS,
            updated=_EMPTY_IDS,
            lost=_EMPTY_IDS,
            ended=ended,
            ended_tracks=ended_tracks,
            dropped_detections=0,
        )

    @property
    def counters(self) -> TrackerCounters:
        c = self._counters
        return TrackerCounters(
            frames=self._frames,
            detections=self._detections,
            dropped_nonfinite_box=int(c[_COUNT_NONFINITE_BOX]),
            dropped_nonfinite_score=int(c[_COUNT_NONFINITE_SCORE]),
            dropped_zero_area=int(c[_COUNT_ZERO_AREA]),
            dropped_inverted_box=int(c[_COUNT_INVERTED]),
            clipped_scores=int(c[_COUNT_CLIPPED_SCORE]),
            out_of_order_frames=self._out_of_order,
            tracks_started=self._started,
            tracks_ended=self._ended,
        )

    @property
    def labels(self) -> list:
        """Every label the tracker has seen, in first-seen order."""
        return list(self._label_of_code)

    @property
    def active_count(self) -> int:
        """Confirmed tracks alive (TRACKED or LOST)."""
        return int(np.count_nonzero((self._status == _TRACKED) | (self._status == _LOST)))


def warm_up() -> None:
    """Compile (or load from the Numba cache) every kernel, so the first real frame is not slow."""
    tracker = Tracker(TrackerConfig())
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    for frame in range(3):
        tracker.update(boxes + frame, np.array([0.9, 0.3]), ["a", "a"], frame)
    tracker.finish()
