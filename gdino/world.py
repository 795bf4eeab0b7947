"""The wide shapes world: more kinds of picture and more ways of saying things than ``gdino.shapes`` alone.

The same six shapes in ten colours (``shapes.SHAPES``, ``shapes.COLOURS``), but drawn on eight background
families, rotated to any angle, over a wider range of sizes, cut by the frame edge, partly hidden behind
occluders, among clutter in any colour that no prompt names (hexagons, pentagons, bars, thin ellipses), then
blurred, lit and colour-cast. And described in many phrase templates: with and without size words, other word
orders, synonyms, articles, relations ("the red star left of the blue ring"), comparisons ("the larger of the
two green squares"), positions ("the cross nearest the top"), plurals, several expressions in one caption.

Honest held-out evaluation needs more than unseen seeds: whole background families
(``HELD_OUT_BACKGROUNDS``) and whole phrase templates (``HELD_OUT_TEMPLATES``) never appear in training
(``TRAIN_BACKGROUNDS``, ``TRAIN_TEMPLATES``); the held-out templates say what a training template says, in
other words. Ground-truth boxes follow ``gdino.shapes``: the tight COCO box of the pixels an object covers with
alpha >= 0.5, here counting only pixels not covered by an occluder drawn over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from gdino import shapes
from gdino.boxes import iou_matrix

BACKGROUNDS: tuple[str, ...] = ("texture", "plain", "gradient", "noise", "stripes", "bokeh", "patchwork", "marble")
HELD_OUT_BACKGROUNDS: frozenset[str] = frozenset({"patchwork", "marble"})
TRAIN_BACKGROUNDS: tuple[str, ...] = tuple(b for b in BACKGROUNDS if b not in HELD_OUT_BACKGROUNDS)
# The training families of stages 3-5 of the default model, before "stripes" and "bokeh" (their configs name them,
# so they reproduce).
FIRST_TRAIN_BACKGROUNDS: tuple[str, ...] = ("texture", "plain", "gradient", "noise")

# Extent as a fraction of min(H, W); wider than the classic world's classes, gaps kept so the words stay apt.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.05, 0.11),
    "medium": (0.14, 0.20),
    "large": (0.25, 0.36),
}

# Words a person would use instead; the held-out ones never appear in training captions.
TRAIN_SYNONYMS: dict[str, str] = {
    "circle": "disc", "square": "box", "ring": "donut", "cross": "plus",
    "small": "little", "large": "big", "medium": "mid-sized", "purple": "violet",
}
HELD_OUT_SYNONYMS: dict[str, str] = {
    "circle": "dot", "square": "block", "ring": "hoop", "cross": "plus sign",
    "small": "tiny", "large": "huge", "cyan": "turquoise",
}

# Singular templates, each of which names exactly one object (scored by top-1), and the plural one.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "full",            # the large red circle
    "colour_shape",    # the red circle
    "bare",            # red circle
    "size_shape",      # the large circle
    "shape_in_colour",  # the circle in red
    "synonyms",        # the big violet disc
    "left_right",      # the red circle left of the blue star / right of
    "larger_smaller",  # the larger of the two red circles / the smaller of
    "top_bottom",      # the circle nearest the top / the bottom
)
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "that_is",              # the circle that is red
    "held_out_synonyms",    # the tiny turquoise block
    "relation_paraphrase",  # the red circle to the left of the blue star / on the right of
    "comparative",          # the bigger red circle / the littler red circle
    "superlative_position",  # the highest circle / the lowest circle
)
PLURAL_TEMPLATES: tuple[str, ...] = ("plural",)  # the red circles / all circles (training only)
TEMPLATES: tuple[str, ...] = TRAIN_TEMPLATES + HELD_OUT_TEMPLATES + PLURAL_TEMPLATES

_CLUTTER_SHAPES = ("hexagon", "pentagon", "bar")


@dataclass(frozen=True)
class Expression:
    """One referring expression: its text, the char span that is its phrase, the objects it names."""

    template: str
    text: str
    span: tuple[int, int]  # (start, end) in ``text``: the expression without a leading article
    targets: tuple[int, ...]  # indices into the scene's objects


@dataclass
class WideScene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[shapes.ShapeObject]  # boxes: COCO xyxy of the visible covered pixels
    background: str


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds: every family desaturated and mid-toned, so that every named colour still stands out.


def _tint(rng: np.random.Generator, base: float, spread: float = 22.0) -> np.ndarray:
    return base + rng.uniform(-spread, spread, size=3)


def _low_frequency(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    noise = rng.normal(0, 1, size=(cells, cells)).astype(np.float32)
    return cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)


def background(rng: np.random.Generator, family: str, height: int, width: int) -> np.ndarray:
    """A (H, W, 3) uint8 background of ``family`` (one of ``BACKGROUNDS``)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if family == "texture":
        return shapes._background(rng, height, width)
    if family == "plain":
        img = np.broadcast_to(_tint(rng, rng.uniform(60, 190)), (height, width, 3)).astype(np.float32)
    elif family == "gradient":
        a, b = _tint(rng, rng.uniform(50, 200)), _tint(rng, rng.uniform(50, 200))
        if rng.uniform() < 0.5:
            theta = rng.uniform(0, 2 * np.pi)
            t = xx * math.cos(theta) + yy * math.sin(theta)
        else:
            t = np.hypot(xx - rng.uniform(0, width), yy - rng.uniform(0, height))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a + (b - a) * t[..., None]
    elif family == "noise":  # photo-like: 1/f noise over several octaves, colour-varying, with grain
        img = np.broadcast_to(_tint(rng, rng.uniform(70, 180)), (height, width, 3)).astype(np.float32).copy()
        for cells, amplitude in ((3, 28.0), (8, 16.0), (24, 9.0), (64, 5.0)):
            layer = np.stack([_low_frequency(rng, height, width, cells) for _ in range(3)], -1)
            mix = rng.uniform(0.6, 1.0)  # mostly luminance, a little chroma
            layer = mix * layer.mean(-1, keepdims=True) + (1 - mix) * layer
            img = img + layer * amplitude * rng.uniform(0.5, 1.2)
    elif family == "stripes":  # bands at any angle, hard or soft, sometimes crossed by a second set (plaid)
        a, b = _tint(rng, rng.uniform(50, 200)), _tint(rng, rng.uniform(50, 200))
        img = np.zeros((height, width, 3), np.float32) + a
        for _layer in range(1 + int(rng.uniform() < 0.4)):
            theta = rng.uniform(0, np.pi)
            period = rng.uniform(6, 48)
            wave = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * np.pi / period + rng.uniform(0, 6.3))
            t = (wave > rng.uniform(-0.5, 0.5)).astype(np.float32) if rng.uniform() < 0.5 else 0.5 + 0.5 * wave
            img = img + (b - a) * (t[..., None] * rng.uniform(0.4, 1.0))
            b = _tint(rng, rng.uniform(50, 200))
    elif family == "bokeh":  # out-of-focus discs of muted colours over a soft gradient: round, but no shape
        img = np.broadcast_to(_tint(rng, rng.uniform(40, 170)), (height, width, 3)).astype(np.float32).copy()
        img = img + _low_frequency(rng, height, width, 3)[..., None] * rng.uniform(5, 25)
        side = min(height, width)
        for _disc in range(int(rng.integers(6, 30))):
            cx, cy = int(rng.uniform(0, width)), int(rng.uniform(0, height))
            radius = max(int(side * rng.uniform(0.03, 0.2)), 2)
            sigma = float(rng.uniform(1.5, 6.0))
            reach = radius + int(3 * sigma) + 2  # the blurred disc is zero beyond this: blur only its window
            x0, y0, x1, y1 = max(cx - reach, 0), max(cy - reach, 0), min(cx + reach, width), min(cy + reach, height)
            disc = np.zeros((y1 - y0, x1 - x0), np.float32)
            cv2.circle(disc, (cx - x0, cy - y0), radius, 1.0, -1, cv2.LINE_AA)
            disc = cv2.GaussianBlur(disc, (0, 0), sigma)[..., None] * rng.uniform(0.2, 0.6)
            window = img[y0:y1, x0:x1]
            img[y0:y1, x0:x1] = window * (1 - disc) + _tint(rng, rng.uniform(80, 220), 30.0) * disc
    elif family == "patchwork":  # held out: Voronoi cells of flat muted colours with dark seams
        count = int(rng.integers(5, 16))
        points = rng.uniform(0, 1, (count, 2)) * [width, height]
        distance = np.hypot(xx[..., None] - points[:, 0], yy[..., None] - points[:, 1])  # (H, W, K)
        order = np.sort(distance, axis=-1)
        cell = distance.argmin(-1)
        colours = np.stack([_tint(rng, rng.uniform(60, 190), 18.0) for _ in range(count)])
        img = colours[cell].astype(np.float32)
        seam = (order[..., 1] - order[..., 0]) < rng.uniform(0.8, 2.0)
        img[seam] *= 0.6
    elif family == "marble":  # held out: veined stone
        turbulence = sum(_low_frequency(rng, height, width, c) * (8.0 / c) for c in (4, 8, 16))
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(20, 60)
        veins = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * np.pi / period + turbulence * 3.0)
        a, b = _tint(rng, rng.uniform(120, 200), 12.0), _tint(rng, rng.uniform(60, 120), 12.0)
        t = (np.abs(veins) ** 0.5)[..., None]
        img = b + (a - b) * t
    else:
        raise ValueError(f"unknown background family {family!r}; expected one of {BACKGROUNDS}")
    img = img + rng.normal(0, rng.uniform(1, 6), size=(height, width, 1))
    return np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Clutter, occluders, photometric changes


def _clutter_colour(rng: np.random.Generator) -> np.ndarray:
    """Half muted greys, half any hue at all (a red hexagon is still not a red anything of the vocabulary)."""
    if rng.uniform() < 0.5:
        return np.clip(rng.uniform(60, 200) + rng.uniform(-20, 20, size=3), 0, 255)
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(120, 255), rng.uniform(120, 255)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    height, width = img.shape[:2]
    side = min(height, width)
    for _ in range(count):
        colour = _clutter_colour(rng)
        centre = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
        extent = side * rng.uniform(0.05, 0.3)
        kind = int(rng.integers(5))
        if kind < 3:
            shapes.paint(img, _CLUTTER_SHAPES[kind], centre, extent, float(rng.uniform(0, 360)), colour)
        elif kind == 3:  # a thin ellipse: never round enough to pass for a circle
            axes = (max(int(extent / 2), 2), max(int(extent / 2 * rng.uniform(0.15, 0.45)), 1))
            cv2.ellipse(img, (int(centre[0]), int(centre[1])), axes, float(rng.uniform(0, 180)), 0, 360,
                        tuple(float(c) for c in colour), -1, cv2.LINE_AA)
        else:
            end = (int(centre[0] + rng.uniform(-1, 1) * side * 0.4), int(centre[1] + rng.uniform(-1, 1) * side * 0.4))
            cv2.line(img, (int(centre[0]), int(centre[1])), end, tuple(float(c) for c in colour),
                     int(rng.integers(1, 4)), cv2.LINE_AA)


def _photometric(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Lighting, a mild colour cast, blur and sensor noise. Mild enough that a red thing stays red."""
    out = img.astype(np.float32)
    if rng.uniform() < 0.6:
        gain = rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, size=3)  # brightness and a colour cast
        out = out * gain + rng.uniform(-20, 20)
    if rng.uniform() < 0.3:  # uneven lighting: a soft vignette or a bright side
        height, width = img.shape[:2]
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        light = 1.0 - rng.uniform(0.1, 0.35) * (np.hypot(xx - rng.uniform(0, width), yy - rng.uniform(0, height))
                                                 / max(height, width))
        out = out * light[..., None]
    if rng.uniform() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.4, 1.1)))
    if rng.uniform() < 0.4:
        out = out + rng.normal(0, rng.uniform(2, 7), size=out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Scenes


def _extent(rng: np.random.Generator, size_name: str, side: int) -> float:
    lo, hi = SIZES[size_name]
    return float(rng.uniform(lo, hi) * side)


def render(
    seed: int,
    size: tuple[int, int] = (192, 192),
    *,
    backgrounds: Sequence[str] = TRAIN_BACKGROUNDS,
    split: str = "train",
    num_objects: tuple[int, int] = (1, 6),
    twins: float = 0.5,
    clutter: float = 1.0,
    occlusion: float = 0.3,
    edge_cut: float = 0.15,
    photometric: bool = True,
) -> WideScene:
    """One wide-world scene on a background family drawn from ``backgrounds``.

    ``twins``: probability that one object gets a twin of the same colour and shape in another size (what
    relations and comparisons need). ``occlusion``: probability per object of an occluder drawn over part of
    it (at most half its pixels). ``edge_cut``: probability per object of sitting partly outside the frame.
    """
    rng = np.random.default_rng([seed, 29])
    height, width = size
    side = min(height, width)
    family = backgrounds[int(rng.integers(len(backgrounds)))]
    img = background(rng, family, height, width)
    if clutter > 0:
        _clutter(rng, img, int(rng.poisson(clutter * 4)))
    pairs = shapes._pairs(split)
    size_names = list(SIZES)
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    specs = []
    for _ in range(count):
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        specs.append((colour, shape, size_names[int(rng.integers(3))]))
    if specs and rng.uniform() < twins:
        colour, shape, size_name = specs[0]
        specs.append((colour, shape, [s for s in size_names if s != size_name][int(rng.integers(2))]))

    placed: list[tuple[str, str, str, tuple[float, float], float, float, tuple]] = []
    for colour, shape, size_name in specs:
        for _attempt in range(30):
            extent = _extent(rng, size_name, side)
            angle = float(rng.uniform(0, 360)) if shape not in ("circle", "ring") else 0.0
            if rng.uniform() < edge_cut:  # up to 40 % of the extent beyond an edge
                margin = extent / 2 - extent * rng.uniform(0.1, 0.4)
            else:
                margin = extent / 2 + 1
            center = (float(rng.uniform(margin, width - margin)), float(rng.uniform(margin, height - margin)))
            geometry = shapes._shape_box(shape, center, extent, angle)
            if not placed or (iou_matrix([geometry], [p[6] for p in placed]) <= 0.1).all():
                placed.append((colour, shape, size_name, center, extent, angle, geometry))
                break

    masks = []
    for colour, shape, size_name, center, extent, angle, _ in placed:
        masks.append(shapes.paint(img, shape, center, extent, angle, shapes._object_colour(rng, colour)) >= 128)
    # Occluders over some objects; kept only where every object keeps at least half of its pixels.
    hidden = np.zeros((height, width), bool)
    for index in range(len(placed)):
        if rng.uniform() >= occlusion or not masks[index].any():
            continue
        ys, xs = np.nonzero(masks[index])
        pick = int(rng.integers(xs.size))
        center = (float(xs[pick]), float(ys[pick]))
        extent = placed[index][4] * rng.uniform(0.4, 0.9)
        kind = _CLUTTER_SHAPES[int(rng.integers(len(_CLUTTER_SHAPES)))]
        angle = float(rng.uniform(0, 360))
        cover = shapes.coverage(kind, center, extent, angle, height, width) >= 128
        trial = hidden | cover
        if all(np.count_nonzero(m & ~trial) >= 0.5 * np.count_nonzero(m) for m in masks if m.any()):
            shapes.paint(img, kind, center, extent, angle, _clutter_colour(rng))
            hidden = trial

    objects = []
    for (colour, shape, size_name, center, extent, angle, _), mask in zip(placed, masks):
        total = np.count_nonzero(mask)
        visible = mask & ~hidden
        box = shapes.mask_box(visible)
        if box is None or box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        objects.append(shapes.ShapeObject(shape, colour, size_name, box, center, extent, angle,
                                          visibility=float(np.count_nonzero(visible) / max(total, 1))))
    if photometric:
        img = _photometric(rng, img)
    return WideScene(img, objects, family)


# ---------------------------------------------------------------------------------------------------------------
# Language


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _word(word: str, table: dict[str, str] | None) -> str:
    return table.get(word, word) if table else word


def _center(o: shapes.ShapeObject) -> tuple[float, float]:
    x1, y1, x2, y2 = o.box_xyxy
    return (x1 + x2) / 2, (y1 + y2) / 2


def _expression(template: str, text: str, targets: Sequence[int]) -> Expression:
    start = 0
    for article in ("the ", "a ", "all "):
        if text.startswith(article):
            start = len(article)
            break
    return Expression(template, text, (start, len(text)), tuple(targets))


def candidates(objects: Sequence[shapes.ShapeObject], template: str, rng: np.random.Generator,
               side: float) -> list[Expression]:
    """Every expression of ``template`` that names its target(s) unambiguously in this scene."""
    out: list[Expression] = []
    n = len(objects)

    def unique(index: int, *attributes: str) -> bool:
        key = tuple(getattr(objects[index], a) for a in attributes)
        return sum(tuple(getattr(o, a) for a in attributes) == key for o in objects) == 1

    for i, o in enumerate(objects):
        if template == "full" and unique(i, "size", "colour", "shape"):
            out.append(_expression(template, f"the {o.size} {o.colour} {o.shape}", [i]))
        elif template == "colour_shape" and unique(i, "colour", "shape"):
            out.append(_expression(template, f"the {o.colour} {o.shape}", [i]))
        elif template == "bare" and unique(i, "colour", "shape"):
            out.append(_expression(template, f"{o.colour} {o.shape}", [i]))
        elif template == "size_shape" and unique(i, "size", "shape"):
            out.append(_expression(template, f"the {o.size} {o.shape}", [i]))
        elif template == "shape_in_colour" and unique(i, "colour", "shape"):
            out.append(_expression(template, f"the {o.shape} in {o.colour}", [i]))
        elif template == "that_is" and unique(i, "colour", "shape"):
            out.append(_expression(template, f"the {o.shape} that is {o.colour}", [i]))
        elif template in ("synonyms", "held_out_synonyms"):
            table = TRAIN_SYNONYMS if template == "synonyms" else HELD_OUT_SYNONYMS
            if not any(w in table for w in (o.size, o.colour, o.shape)):
                continue
            if unique(i, "size", "colour", "shape"):
                words = [_word(o.size, table), _word(o.colour, table), _word(o.shape, table)]
                if not unique(i, "colour", "shape") or rng.uniform() < 0.5:
                    out.append(_expression(template, "the " + " ".join(words), [i]))
                elif o.colour in table or o.shape in table:
                    out.append(_expression(template, "the " + " ".join(words[1:]), [i]))
    if template in ("left_right", "relation_paraphrase"):
        for t, target in enumerate(objects):
            same = [k for k in range(n) if objects[k].colour == target.colour and objects[k].shape == target.shape]
            for a, anchor in enumerate(objects):
                if a in same or not unique(a, "colour", "shape"):
                    continue
                for direction in ("left", "right"):
                    def beyond(k: int) -> bool:
                        box = objects[k].box_xyxy
                        return box[2] <= anchor.box_xyxy[0] if direction == "left" else box[0] >= anchor.box_xyxy[2]
                    if beyond(t) and not any(beyond(k) for k in same if k != t):
                        if template == "left_right":
                            relation = f"{direction} of"
                        else:
                            relation = "to the left of" if direction == "left" else "on the right of"
                        out.append(_expression(template, f"the {target.colour} {target.shape} {relation} the "
                                                         f"{anchor.colour} {anchor.shape}", [t]))
    if template in ("larger_smaller", "comparative"):
        groups: dict[tuple[str, str], list[int]] = {}
        for k, o in enumerate(objects):
            groups.setdefault((o.colour, o.shape), []).append(k)
        order = list(SIZES)
        for (colour, shape), members in groups.items():
            if len(members) != 2 or objects[members[0]].size == objects[members[1]].size:
                continue
            small, large = sorted(members, key=lambda k: order.index(objects[k].size))
            if template == "larger_smaller":
                out.append(_expression(template, f"the larger of the two {colour} {_plural(shape)}", [large]))
                out.append(_expression(template, f"the smaller of the two {colour} {_plural(shape)}", [small]))
            else:
                out.append(_expression(template, f"the bigger {colour} {shape}", [large]))
                out.append(_expression(template, f"the littler {colour} {shape}", [small]))
    if template in ("top_bottom", "superlative_position"):
        for shape in {o.shape for o in objects}:
            members = sorted((k for k in range(n) if objects[k].shape == shape), key=lambda k: _center(objects[k])[1])
            if len(members) < 2:
                continue
            ys = [_center(objects[k])[1] for k in members]
            if ys[1] - ys[0] >= 0.1 * side:
                text = f"the {shape} nearest the top" if template == "top_bottom" else f"the highest {shape}"
                out.append(_expression(template, text, [members[0]]))
            if ys[-1] - ys[-2] >= 0.1 * side:
                text = f"the {shape} nearest the bottom" if template == "top_bottom" else f"the lowest {shape}"
                out.append(_expression(template, text, [members[-1]]))
    if template == "plural":
        groups = {}
        for k, o in enumerate(objects):
            groups.setdefault((o.colour, o.shape), []).append(k)
        for (colour, shape), members in groups.items():
            out.append(_expression(template, f"the {colour} {_plural(shape)}", members))
        for shape in {o.shape for o in objects}:
            members = [k for k in range(n) if objects[k].shape == shape]
            out.append(_expression(template, f"all {_plural(shape)}", members))
    return out


def caption(expressions: Sequence[Expression]) -> shapes.Prompt:
    """Join expressions into one caption "a . b ." (the detection form); one phrase per expression.
    ``object_phrase`` is left empty: an expression may name several objects, see ``targets``."""
    parts, spans, position = [], [], 0
    for expression in expressions:
        spans.append((position + expression.span[0], position + expression.span[1]))
        parts.append(expression.text)
        position += len(expression.text) + len(" . ")
    text = " . ".join(parts) + " ."
    return shapes.Prompt(text, [e.text[e.span[0]:e.span[1]] for e in expressions], spans, [], [True] * len(spans))
