"""A shapes-world video for the live redaction test and benchmark: an object to hide, an object to watch, and each
frame's index printed in the picture so any decoded picture (recording, clip, preview, snapshot) is matched to its
ground truth whatever the live stream dropped.

320x240 at 10 frames/s on a textured grey background. The red circle (the one to redact) glides back and forth
along the top (y 38..82); the blue square (the one watched) along the bottom half (y 128..172), so a crop around
the square never holds the circle. The index is a row of 16 x 12 px black/white blocks along the bottom edge
(y 226..238): a 1-0 start mark, 10 bits of the index (least significant first) and 2 bits of index mod 3.
"""

from __future__ import annotations

import cv2
import numpy as np

from gdino.shapes import COLOURS, _draw, _shape_box

WIDTH, HEIGHT, FPS = 320, 240, 10
EXTENT = 44.0
HIDDEN, WATCHED = "red circle", "blue square"
REDACT, PROMPT = "red circle .", "blue square ."
BLOCK_W, BLOCK_Y1, BLOCK_Y2, BLOCK_X0 = 12, 226, 238, 4
BITS = 10


def _triangle(t: float, period: float) -> float:
    phase = (t / period) % 1.0
    return 2 * phase if phase < 0.5 else 2 - 2 * phase


def centre(name: str, index: int) -> tuple[float, float]:
    t = index / FPS
    if name == HIDDEN:
        return 60.0 + 200.0 * _triangle(t, 8.0), 60.0
    return 80.0 + 160.0 * _triangle(t + 1.5, 6.0), 150.0


def truth(index: int) -> dict[str, tuple[float, float, float, float]]:
    """Ground-truth boxes (xyxy pixels, the pixels covered with alpha >= 0.5) of frame `index`."""
    return {name: _shape_box(name.split()[1], centre(name, index), EXTENT, 0.0) for name in (HIDDEN, WATCHED)}


def code_blocks(index: int) -> list[int]:
    return [1, 0] + [(index >> b) & 1 for b in range(BITS)] + [(index % 3) & 1, (index % 3) >> 1]


def read_index(picture_rgb: np.ndarray) -> int | None:
    """The frame index printed in a decoded picture, or None when the blocks are not there (a crop) or garbled."""
    if picture_rgb.shape[0] != HEIGHT or picture_rgb.shape[1] != WIDTH:
        return None
    grey = picture_rgb.astype(np.float32).mean(axis=2)
    bits = []
    for k in range(len(code_blocks(0))):
        x1 = BLOCK_X0 + k * BLOCK_W
        value = grey[BLOCK_Y1 + 3:BLOCK_Y2 - 3, x1 + 3:x1 + BLOCK_W - 3].mean()
        if 70 < value < 180:
            return None  # neither black nor white: not a code
        bits.append(int(value >= 128))
    index = sum(bit << b for b, bit in enumerate(bits[2:2 + BITS]))
    if bits[:2] != [1, 0] or bits[2 + BITS:] != code_blocks(index)[2 + BITS:]:
        return None
    return index


def render(frames: int, seed: int = 5) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    background = 120 + 10 * np.sin(xx / 23.0) * np.cos(yy / 17.0) + rng.normal(0, 3, (HEIGHT, WIDTH))
    background = np.clip(np.repeat(background[..., None], 3, axis=2), 0, 255).astype(np.uint8)
    out = np.empty((frames, HEIGHT, WIDTH, 3), np.uint8)
    for index in range(frames):
        canvas = background.copy()
        for name in (HIDDEN, WATCHED):
            colour, shape = name.split()
            _draw(canvas, shape, centre(name, index), EXTENT, 0.0, COLOURS[colour], True)
        for k, bit in enumerate(code_blocks(index)):
            x1 = BLOCK_X0 + k * BLOCK_W
            canvas[BLOCK_Y1:BLOCK_Y2, x1:x1 + BLOCK_W] = 235 if bit else 16
        out[index] = canvas
    return out


def redness(picture_rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32: how much redder than its other channels each pixel is (0 for grey, ~190 for the circle)."""
    picture = picture_rgb.astype(np.float32)
    return np.clip(picture[..., 0] - np.maximum(picture[..., 1], picture[..., 2]), 0, None)


PERIODS = {HIDDEN: int(8.0 * FPS), WATCHED: int(6.0 * FPS)}  # frames after which each object's path repeats


def sharpest_outline_anywhere(picture_rgb: np.ndarray, name: str = HIDDEN) -> float:
    """``outline_sharpness`` at every place object ``name`` ever is (its path repeats every ``PERIODS[name]``
    frames), the largest: for a picture whose index cannot be read (the redaction blurred the code too), the
    object's outline is hidden only if it is hidden wherever the object could be."""
    return max(outline_sharpness(picture_rgb, index, name) for index in range(PERIODS[name]))


def outline_sharpness(picture_rgb: np.ndarray, index: int, name: str = HIDDEN) -> float:
    """How sharp the outline of object `name` of frame `index` is in a decoded picture: the 90th percentile of
    the colour gradient (per pixel) on a 2 px band around the ground-truth outline. The raw object after two
    H.264 passes: ~40 and more; blurred away: a few units."""
    colour_of = redness if name == HIDDEN else (lambda p: np.clip(p[..., 2].astype(np.float32)
                                                                 - p[..., :2].astype(np.float32).max(axis=2), 0, None))
    channel = colour_of(picture_rgb)
    gx = cv2.Sobel(channel, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(channel, cv2.CV_32F, 0, 1, ksize=3) / 8
    magnitude = np.hypot(gx, gy)
    shape = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    _draw(shape, name.split()[1], centre(name, index), EXTENT, 0.0, (255, 255, 255), True)
    inside = shape[..., 0] >= 128
    band = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)) > cv2.erode(
        inside.astype(np.uint8), np.ones((5, 5), np.uint8))
    return float(np.percentile(magnitude[band], 90))
