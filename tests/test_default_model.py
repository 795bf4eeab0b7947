"""The shipped default model really detects: held-out shapes-world metrics against the issue's thresholds.

A small fixed held-out set (scene seeds past every training seed) keeps this under a minute on two cores; the
model card reports the full ``groundwatch eval`` numbers. The thresholds are the issue's; do not lower them.
"""

import json
from pathlib import Path

import pytest
import torch

import gdino
from gdino.evaluate import detection_set, evaluate_detection, evaluate_referring, referring_set

ASSET = Path(gdino.__file__).parent / "assets" / "default"
IMAGE_SIZE = 192  # the resolution the default model was trained at (configs/default.toml)
NUM_IMAGES = 24

pytestmark = pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="default weights not shipped")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return gdino.load("default")


def test_gdino_load_builds_the_default(model):
    """The shipped folder leaves out the frozen MiniLM (bert.*); gdino.load builds it from the package."""
    assert model.config.hidden_dim == 128
    assert model.config.input_short_side == IMAGE_SIZE
    assert model.config.text.pretrained == "minilm"


def test_default_weights_fit_the_size_budget():
    size = sum(p.stat().st_size for p in ASSET.iterdir() if p.is_file())
    assert size <= 30 * 2**20, size


def test_held_out_category_prompts(model):
    report = evaluate_detection(model, detection_set(NUM_IMAGES, 7, IMAGE_SIZE, "train"))
    assert report["AP50"] >= 0.90, report
    assert report["AP"] >= 0.70, report


def test_compositional_pairs_never_seen_in_training(model):
    report = evaluate_detection(model, detection_set(NUM_IMAGES, 8, IMAGE_SIZE, "compositional"))
    assert report["AP50"] >= 0.70, report


def test_referring_expressions(model):
    report = evaluate_referring(model, referring_set(NUM_IMAGES, 7, IMAGE_SIZE, "train"))
    assert report["accuracy"] >= 0.85, report


def test_detect_finds_shapes_in_pixels(model):
    """model.detect (the daemon's path: uint8 frames, the model's own resize, phrases) finds what is there.

    It once resized every frame to the official 800 px, four times the scale the default model was trained at.
    """
    from gdino.shapes import category_prompt, render_scene

    found_right, total = 0, 0
    for seed in range(10**12 + 50, 10**12 + 58):
        image, objects = render_scene(seed, (240, 320), num_objects=(1, 3), clutter=0.3)
        prompt = category_prompt(objects, seed, num_negatives=1)
        # The bundled config's threshold for this model (MODEL_CARD.md: recall 0.97, precision 0.98 there).
        detections = model.detect(image, prompt.caption, box_threshold=0.3, remove_combined=True)
        for obj in objects:
            total += 1
            for box, phrase in zip(detections.boxes_xyxy, detections.phrases):
                x0, y0 = max(box[0], obj.box_xyxy[0]), max(box[1], obj.box_xyxy[1])
                x1, y1 = min(box[2], obj.box_xyxy[2]), min(box[3], obj.box_xyxy[3])
                inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
                union = ((box[2] - box[0]) * (box[3] - box[1])
                         + (obj.box_xyxy[2] - obj.box_xyxy[0]) * (obj.box_xyxy[3] - obj.box_xyxy[1]) - inter)
                if inter / union >= 0.5 and phrase == obj.category:
                    found_right += 1
                    break
    assert found_right / total >= 0.8, (found_right, total)
