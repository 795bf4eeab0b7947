"""The shapes world: seeded, procedurally generated scenes and videos with ground truth and prompts.

Objects are one of six shapes in one of ten named colours and three size classes, drawn anti-aliased on a
textured background with desaturated clutter (grey and beige blobs, hexagons and lines that no prompt names).
Every image, video and prompt is a pure function of its seed, so a training run, a held-out set and the
daemon's demo video can all be regenerated bit for bit.

Ground truth boxes are COCO boxes in ``xyxy`` form: the tight box of the pixels the object covers with
alpha >= 0.5 after anti-aliasing, pixel ``i`` spanning ``[i, i + 1)``, so ``x2 = x1 + width`` and both are whole
numbers (``pixel_box``). Shape geometry (``center``, ``extent``) is in OpenCV's convention, pixel ``i``'s centre
at ``i``; the box is measured on the rendered coverage, never derived from the geometry, so the two conventions
cannot drift apart. An object's ``category`` is "<colour> <shape>" ("red circle"), its ``phrase`` the full
description "<size> <colour> <shape>" ("small blue star").

Seeds: training code draws scene seeds below ``EVAL_SEED_OFFSET``; held-out sets use seeds at or above it, so a
held-out scene is never a training scene. The compositional split holds the colour-shape pairs of
``HELD_OUT_PAIRS`` out of training scenes and prompts entirely (every colour and every shape is still seen,
just never in those combinations).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import cv2
import numpy as np

from gdino.boxes import iou_matrix

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")

# Saturated, mutually distinct RGB colours. Backgrounds and clutter stay desaturated and mid-toned, so every
# named colour (white and black included) stands out from them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "cyan": (0, 210, 225),
    "blue": (30, 60, 230),
    "purple": (135, 35, 200),
    "pink": (255, 110, 190),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}

# Size classes as a fraction of min(H, W): the extent (diameter / side) of the shape. The gaps between the
# classes keep "small", "medium" and "large" unambiguous.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.08, 0.11),
    "medium": (0.15, 0.19),
    "large": (0.24, 0.29),
}

# Colour-shape pairs never shown in training (one per shape, each with a different colour).
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("purple", "star"),
    ("orange", "circle"),
    ("cyan", "square"),
    ("pink", "triangle"),
    ("green", "ring"),
    ("yellow", "cross"),
})

SPLITS = ("train", "all", "compositional")

# Held-out sets use seeds >= this; training draws its seeds below it.
EVAL_SEED_OFFSET = 10**12


def categories(split: str = "all") -> list[str]:
    """Category names ("red circle") of a split: ``train`` excludes HELD_OUT_PAIRS, ``compositional`` is only
    them, ``all`` is every pair."""
    pairs = _pairs(split)
    return [f"{colour} {shape}" for colour, shape in pairs]


def _pairs(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    every = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    if split == "train":
        return [p for p in every if p not in HELD_OUT_PAIRS]
    if split == "compositional":
        return [p for p in every if p in HELD_OUT_PAIRS]
    return every


@dataclass
class ShapeObject:
    shape: str
    colour: str
    size: str
    box_xyxy: tuple[float, float, float, float]  # pixels, clipped to the image
    center: tuple[float, float] = (0.0, 0.0)  # x, y pixels (may lie outside the image in videos)
    extent: float = 0.0  # pixels: diameter / side of the shape
    angle: float = 0.0  # degrees
    track_id: int = -1  # videos only
    visibility: float = 1.0  # fraction of the shape's pixels visible (occlusion and frame edges)

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["category"] = self.category
        out["phrase"] = self.phrase
        return out


@dataclass
class FrameTruth:
    """Ground truth of one video frame, as arrays and as the objects they come from."""

    frame_index: int
    boxes_xyxy: np.ndarray  # (N, 4) float32 pixels
    track_ids: np.ndarray  # (N,) int64
    visibility: np.ndarray  # (N,) float32
    categories: list[str]
    phrases: list[str]
    objects: list[ShapeObject] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def _shape_polygon(shape: str, center: tuple[float, float], extent: float, angle: float) -> np.ndarray | None:
    """Outline of a polygonal shape, (K, 2) float x,y pixels; None for circle and ring."""
    cx, cy = center
    r = extent / 2.0
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * (r * 0.82)
    elif shape == "triangle":
        k = np.arange(3) * 2 * np.pi / 3 - np.pi / 2
        pts = np.stack([np.cos(k), np.sin(k)], 1) * r
        pts[:, 1] += r * 0.2  # centre the triangle's box on the centre
    elif shape == "star":
        k = np.arange(10) * np.pi / 5 - np.pi / 2
        radius = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        pts = np.stack([np.cos(k) * radius, np.sin(k) * radius], 1)
    elif shape == "cross":
        a, b = r, r * 0.34
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                        [-a, -b], [-b, -b]], np.float64)
    elif shape == "hexagon":  # clutter only
        k = np.arange(6) * np.pi / 3
        pts = np.stack([np.cos(k), np.sin(k)], 1) * r
    elif shape == "pentagon":  # clutter only
        k = np.arange(5) * 2 * np.pi / 5 - np.pi / 2
        pts = np.stack([np.cos(k), np.sin(k)], 1) * r
    elif shape == "bar":  # clutter only: a long thin rectangle
        pts = np.array([[-1, -0.18], [1, -0.18], [1, 0.18], [-1, 0.18]], np.float64) * r
    else:
        return None
    theta = math.radians(angle)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return pts @ rot.T + np.array([cx, cy])


_SHIFT = 4  # cv2 sub-pixel bits: coordinates are drawn at 1/16 pixel precision
_SCALE = 1 << _SHIFT


def _draw(canvas: np.ndarray, shape: str, center, extent: float, angle: float, colour, anti_alias: bool,
          thickness_scale: int = 1) -> None:
    """Draw one shape onto ``canvas`` (H, W, C) in place with OpenCV (clutter; objects go through ``paint``).
    ``thickness_scale``: the canvas is that many times finer than the frame (a ring keeps its frame thickness)."""
    line = cv2.LINE_AA if anti_alias else cv2.LINE_8
    colour = tuple(int(c) for c in colour)
    cx, cy = center
    if shape in ("circle", "ring"):
        c = (int(round(cx * _SCALE)), int(round(cy * _SCALE)))
        r = extent / 2.0
        if shape == "circle":
            cv2.circle(canvas, c, int(round(r * _SCALE)), colour, -1, line, _SHIFT)
        else:
            thickness = max(2, int(round(r / thickness_scale * 0.38))) * thickness_scale
            mid = r - thickness / 2.0
            cv2.circle(canvas, c, int(round(mid * _SCALE)), colour, thickness, line, _SHIFT)
        return
    pts = _shape_polygon(shape, center, extent, angle)
    cv2.fillPoly(canvas, [np.round(pts * _SCALE).astype(np.int32)], colour, line, _SHIFT)


def _shape_box(shape: str, center, extent: float, angle: float) -> tuple[float, float, float, float]:
    """Unclipped tight box xyxy of a shape, pixels."""
    pts = _shape_polygon(shape, center, extent, angle)
    if pts is None:
        r = extent / 2.0
        return (center[0] - r, center[1] - r, center[0] + r, center[1] + r)
    return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


_SUPERSAMPLE = 8  # coverage is measured on an 8x8 grid of sub-pixels per pixel


def coverage(shape: str, center, extent: float, angle: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage of one shape on an (H, W) frame: uint8, 255 = fully covered.

    OpenCV's own anti-aliasing (``LINE_AA``) smears polygon edges about a pixel outwards and snaps them, so the
    drawn shape is neither where its geometry says nor sub-pixel exact. Coverage is instead the fraction of an
    8x8 grid of sub-pixels inside the shape, drawn without anti-aliasing at 8x on a crop around the shape: a
    straight edge at x covers pixel i (spanning [i - 0.5, i + 0.5] in OpenCV's convention) by its true overlap.
    """
    out = np.zeros((height, width), np.uint8)
    bx1, by1, bx2, by2 = _shape_box(shape, center, extent, angle)
    x0, y0 = max(int(math.floor(bx1)) - 2, 0), max(int(math.floor(by1)) - 2, 0)
    x1, y1 = min(int(math.ceil(bx2)) + 3, width), min(int(math.ceil(by2)) + 3, height)
    if x1 <= x0 or y1 <= y0:
        return out
    scale = _SUPERSAMPLE
    fine = np.zeros(((y1 - y0) * scale, (x1 - x0) * scale), np.uint8)
    # Sub-pixel u of the crop has its centre at x0 - 0.5 + (u + 0.5) / scale in frame coordinates.
    fine_center = ((center[0] - x0 + 0.5) * scale - 0.5, (center[1] - y0 + 0.5) * scale - 0.5)
    _draw(fine, shape, fine_center, extent * scale, angle, (1,), False, thickness_scale=scale)
    block = fine.reshape(y1 - y0, scale, x1 - x0, scale).sum(axis=(1, 3), dtype=np.int32)
    out[y0:y1, x0:x1] = np.round(block * (255.0 / (scale * scale))).astype(np.uint8)
    return out


def paint(canvas: np.ndarray, shape: str, center, extent: float, angle: float, colour) -> np.ndarray:
    """Blend one shape in ``colour`` onto ``canvas`` (H, W, 3) uint8 in place by its coverage; returns the
    coverage (H, W) uint8."""
    alpha_u8 = coverage(shape, center, extent, angle, canvas.shape[0], canvas.shape[1])
    rows, cols = np.nonzero(alpha_u8)
    if rows.size:
        alpha = alpha_u8[rows, cols, None].astype(np.float32) / 255.0
        pixels = canvas[rows, cols].astype(np.float32)
        blended = pixels + (np.asarray(colour, np.float32) - pixels) * alpha
        canvas[rows, cols] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return alpha_u8


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """COCO box xyxy of the True pixels of an (H, W) bool mask (x2 = last column + 1); None when empty."""
    columns = np.flatnonzero(mask.any(axis=0))
    if columns.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return (float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1))


def pixel_box(shape: str, center, extent: float, angle: float, height: int, width: int
              ) -> tuple[float, float, float, float] | None:
    """The ground-truth box: tight COCO box of the pixels with coverage >= 0.5, within the frame."""
    return mask_box(coverage(shape, center, extent, angle, height, width) >= 128)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A desaturated, mid-toned textured background (H, W, 3) uint8."""
    base = rng.uniform(80, 170)
    tint = rng.uniform(-18, 18, size=3)  # a slight cast, never a named colour
    cells = int(rng.integers(3, 10))
    noise = rng.normal(0, 1, size=(cells, cells, 1)).astype(np.float32)
    low = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)[..., None]
    img = base + tint + low * rng.uniform(10, 30)
    kind = rng.integers(0, 4)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 1:  # stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 30)
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        img = img + (wave * rng.uniform(6, 18))[..., None]
    elif kind == 2:  # checker
        cell = rng.uniform(8, 40)
        checker = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * 2 - 1
        img = img + (checker * rng.uniform(5, 15))[..., None]
    grain = rng.normal(0, rng.uniform(2, 8), size=(height, width, 1)).astype(np.float32)
    img = img + grain
    return np.clip(img, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, img: np.ndarray, amount: float) -> None:
    """Desaturated distractors that no prompt names: blobs, hexagons, lines (in place)."""
    height, width = img.shape[:2]
    side = min(height, width)
    count = int(rng.poisson(amount * 6))
    for _ in range(count):
        grey = rng.uniform(60, 200)
        colour = np.clip(grey + rng.uniform(-20, 20, size=3), 0, 255)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        extent = side * rng.uniform(0.05, 0.25)
        kind = rng.integers(0, 4)
        if kind == 0:
            axes = (int(extent / 2), int(extent / 2 * rng.uniform(0.3, 1.0)))
            cv2.ellipse(img, (int(x), int(y)), axes, float(rng.uniform(0, 180)), 0, 360,
                        tuple(float(c) for c in colour), -1, cv2.LINE_AA)
        elif kind == 1:
            _draw(img, "hexagon", (x, y), extent, rng.uniform(0, 60), colour, True)
        else:
            x2, y2 = x + rng.uniform(-1, 1) * side * 0.4, y + rng.uniform(-1, 1) * side * 0.4
            cv2.line(img, (int(x), int(y)), (int(x2), int(y2)), tuple(float(c) for c in colour),
                     int(rng.integers(1, 4)), cv2.LINE_AA)


def _object_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    return np.clip(np.array(COLOURS[name], np.float64) + rng.uniform(-12, 12, size=3), 0, 255)


def _sample_pair(rng: np.random.Generator, pairs: Sequence[tuple[str, str]]) -> tuple[str, str]:
    return pairs[int(rng.integers(len(pairs)))]


def _sample_extent(rng: np.random.Generator, size_name: str, side: int) -> float:
    lo, hi = SIZES[size_name]
    return float(rng.uniform(lo, hi) * side)


def _overlaps_at_most(box_xyxy, objects, max_iou: float) -> bool:
    """Whether ``box_xyxy`` overlaps every placed object by at most ``max_iou``."""
    return not objects or bool((iou_matrix([box_xyxy], [o.box_xyxy for o in objects]) <= max_iou).all())


# ---------------------------------------------------------------------------------------------------------------
# Still scenes


def render_scene(
    seed: int,
    size: tuple[int, int] = (256, 256),
    *,
    split: str = "train",
    num_objects: int | tuple[int, int] = (1, 6),
    clutter: float = 1.0,
    max_overlap: float = 0.1,
) -> tuple[np.ndarray, list[ShapeObject]]:
    """One still scene.

    Returns ``image`` (H, W, 3) uint8 RGB and its objects (boxes xyxy pixels), in drawing order (later objects
    on top; ``max_overlap`` bounds the IoU between any two boxes, so each object stays mostly visible).
    ``split`` picks the colour-shape pairs (see ``categories``); ``num_objects`` an exact count or an inclusive
    range; ``clutter`` scales the number of unnamed distractors (0: none).
    """
    rng = np.random.default_rng(seed)
    height, width = size
    side = min(height, width)
    pairs = _pairs(split)
    if isinstance(num_objects, int):
        count = num_objects
    else:
        count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    img = _background(rng, height, width)
    if clutter > 0:
        _clutter(rng, img, clutter)
    objects: list[ShapeObject] = []
    for _ in range(count):
        colour, shape = _sample_pair(rng, pairs)
        size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
        for _attempt in range(30):
            extent = _sample_extent(rng, size_name, side)
            angle = float(rng.uniform(-30, 30)) if shape not in ("circle", "ring") else 0.0
            margin = extent / 2 + 1
            center = (float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin)))
            box = _shape_box(shape, center, extent, angle)
            if _overlaps_at_most(box, objects, max_overlap):
                break
        else:
            continue  # no room left: the scene gets fewer objects
        truth_box = mask_box(paint(img, shape, center, extent, angle, _object_colour(rng, colour)) >= 128)
        if truth_box is not None:
            objects.append(ShapeObject(shape, colour, size_name, truth_box, center, extent, angle))
    return img, objects


# ---------------------------------------------------------------------------------------------------------------
# Videos


@dataclass
class _Mover:
    obj: ShapeObject
    rgb: np.ndarray
    velocity: tuple[float, float]  # pixels per frame
    spin: float  # degrees per frame
    start: int  # first frame it exists
    z: float  # drawing order: higher is on top


def _spawn_outside(rng, width, height, extent, speed):
    """A position just outside a random edge and a velocity pointing into the frame."""
    edge = int(rng.integers(4))
    r = extent / 2 + 1
    target = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height])
    if edge == 0:
        pos = np.array([-r, rng.uniform(0, height)])
    elif edge == 1:
        pos = np.array([width + r, rng.uniform(0, height)])
    elif edge == 2:
        pos = np.array([rng.uniform(0, width), -r])
    else:
        pos = np.array([rng.uniform(0, width), height + r])
    direction = target - pos
    direction /= np.linalg.norm(direction) + 1e-9
    return pos, direction * speed


def _visible_fraction(masks_above: np.ndarray, mask: np.ndarray, full_area: float) -> float:
    visible = np.count_nonzero(mask & ~masks_above)
    return float(visible / full_area) if full_area > 0 else 0.0


def iter_video(
    seed: int,
    num_frames: int,
    size: tuple[int, int] = (240, 320),
    fps: float = 10.0,
    *,
    split: str = "train",
    initial_objects: int | tuple[int, int] = (2, 4),
    entries_per_second: float = 0.4,
    clutter: float = 0.6,
    min_visibility: float = 0.0,
) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    """Frames and ground truth of a shapes video, one at a time (see ``render_video``)."""
    rng = np.random.default_rng(seed)
    height, width = size
    side = min(height, width)
    pairs = _pairs(split)
    background = _background(rng, height, width)
    if clutter > 0:
        _clutter(rng, background, clutter)
    size_names = list(SIZES)

    def new_mover(start: int, inside: bool, track_id: int) -> _Mover:
        colour, shape = _sample_pair(rng, pairs)
        size_name = size_names[int(rng.integers(len(size_names)))]
        extent = _sample_extent(rng, size_name, side)
        speed = rng.uniform(0.02, 0.08) * side * 10.0 / fps  # 2-8 % of the frame per 0.1 s
        if inside:
            margin = extent / 2 + 1
            pos = np.array([rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)])
            heading = rng.uniform(0, 2 * np.pi)
            vel = np.array([math.cos(heading), math.sin(heading)]) * speed
        else:
            pos, vel = _spawn_outside(rng, width, height, extent, speed)
        angle = float(rng.uniform(-30, 30)) if shape not in ("circle", "ring") else 0.0
        spin = float(rng.uniform(-3, 3)) * 10.0 / fps if shape not in ("circle", "ring") else 0.0
        obj = ShapeObject(shape, colour, size_name, (0, 0, 0, 0), (float(pos[0]), float(pos[1])), extent, angle,
                          track_id=track_id)
        return _Mover(obj, _object_colour(rng, colour), (float(vel[0]), float(vel[1])), spin, start,
                      float(rng.uniform()))

    if isinstance(initial_objects, int):
        initial = initial_objects
    else:
        initial = int(rng.integers(initial_objects[0], initial_objects[1] + 1))
    movers: list[_Mover] = []
    next_id = 1
    for _ in range(initial):
        movers.append(new_mover(0, True, next_id))
        next_id += 1
    # One guaranteed crossing: two objects on a collision course through the middle, meeting after ~1/3 of
    # the video, at different depths so one occludes the other.
    if num_frames >= 6:
        meet = max(3, num_frames // 3)
        mid = np.array([rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height])
        heading = rng.uniform(0, np.pi)
        for sign in (-1.0, 1.0):
            mover = new_mover(0, True, next_id)
            next_id += 1
            speed = math.hypot(*mover.velocity)
            direction = np.array([math.cos(heading), math.sin(heading)]) * sign
            start_pos = mid - direction * speed * meet
            mover.velocity = (float(direction[0] * speed), float(direction[1] * speed))
            mover.obj.center = (float(start_pos[0]), float(start_pos[1]))
            movers.append(mover)
    # Later entries from the edges.
    entry_probability = entries_per_second / fps
    for frame in range(1, num_frames):
        if rng.uniform() < entry_probability:
            movers.append(new_mover(frame, False, next_id))
            next_id += 1

    full_masks: dict[int, float] = {}
    for frame_index in range(num_frames):
        img = background.copy()
        frame_noise = rng.normal(0, 2.0, size=(height, width, 1))
        live = [m for m in movers if m.start <= frame_index]
        drawn: list[tuple[_Mover, np.ndarray]] = []
        for mover in sorted(live, key=lambda m: m.z):
            obj = mover.obj
            steps = frame_index - mover.start
            cx = obj.center[0] + mover.velocity[0] * steps
            cy = obj.center[1] + mover.velocity[1] * steps
            angle = obj.angle + mover.spin * steps
            box = _shape_box(obj.shape, (cx, cy), obj.extent, angle)
            if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
                continue
            mask = paint(img, obj.shape, (cx, cy), obj.extent, angle, mover.rgb) >= 128
            key = obj.track_id
            if key not in full_masks:
                full_masks[key] = _full_area(obj.shape, obj.extent)
            drawn.append((mover, mask, (cx, cy), angle, mask_box(mask)))
        img = np.clip(img.astype(np.float64) + frame_noise, 0, 255).astype(np.uint8)
        # Visibility: pixels of the shape in frame and not covered by anything drawn above it.
        covered = np.zeros((height, width), bool)
        visible_objects: list[ShapeObject] = []
        for mover, mask, center, angle, box in reversed(drawn):
            vis = _visible_fraction(covered, mask, full_masks[mover.obj.track_id])
            covered |= mask
            clipped = box  # the whole shape's pixels within the frame (not only its unoccluded part)
            if box is None or vis <= min_visibility or clipped[2] - clipped[0] < 2 or clipped[3] - clipped[1] < 2:
                continue
            visible_objects.append(dataclasses.replace(mover.obj, box_xyxy=clipped, center=center, angle=angle,
                                                       visibility=min(1.0, vis)))
        visible_objects.sort(key=lambda o: o.track_id)
        truth = FrameTruth(
            frame_index=frame_index,
            boxes_xyxy=np.array([o.box_xyxy for o in visible_objects], np.float32).reshape(-1, 4),
            track_ids=np.array([o.track_id for o in visible_objects], np.int64),
            visibility=np.array([o.visibility for o in visible_objects], np.float32),
            categories=[o.category for o in visible_objects],
            phrases=[o.phrase for o in visible_objects],
            objects=visible_objects,
        )
        yield img, truth


def _full_area(shape: str, extent: float) -> float:
    """Pixel count of a shape drawn whole (no clipping, no occlusion), measured on its own canvas."""
    pad = int(math.ceil(extent)) + 4
    return float(np.count_nonzero(coverage(shape, (pad / 2, pad / 2), extent, 0.0, pad, pad) >= 128))


def render_video(
    seed: int,
    num_frames: int,
    size: tuple[int, int] = (240, 320),
    fps: float = 10.0,
    **kwargs,
) -> tuple[np.ndarray, list[FrameTruth]]:
    """A shapes video: ``frames`` (T, H, W, 3) uint8 RGB and one ``FrameTruth`` per frame.

    Objects move in straight lines (speeds in pixels per second, so a higher ``fps`` gives smaller steps),
    spin, enter from the edges and leave; two of them are put on a collision course so that they cross and
    one occludes the other. A frame lists every object with at least one visible pixel
    (``min_visibility`` raises that), its box clipped to the frame, its ``visibility`` and its track id (ids
    start at 1 and are never reused). Keyword arguments as for ``iter_video``.
    """
    frames, truths = [], []
    for img, truth in iter_video(seed, num_frames, size, fps, **kwargs):
        frames.append(img)
        truths.append(truth)
    height, width = size
    stacked = np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
    return stacked, truths


# ---------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    """A caption with the char span of each phrase, and which phrase each object answers to.

    ``object_phrase[i]`` is the index into ``phrases`` of object i, or -1 when the prompt does not name it
    (for a referring expression, every object but the referent).
    """

    caption: str
    phrases: list[str]
    spans: list[tuple[int, int]]  # char (start, end) of each phrase in caption
    object_phrase: list[int]
    positives: list[bool]  # per phrase: does some object answer to it

    @property
    def num_targets(self) -> int:
        return sum(1 for p in self.object_phrase if p >= 0)


def _join(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Caption in the official detection form "a . b . c ." with the span of each phrase."""
    parts, spans, pos = [], [], 0
    for phrase in phrases:
        spans.append((pos, pos + len(phrase)))
        parts.append(phrase)
        pos += len(phrase) + len(" . ")
    return " . ".join(parts) + " .", spans


def category_prompt(
    objects: Sequence[ShapeObject],
    rng: np.random.Generator | int | None = None,
    *,
    num_negatives: int | tuple[int, int] = (1, 4),
    split: str = "train",
    shuffle: bool = True,
    hard_negatives: float = 0.0,
    partial: float = 0.0,
) -> Prompt:
    """A category-list prompt: every category present plus absent categories of ``split`` as negatives.

    "red circle . blue square . green star ." with the categories in random order (or sorted if not
    ``shuffle``). Negatives are drawn from the categories of ``split`` that no object has. With
    ``hard_negatives`` > 0, each negative is, with that probability, a look-alike of a present object (same
    shape in another colour, or same colour on another shape): the negatives that teach colour binding.
    ``hard_negatives = 0`` draws exactly as before (held-out sets do not change).

    With probability ``partial`` the prompt names only a random subset of the present categories (one, or none
    at all) and the objects of the others are not targets: a user's prompt ("red star .") rarely names
    everything in view, and a model that has only seen prompts naming every object learns to give each object
    to some phrase, so a lone "red star" fires on the orange star beside it. ``partial = 0`` draws exactly as
    before.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    present = sorted({o.category for o in objects})
    absent_all = None
    if partial > 0 and rng.uniform() < partial:
        absent_all = [c for c in categories(split) if c not in present]
        keep = int(rng.integers(0, min(2, len(present)) + 1))
        named = sorted(present[i] for i in rng.choice(len(present), size=keep, replace=False))
        unnamed, present = [c for c in present if c not in named], named
    absent = [c for c in categories(split) if c not in present]
    if absent_all is not None:
        # negatives must be absent from the image, and look-alikes of the unnamed objects are the useful ones
        absent = absent_all
        present_for_lookalikes = present + unnamed
    else:
        present_for_lookalikes = present
    if isinstance(num_negatives, int):
        count = num_negatives
    else:
        count = int(rng.integers(num_negatives[0], num_negatives[1] + 1))
    count = min(count, len(absent))
    if hard_negatives > 0 and count:
        negatives = _mixed_negatives(present_for_lookalikes, absent, count, hard_negatives, rng)
    else:
        negatives = [absent[i] for i in rng.choice(len(absent), size=count, replace=False)] if count else []
    phrases = present + negatives
    if shuffle:
        phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    else:
        phrases = sorted(phrases)
    if not phrases:  # a partial prompt with nothing named and no negatives: name one absent category
        phrases = [absent[int(rng.integers(len(absent)))]]
    caption, spans = _join(phrases)
    index = {p: i for i, p in enumerate(phrases)}
    return Prompt(caption, phrases, spans, [index.get(o.category, -1) for o in objects],
                  [p in present for p in phrases])


def _mixed_negatives(present: Sequence[str], absent: Sequence[str], count: int, hard: float,
                     rng: np.random.Generator) -> list[str]:
    """``count`` distinct absent categories, each a look-alike of a present one with probability ``hard``."""
    words = [p.split() for p in present]
    colours = {w[0] for w in words}
    kinds = {w[-1] for w in words}
    lookalike = [a for a in absent if a.split()[0] in colours or a.split()[-1] in kinds]
    chosen: list[str] = []
    for _ in range(count):
        pool = lookalike if (lookalike and rng.uniform() < hard) else absent
        pool = [a for a in pool if a not in chosen] or [a for a in absent if a not in chosen]
        chosen.append(pool[int(rng.integers(len(pool)))])
    return chosen


def fixed_category_prompt(names: Sequence[str], objects: Sequence[ShapeObject]) -> Prompt:
    """A category-list prompt over a fixed list of names (e.g. every category of a split, for evaluation)."""
    phrases = list(names)
    caption, spans = _join(phrases)
    index = {p: i for i, p in enumerate(phrases)}
    return Prompt(caption, phrases, spans, [index.get(o.category, -1) for o in objects],
                  [any(o.category == p for o in objects) for p in phrases])


def describe(objects: Sequence[ShapeObject], index: int) -> str | None:
    """The shortest description that picks out object ``index`` among ``objects`` ("the green triangle",
    "the large green triangle"), or None when no colour/shape/size description is unique."""
    target = objects[index]
    others = [o for i, o in enumerate(objects) if i != index]
    candidates = [
        (target.shape,),
        (target.colour, target.shape),
        (target.size, target.shape),
        (target.size, target.colour, target.shape),
    ]
    for words in candidates:
        def matches(o: ShapeObject) -> bool:
            attrs = {"shape": o.shape, "colour": o.colour, "size": o.size}
            return all(w in attrs.values() for w in words)

        if not any(matches(o) for o in others):
            return "the " + " ".join(words)
    return None


def referring_prompt(
    objects: Sequence[ShapeObject],
    index: int,
    *,
    full: bool = False,
) -> Prompt | None:
    """A referring expression for object ``index``: "the large green triangle".

    ``full`` always uses size, colour and shape; otherwise the shortest unique description. The positive span
    is the expression without its article. Returns None when the object cannot be told apart.
    """
    if full:
        target = objects[index]
        duplicates = [i for i, o in enumerate(objects) if o.phrase == target.phrase and i != index]
        if duplicates:
            return None
        expression = "the " + target.phrase
    else:
        expression = describe(objects, index)
        if expression is None:
            return None
    caption = expression
    span = (len("the "), len(expression))
    return Prompt(caption, [expression[len("the "):]], [span],
                  [0 if i == index else -1 for i in range(len(objects))], [True])


def referring_scene(
    seed: int,
    size: tuple[int, int] = (256, 256),
    *,
    split: str = "train",
    clutter: float = 1.0,
) -> tuple[np.ndarray, list[ShapeObject], Prompt]:
    """A scene built for a referring expression: a target plus look-alikes that share its colour or shape
    (and sometimes both, differing in size), so the full description is needed. Returns the image, objects
    and the full-form prompt "the <size> <colour> <shape>"."""
    rng = np.random.default_rng(seed)
    height, width = size
    side = min(height, width)
    pairs = _pairs(split)
    colour, shape = _sample_pair(rng, pairs)
    size_names = list(SIZES)
    target_size = size_names[int(rng.integers(3))]
    specs = [(colour, shape, target_size)]
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(3)
        other_size = size_names[int(rng.integers(3))]
        if kind == 0:  # same colour and shape, other size
            other_size = [s for s in size_names if s != target_size][int(rng.integers(2))]
            specs.append((colour, shape, other_size))
        elif kind == 1:  # same shape, other colour
            options = [c for c, s in pairs if s == shape and c != colour]
            if options:
                specs.append((options[int(rng.integers(len(options)))], shape, other_size))
        else:  # same colour, other shape
            options = [s for c, s in pairs if c == colour and s != shape]
            if options:
                specs.append((colour, options[int(rng.integers(len(options)))], other_size))
    order = rng.permutation(len(specs))
    img = _background(rng, height, width)
    if clutter > 0:
        _clutter(rng, img, clutter)
    objects: list[ShapeObject] = []
    target_index = -1
    for k in order:
        c, s, z = specs[k]
        for _attempt in range(30):
            extent = _sample_extent(rng, z, side)
            angle = float(rng.uniform(-30, 30)) if s not in ("circle", "ring") else 0.0
            margin = extent / 2 + 1
            center = (float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin)))
            box = _shape_box(s, center, extent, angle)
            if _overlaps_at_most(box, objects, 0.05):
                break
        else:
            if k == 0:  # the target must be there: accept the overlap
                pass
            else:
                continue
        drawn_box = mask_box(paint(img, s, center, extent, angle, _object_colour(rng, c)) >= 128)
        if k == 0:
            target_index = len(objects)
        objects.append(ShapeObject(s, c, z, drawn_box or box, center, extent, angle))
    prompt = referring_prompt(objects, target_index, full=True)
    if prompt is None:  # a look-alike with the very same description: drop it from the truth by redrawing
        return referring_scene(seed + 7919, size, split=split, clutter=clutter)
    return img, objects, prompt
