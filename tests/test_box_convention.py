"""Ground-truth boxes are right to the pixel: the tight COCO box of the pixels an object covers (alpha >= 0.5
after anti-aliasing, pixel i spanning [i, i + 1), x2 = x1 + width), end to end from rendering to scoring.

The issue's failure: boxes were the shape's geometry in OpenCV's pixel-centre convention, drawn with OpenCV's
anti-aliasing that smears polygon edges outwards, so the default model learned boxes about half a pixel up-left
and too small against the pixels it sees (COCO AP 0.60 on an independent evaluation, AP50 0.96).
"""

import math

import numpy as np
import pytest
import torch

from gdino import shapes, world
from gdino.boxes import from_pixels_xyxy, to_pixels_xyxy
from gdino.evaluate import coco_ap, ImageDetections, ImageTruth
from gdino.train.data import ShapesDataset


def _sub_pixel_squares(count: int, seed: int = 0):
    """(centre x, centre y, half side) with every edge at least 0.2 px from a pixel centre (no ties)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        cx, cy = rng.uniform(20, 44, 2)
        half = rng.uniform(2.5, 14)
        edges = (cx - half, cy - half, cx + half, cy + half)
        if all(abs(e - round(e)) >= 0.2 for e in edges):
            out.append((cx, cy, half))
    return out


def test_square_box_is_the_coco_box_of_its_pixel_centres():
    """An axis-aligned square covers pixel i (OpenCV centre i, extent [i - 0.5, i + 0.5]) by at least half
    exactly when the pixel centre is inside it, so its COCO box is (ceil(left), ..., floor(right) + 1)."""
    for cx, cy, half in _sub_pixel_squares(60):
        extent = 2 * half / 0.82  # the square's side is 0.82 of its extent
        box = shapes.pixel_box("square", (cx, cy), extent, 0.0, 64, 64)
        expected = (math.ceil(cx - half), math.ceil(cy - half), math.floor(cx + half) + 1, math.floor(cy + half) + 1)
        assert box == tuple(float(v) for v in expected), (cx, cy, half, box, expected)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_box_equals_the_rendered_mask_box_at_sub_pixel_positions(shape):
    """Each shape alone, white on black, at sub-pixel positions and any angle: the ground-truth box is the box
    of the rendered pixels at or above half intensity."""
    rng = np.random.default_rng(1)
    for _ in range(12):
        center = tuple(rng.uniform(24, 40, 2))
        extent = float(rng.uniform(6, 30))
        angle = float(rng.uniform(0, 360))
        canvas = np.zeros((64, 64, 3), np.uint8)
        shapes.paint(canvas, shape, center, extent, angle, (255, 255, 255))
        rendered = shapes.mask_box(canvas[..., 0] >= 128)
        assert shapes.pixel_box(shape, center, extent, angle, 64, 64) == rendered
        x1, y1, x2, y2 = rendered
        assert canvas[int(y1):int(y2), int(x1):int(x2), 0].max() >= 128
        assert (canvas[:, :int(x1)] < 128).all() and (canvas[:, int(x2):] < 128).all()


def test_scene_boxes_are_the_mask_boxes_of_their_objects():
    """Scenes store the box of what was drawn, clipped by the frame edge, for the classic and the wide world."""
    for seed in range(5):
        _, objects = shapes.render_scene(seed, (96, 96), clutter=0.0)
        for o in objects:
            assert o.box_xyxy == shapes.pixel_box(o.shape, o.center, o.extent, o.angle, 96, 96)
            assert all(float(v).is_integer() for v in o.box_xyxy)
        scene = world.render(seed, (96, 96), occlusion=0.0, edge_cut=1.0)
        for o in scene.objects:
            assert o.box_xyxy == shapes.pixel_box(o.shape, o.center, o.extent, o.angle, 96, 96)


def test_training_targets_and_post_processing_round_trip_the_box():
    """Training target (cxcywh in [0, 1] of the image) and the evaluation's decoding (back to pixels) invert
    each other, so the model is trained and scored on the same pixels."""
    sample = ShapesDataset(seed=3, image_size=160, world="wide", referring=0.0)[0]
    boxes = np.array([o.box_xyxy for o in sample.meta["objects"]], np.float32)
    target = from_pixels_xyxy(boxes, 160, 160)
    decoded = to_pixels_xyxy(target, 160, 160).numpy()
    np.testing.assert_allclose(decoded, boxes, atol=1e-3)


def test_half_pixel_offset_costs_ap90():
    """AP90 is reported because it tells a box half a pixel off from a right one, which AP50 cannot."""
    truth = [ImageTruth(np.array([[10.0, 10.0, 18.0, 18.0]], np.float32), ["a"], 32, 32)]
    right = coco_ap(truth, [ImageDetections(np.array([[10.0, 10.0, 18.0, 18.0]]), np.array([0.9]), ["a"])])
    shifted = coco_ap(truth, [ImageDetections(np.array([[10.5, 10.5, 17.5, 17.5]]), np.array([0.9]), ["a"])])
    assert right["AP90"] == pytest.approx(1.0) and right["AP50"] == pytest.approx(1.0)
    assert shifted["AP50"] == pytest.approx(1.0) and shifted["AP90"] == pytest.approx(0.0)


def test_target_tensor_is_float_in_unit_range():
    target = from_pixels_xyxy(np.array([[0.0, 0.0, 160.0, 160.0]]), 160, 160)
    assert target.dtype == torch.float32
    assert torch.equal(target, torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
