"""A shapes-world video with known trajectories for the alerting end-to-end test (and its benchmark).

320x240 at 10 frames/s, a plain textured background and large saturated shapes the default model finds
reliably. Zone "pad" is the right part of the picture (x >= 200); line "gate" runs across the left part at
y = 120 (x 0..180), "in" = moving down. Anchors are box bottom centres.

What happens, by construction:
- red circle: walks into the pad (entry 1), stays 2 s (loiters once), walks out, comes back (entry 2), stays
  to the end (loiters again). Never near the line.
- blue square and green triangle: cross the gate downwards together (2 x in); the blue square later crosses
  back up (1 x out).
- yellow star: its anchor jitters 5 px above / below the gate every frame: no crossing. (At 8 px the tracker's
  constant-velocity prediction overshoots by 32 px and the star becomes a new track every other frame.)
- purple cross: its anchor jitters 8 px either side of the pad's edge every frame: no entry.
"""

from __future__ import annotations

import numpy as np

from gdino.shapes import COLOURS, _draw, _shape_box

WIDTH, HEIGHT, FPS, FRAMES = 320, 240, 10, 64
EXTENT = 44.0
PAD_X = 200.0
GATE_Y, GATE_X_END = 120.0, 180.0

ZONES_TOML = """
[[streams.zones]]
name = "pad"
polygon = [[0.625, 0.0], [1.0, 0.0], [1.0, 1.0], [0.625, 1.0]]
inertia = 3
loitering_seconds = 1.0

[[streams.lines]]
name = "gate"
start = [0.0, 0.5]
end = [0.5625, 0.5]
in_direction = "down"
min_frames = 2
"""

EXPECTED = {
    "pad_entered": [("red circle", 2)], "pad_left_walking": 1, "loitering": 2,
    "gate": {"blue square": {"in": 1, "out": 1}, "green triangle": {"in": 1, "out": 0}},
}


def _interp(keys: list[tuple[int, float]], frame: int) -> float:
    frames, values = zip(*keys)
    return float(np.interp(frame, frames, values))


def centre(name: str, frame: int) -> tuple[float, float]:
    """Each object's centre at a frame (pixels)."""
    half = EXTENT / 2
    if name == "red circle":  # anchor x: 120 -> 260 (in) -> 130 (out) -> 260 (in)
        return _interp([(0, 130), (10, 260), (30, 260), (38, 130), (44, 130), (52, 260)], frame), 30.0
    if name in ("blue square", "green triangle"):
        x = 40.0 if name == "blue square" else 100.0
        keys = [(0, 70), (6, 70), (14, 180), (64, 180)]  # anchor y 92 -> 202: across y = 120 going down
        if name == "blue square":
            keys = [(0, 70), (6, 70), (14, 180), (32, 180), (40, 70), (64, 70)]
        return x, _interp(keys, frame)
    if name == "yellow star":
        return 150.0, GATE_Y - half + (5.0 if frame % 2 else -5.0)
    if name == "purple cross":
        return PAD_X + (8.0 if frame % 2 else -8.0), 190.0 - half
    raise KeyError(name)


OBJECTS = ("red circle", "blue square", "green triangle", "yellow star", "purple cross")
PROMPT = "red circle . blue square . green triangle . yellow star . purple cross ."


def render() -> tuple[np.ndarray, list[dict[str, tuple[float, float, float, float]]]]:
    """(T, H, W, 3) uint8 RGB frames and the ground-truth boxes (xyxy pixels) per frame."""
    rng = np.random.default_rng(13)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    background = 120 + 10 * np.sin(xx / 23.0) * np.cos(yy / 17.0) + rng.normal(0, 3, (HEIGHT, WIDTH))
    background = np.clip(np.repeat(background[..., None], 3, axis=2), 0, 255).astype(np.uint8)
    frames = np.empty((FRAMES, HEIGHT, WIDTH, 3), np.uint8)
    truth = []
    for frame in range(FRAMES):
        canvas = background.copy()
        boxes = {}
        for name in OBJECTS:
            colour, shape = name.split()
            cx, cy = centre(name, frame)
            _draw(canvas, shape, (cx, cy), EXTENT, 0.0, COLOURS[colour], True)
            boxes[name] = _shape_box(shape, (cx, cy), EXTENT, 0.0)
        frames[frame] = canvas
        truth.append(boxes)
    return frames, truth
