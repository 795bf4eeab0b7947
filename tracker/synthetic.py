"""Seeded multi-object box sequences with ground truth, for the tracker's tests and benchmarks and the daemon's.

A scene is a set of labelled rectangles moving over a `width` x `height` frame with smoothly varying velocity.
Nearer objects (a fixed depth per object) hide farther ones; an object's visibility is the fraction of its box
that is inside the frame and not covered by a nearer object. Objects enter from the edges, leave, and some come
back later under the same ground-truth id. A simulated detector then reports each object that is visible
enough, except for a known fraction dropped at random, with jittered boxes and a score that falls with
visibility, plus false positives at random places.

Everything is drawn from one `numpy.random.Generator` seeded by `SceneConfig.seed`: same config, same scene.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class SceneConfig:
    """Parameters of a synthetic scene and of the simulated detector watching it."""

    num_frames: int = 300
    num_objects: int = 12
    """Distinct ground-truth objects over the whole sequence (re-entries keep their id)."""
    width: int = 1280
    height: int = 720
    min_size: float = 40.0
    """Shorter box side in pixels, drawn uniformly in [min_size, max_size]."""
    max_size: float = 160.0
    max_speed: float = 6.0
    """Pixels per frame."""
    acceleration: float = 0.15
    """Standard deviation of the per-frame velocity change, pixels/frame^2."""
    labels: tuple[str, ...] = ("person", "red car")
    initial_fraction: float = 0.5
    """Fraction of objects present at frame 0; the others enter from an edge at a random frame."""
    reenter_probability: float = 0.6
    """An object that leaves the frame comes back (same id) with this probability."""
    reenter_delay: tuple[int, int] = (5, 40)
    """Frames spent outside before coming back, drawn uniformly in this range."""
    crossing_pairs: int = 0
    """Extra pairs of objects placed to run into each other head-on at the same depth band."""
    min_visibility: float = 0.3
    """Objects less visible than this are neither in the ground truth nor detected."""
    drop_rate: float = 0.1
    """Probability that the detector misses a visible object on a frame (independent per object and frame)."""
    jitter: float = 0.03
    """Standard deviation of box-coordinate noise, relative to the box side."""
    false_positives_per_frame: float = 1.0
    """Mean of the Poisson number of spurious detections per frame."""
    false_positive_score: tuple[float, float] = (0.1, 0.65)
    turn_probability: float = 0.0
    """Per object and frame: probability of a sharp turn, the velocity rotated by 60 to 150 degrees at once."""
    stop_probability: float = 0.0
    """Per moving object and frame: probability of stopping dead for `stop_frames`, then starting again at once
    at 60-100 % of `max_speed` in a new direction (stop-and-go, sudden starts)."""
    stop_frames: tuple[int, int] = (5, 30)
    bounce: bool = False
    """Objects that have been inside bounce off the frame edges (the velocity component reflected) instead of
    leaving."""
    seed: int = 0


@dataclass(frozen=True, eq=False)
class SyntheticFrame:
    """One frame: ground truth and what the simulated detector reported."""

    frame_index: int
    gt_ids: np.ndarray  # (G,) int64, stable per object across leaving and re-entering
    gt_boxes_xyxy: np.ndarray  # (G, 4) float64, clipped to the frame
    gt_labels: list[str]
    gt_visibility: np.ndarray  # (G,) float64 in [min_visibility, 1]
    boxes_xyxy: np.ndarray  # (D, 4) float32 detections, clipped to the frame
    scores: np.ndarray  # (D,) float32 in [0, 1]
    labels: list[str]
    detection_gt_ids: np.ndarray  # (D,) int64, the object each detection came from, -1 for false positives


@dataclass(frozen=True, eq=False)
class SyntheticSequence:
    config: SceneConfig
    frames: tuple[SyntheticFrame, ...]

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)

    @property
    def missed_detections(self) -> int:
        """Ground-truth boxes with no detection (the dropped ones)."""
        return sum(
            int(np.setdiff1d(f.gt_ids, f.detection_gt_ids).shape[0]) for f in self.frames
        )

    @property
    def gt_box_count(self) -> int:
        return sum(int(f.gt_ids.shape[0]) for f in self.frames)


def _visibility(boxes_xyxy: np.ndarray, depth: np.ndarray, present: np.ndarray, width: int, height: int,
                grid: int = 8) -> np.ndarray:
    """Fraction of each box inside the frame and not covered by a nearer present box, on a grid x grid sample."""
    count = boxes_xyxy.shape[0]
    offsets = (np.arange(grid) + 0.5) / grid
    visibility = np.zeros(count)
    for i in np.flatnonzero(present):
        x1, y1, x2, y2 = boxes_xyxy[i]
        xs = x1 + (x2 - x1) * offsets
        ys = y1 + (y2 - y1) * offsets
        px, py = np.meshgrid(xs, ys)  # (grid, grid) sample points
        seen = (px >= 0) & (px < width) & (py >= 0) & (py < height)
        for j in np.flatnonzero(present & (depth < depth[i])):
            bx1, by1, bx2, by2 = boxes_xyxy[j]
            seen &= ~((px >= bx1) & (px <= bx2) & (py >= by1) & (py <= by2))
        visibility[i] = seen.mean()
    return visibility


def _entry_state(rng: np.random.Generator, config: SceneConfig, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A centre just outside a random edge and a velocity pointing into the frame."""
    speed = rng.uniform(0.4, 1.0) * config.max_speed
    edge = rng.integers(4)
    w, h = size
    if edge == 0:  # left
        centre = np.array([-w / 2, rng.uniform(h, config.height - h)])
        direction = np.array([1.0, rng.uniform(-0.5, 0.5)])
    elif edge == 1:  # right
        centre = np.array([config.width + w / 2, rng.uniform(h, config.height - h)])
        direction = np.array([-1.0, rng.uniform(-0.5, 0.5)])
    elif edge == 2:  # top
        centre = np.array([rng.uniform(w, config.width - w), -h / 2])
        direction = np.array([rng.uniform(-0.5, 0.5), 1.0])
    else:  # bottom
        centre = np.array([rng.uniform(w, config.width - w), config.height + h / 2])
        direction = np.array([rng.uniform(-0.5, 0.5), -1.0])
    return centre, direction / np.linalg.norm(direction) * speed


def generate(config: SceneConfig | None = None) -> SyntheticSequence:
    """Simulate a scene and a detector for `config.num_frames` frames; deterministic for a given config."""
    config = config if config is not None else SceneConfig()
    rng = np.random.default_rng(config.seed)
    total = config.num_objects + 2 * config.crossing_pairs

    short_side = rng.uniform(config.min_size, config.max_size, total)
    aspect = rng.uniform(0.5, 2.0, total)
    size = np.stack([short_side * np.maximum(aspect, 1.0), short_side * np.maximum(1.0 / aspect, 1.0)], axis=1)
    depth = rng.permutation(total).astype(np.float64)
    label_of = [config.labels[k] for k in rng.integers(len(config.labels), size=total)]
    centre = np.zeros((total, 2))
    velocity = np.zeros((total, 2))
    present = np.zeros(total, dtype=bool)
    enter_at = np.full(total, -1, dtype=np.int64)  # frame at which an absent object (re-)enters; -1 never

    for k in range(config.num_objects):
        if rng.random() < config.initial_fraction:
            present[k] = True
            centre[k] = [rng.uniform(size[k, 0], config.width - size[k, 0]),
                         rng.uniform(size[k, 1], config.height - size[k, 1])]
            angle = rng.uniform(0, 2 * np.pi)
            velocity[k] = rng.uniform(0.3, 1.0) * config.max_speed * np.array([np.cos(angle), np.sin(angle)])
        else:
            enter_at[k] = rng.integers(1, max(config.num_frames * 2 // 3, 2))
    for pair in range(config.crossing_pairs):
        a = config.num_objects + 2 * pair
        b = a + 1
        y = rng.uniform(0.2, 0.8) * config.height
        meet_frame = rng.uniform(0.2, 0.8) * config.num_frames
        speed = rng.uniform(0.5, 1.0) * config.max_speed
        meet_x = rng.uniform(0.3, 0.7) * config.width
        for k, sign in ((a, -1.0), (b, 1.0)):
            present[k] = True
            # Start where the head-on course reaches the meeting point at `meet_frame` (may start off-frame).
            centre[k] = [meet_x + sign * speed * meet_frame, y + rng.normal(0, size[k, 1] * 0.15)]
            velocity[k] = [-sign * speed, 0.0]
        depth[b] = depth[a] + 0.5

    frames = []
    ever_inside = np.zeros(total, dtype=bool)
    stopped_for = np.zeros(total, dtype=np.int64)  # frames left standing still (stop-and-go)
    for frame_index in range(config.num_frames):
        # Objects due to (re-)enter come in from an edge.
        for k in np.flatnonzero(~present & (enter_at == frame_index)):
            centre[k], velocity[k] = _entry_state(rng, config, size[k])
            present[k] = True
            enter_at[k] = -1

        half = size / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)  # (K, 4) xyxy, unclipped
        inside = (boxes[:, 2] > 0) & (boxes[:, 0] < config.width) & (boxes[:, 3] > 0) & (boxes[:, 1] < config.height)
        ever_inside |= present & inside
        visibility = _visibility(boxes, depth, present & inside, config.width, config.height)
        clipped = boxes.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, config.width)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, config.height)

        in_truth = present & inside & (visibility >= config.min_visibility)
        gt_index = np.flatnonzero(in_truth)

        detected = gt_index[rng.random(gt_index.shape[0]) >= config.drop_rate]
        sides = np.minimum(size[detected, 0], size[detected, 1])[:, None]
        det_boxes = clipped[detected] + rng.normal(0, 1, (detected.shape[0], 4)) * config.jitter * sides
        det_scores = np.clip(0.35 + 0.55 * visibility[detected] + rng.normal(0, 0.1, detected.shape[0]), 0, 1)
        det_labels = [label_of[k] for k in detected]
        det_ids = detected.astype(np.int64)

        fp_count = rng.poisson(config.false_positives_per_frame)
        if fp_count:
            fp_side = rng.uniform(config.min_size, config.max_size, (fp_count, 2))
            fp_corner = rng.uniform(0, 1, (fp_count, 2)) * (np.array([config.width, config.height]) - fp_side)
            fp_boxes = np.concatenate([fp_corner, fp_corner + fp_side], axis=1)
            fp_scores = rng.uniform(*config.false_positive_score, fp_count)
            det_boxes = np.concatenate([det_boxes, fp_boxes])
            det_scores = np.concatenate([det_scores, fp_scores])
            det_labels = det_labels + [config.labels[k] for k in rng.integers(len(config.labels), size=fp_count)]
            det_ids = np.concatenate([det_ids, np.full(fp_count, -1, dtype=np.int64)])
        det_boxes[:, [0, 2]] = det_boxes[:, [0, 2]].clip(0, config.width)
        det_boxes[:, [1, 3]] = det_boxes[:, [1, 3]].clip(0, config.height)
        # Shuffle so that the order of detections carries no identity information.
        order = rng.permutation(det_ids.shape[0])
        frames.append(SyntheticFrame(
            frame_index=frame_index,
            gt_ids=gt_index.astype(np.int64),
            gt_boxes_xyxy=clipped[gt_index],
            gt_labels=[label_of[k] for k in gt_index],
            gt_visibility=visibility[gt_index],
            boxes_xyxy=det_boxes[order].astype(np.float32),
            scores=det_scores[order].astype(np.float32),
            labels=[det_labels[k] for k in order],
            detection_gt_ids=det_ids[order],
        ))

        # Motion for the next frame: smooth random acceleration, speed capped.
        velocity += rng.normal(0, config.acceleration, velocity.shape)
        speed = np.linalg.norm(velocity, axis=1, keepdims=True)
        velocity *= np.minimum(1.0, config.max_speed / np.maximum(speed, 1e-9))
        # Manoeuvres draw from the generator only when enabled, so the other scenes stay bit for bit the same.
        if config.turn_probability > 0:
            for k in np.flatnonzero(rng.random(total) < config.turn_probability):
                angle = rng.uniform(np.pi / 3, np.pi * 5 / 6) * rng.choice((-1.0, 1.0))
                cos, sin = np.cos(angle), np.sin(angle)
                velocity[k] = [cos * velocity[k, 0] - sin * velocity[k, 1], sin * velocity[k, 0] + cos * velocity[k, 1]]
        if config.stop_probability > 0:
            starting = np.flatnonzero(stopped_for == 1)
            for k in starting:  # a sudden start: full speed at once, in a new direction
                angle = rng.uniform(0, 2 * np.pi)
                velocity[k] = rng.uniform(0.6, 1.0) * config.max_speed * np.array([np.cos(angle), np.sin(angle)])
            stopped_for = np.maximum(stopped_for - 1, 0)
            stopping = np.flatnonzero((stopped_for == 0) & present & ever_inside
                                      & (rng.random(total) < config.stop_probability))
            stopped_for[stopping] = rng.integers(config.stop_frames[0], config.stop_frames[1] + 1, stopping.shape[0])
            velocity[stopped_for > 0] = 0.0
        if config.bounce:
            half = size / 2
            for axis, limit in ((0, config.width), (1, config.height)):
                low = ever_inside & (centre[:, axis] - half[:, axis] < 0) & (velocity[:, axis] < 0)
                high = ever_inside & (centre[:, axis] + half[:, axis] > limit) & (velocity[:, axis] > 0)
                velocity[low | high, axis] *= -1.0
        centre += velocity * present[:, None]

        # Objects that were inside and are now wholly outside have left; some are scheduled to come back.
        half = size / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        outside = (boxes[:, 2] < 0) | (boxes[:, 0] > config.width) | (boxes[:, 3] < 0) | (boxes[:, 1] > config.height)
        for k in np.flatnonzero(present & outside & ever_inside):
            present[k] = False
            ever_inside[k] = False
            if rng.random() < config.reenter_probability:
                enter_at[k] = frame_index + 1 + rng.integers(config.reenter_delay[0], config.reenter_delay[1] + 1)

    return SyntheticSequence(config=config, frames=tuple(frames))


def crossing(seed: int = 0, **overrides) -> SceneConfig:
    """Few objects, several head-on crossings at similar depth: tests identity through overlap."""
    return replace(SceneConfig(num_objects=4, crossing_pairs=4, num_frames=200, seed=seed), **overrides)


def crowded(seed: int = 0, **overrides) -> SceneConfig:
    """Many objects, frequent occlusion, leaving and re-entering, noisy detector."""
    return replace(
        SceneConfig(num_objects=30, crossing_pairs=3, drop_rate=0.15, jitter=0.04, false_positives_per_frame=2.0,
                    seed=seed),
        **overrides,
    )


def turns(seed: int = 0, **overrides) -> SceneConfig:
    """Fast objects that turn sharply (60-150 degrees at once, every 25 frames on average) and bounce off the
    edges: what a constant-velocity prediction overshoots."""
    return replace(SceneConfig(num_objects=12, max_speed=10.0, turn_probability=0.04, bounce=True, seed=seed),
                   **overrides)


def stop_and_go(seed: int = 0, **overrides) -> SceneConfig:
    """Objects that stop dead for 5-30 frames and start again at full speed in a new direction."""
    return replace(SceneConfig(num_objects=12, max_speed=9.0, stop_probability=0.03, seed=seed), **overrides)


def bounces(seed: int = 0, **overrides) -> SceneConfig:
    """Fast objects in a small frame bouncing off its edges (cut by the edge as they turn), never leaving."""
    return replace(SceneConfig(num_objects=10, width=640, height=480, max_speed=12.0, min_size=30.0, max_size=100.0,
                               bounce=True, seed=seed), **overrides)


MANOEUVRE_SCENES = ("turns", "stop_and_go", "bounces")


def benchmark_scenes(seed: int = 0) -> dict[str, SceneConfig]:
    """The scenes the quality benchmark reports on, by name (`MANOEUVRE_SCENES` are the manoeuvring ones)."""
    return {
        "default": SceneConfig(seed=seed),
        "crossing": crossing(seed),
        "crowded": crowded(seed),
        "fast": SceneConfig(max_speed=14.0, min_size=30.0, max_size=90.0, num_objects=15, seed=seed),
        "noisy": SceneConfig(drop_rate=0.3, jitter=0.06, false_positives_per_frame=4.0, seed=seed),
        "turns": turns(seed),
        "stop_and_go": stop_and_go(seed),
        "bounces": bounces(seed),
    }
