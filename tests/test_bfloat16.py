"""bfloat16 on the CPU: autocast through the inference fast path, and ``dtype="bfloat16"`` judged on detections.

Quality is judged where it matters, on detections above threshold against float32: the same phrases, boxes within
0.01 of the image size, at least 98% of detections matched.
"""

from __future__ import annotations

import pytest
import torch

from gdino import config as configs
from gdino.model import GroundingDino

PROMPT = "red circle . blue square . a small green triangle ."
SWINT_THRESHOLD = 0.5  # random weights: keeps a few dozen detections over three scenes


def test_forward_under_cpu_autocast_bfloat16():
    """``torch.autocast("cpu", dtype=torch.bfloat16)`` used to fail inside ``gdino.model.feed_forward``: the FFN
    buffer shared by the layers was allocated in float32 and ``addmm(out=...)`` refused the bfloat16 product
    ("Expected out tensor to have dtype float, but got c10::BFloat16")."""
    torch.manual_seed(0)
    model = GroundingDino(configs.tiny(pretrained_text=None)).eval()
    images = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        reference = model(images, PROMPT)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(images, PROMPT)
    assert mixed.logits.shape == reference.logits.shape
    finite = torch.isfinite(reference.logits)
    assert torch.equal(torch.isfinite(mixed.logits), finite)
    # Random weights put many query-selection candidates within bfloat16 rounding of one another, so compare the
    # sorted selection scores, and the queries selected at the same rank (bfloat16 keeps 8 mantissa bits).
    mixed_scores = mixed.encoder_output["logits"].float().max(-1)[0]
    reference_scores = reference.encoder_output["logits"].max(-1)[0]
    assert (mixed_scores - reference_scores).abs().max() <= 0.02 * reference_scores.abs().max()
    same = mixed.encoder_output["indices"] == reference.encoder_output["indices"]
    assert same.float().mean() >= 0.25
    spread = reference.logits[finite].abs().max()
    logit_error = torch.where(finite, (mixed.logits.float() - reference.logits).abs(), 0).amax(-1)[same]
    assert logit_error.max() <= 0.05 * spread
    assert (mixed.boxes.float() - reference.boxes).abs().amax(-1)[same].max() <= 0.02


# ----------------------------------------------------------------------------------------------------------------
# dtype = "bfloat16" judged on detections


def _match_rate(model_fp32, model_bf16, scenes, box_threshold: float, **detect_args) -> tuple[float, int]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from detection_match import match_detections

    matched = total = 0
    for image, caption in scenes:
        reference = model_fp32.detect(image, caption, box_threshold=box_threshold, remove_combined=True,
                                      **detect_args)
        found = model_bf16.detect(image, caption, box_threshold=box_threshold, remove_combined=True, **detect_args)
        hits, count = match_detections(reference, found, *image.shape[:2])
        matched, total = matched + hits, total + count
    return matched / max(total, 1), total


def test_bfloat16_default_model_detections_match_float32():
    """The default model in bfloat16 finds what float32 finds on held-out scenes: same phrases, boxes within 1%
    of the image, at least 98% of detections."""
    import gdino
    from gdino.evaluate import detection_set

    model_fp32 = gdino.load("default")
    model_bf16 = gdino.load("default", dtype="bfloat16")
    scenes = [(image, prompt.caption) for image, _, prompt in detection_set(16, 7, 192, "train")]
    rate, total = _match_rate(model_fp32, model_bf16, scenes, box_threshold=0.3)
    assert total >= 20
    assert rate >= 0.98, f"{rate:.1%} of {total} detections matched"


@pytest.mark.slow
def test_bfloat16_swint_random_detections_match_float32():
    """Swin-T OGC (random weights, the fusion and box paths made to carry signal) at 480x640 in bfloat16 against
    float32, judged the same way on the detections above a threshold that keeps a few dozen of them."""
    from gdino.shapes import category_prompt, render_scene

    torch.manual_seed(0)
    model_fp32 = GroundingDino(configs.swint_ogc()).eval()
    with torch.no_grad():
        for name, param in model_fp32.named_parameters():
            if name.endswith(("gamma_v", "gamma_l")):
                param.normal_(0.0, 0.5)
            if "bbox_embed" in name and ".layers.2." in name:
                param.normal_(0.0, 0.05)
    model_bf16 = GroundingDino(configs.swint_ogc()).eval()
    model_bf16.load_state_dict(model_fp32.state_dict())
    model_bf16 = model_bf16.to(torch.bfloat16)
    scenes = []
    for seed in range(3):
        image, objects = render_scene(10**12 + 900 + seed, (480, 640), num_objects=(2, 4))
        scenes.append((image, category_prompt(objects, seed, num_negatives=2).caption))
    rate, total = _match_rate(model_fp32, model_bf16, scenes, box_threshold=SWINT_THRESHOLD, short_side=480,
                              max_side=640)
    assert total >= 10
    assert rate >= 0.98, f"{rate:.1%} of {total} detections matched"
