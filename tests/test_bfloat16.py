"""bfloat16 on the CPU: autocast through the inference fast path, and ``dtype="bfloat16"`` judged on detections.

Quality is judged where it matters, on detections above threshold against float32: the same phrases, boxes within
0.01 of the image size, at least 98% of detections matched (``tests/detection_match.py``).
"""

from __future__ import annotations

import pytest
import torch

from gdino import config as configs
from gdino.model import GroundingDino

PROMPT = "red circle . blue square . a small green triangle ."


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
@pytest.mark.xfail(strict=True, reason="open (issue 20): with the whole Swin-T model cast to bfloat16 (random weights, "
                   "480x640) only 2 of 54 logit-thresholded detections matched float32 on the first full run; the "
                   "default model's test above passes. Needs autocast-style float32 norms/softmax or a better-posed "
                   "check; strict, so a fix shows up as an unexpected pass")
def test_bfloat16_swint_random_detections_match_float32():
    """Swin-T OGC (random weights) at 480x640 in bfloat16 against float32. Random BERT features saturate every
    query's sigmoid score at 1.0, so the threshold is put on the logit scale instead: a detection is a query whose
    best logit exceeds float32's 97th percentile (about 27 of 900), named by its best token; matched as above
    (same token, box within 0.01), at least 98% of them, in either direction."""
    from gdino import processing
    from gdino.shapes import category_prompt, render_scene

    torch.manual_seed(0)
    model_fp32 = GroundingDino(configs.swint_ogc()).eval()
    with torch.no_grad():
        for name, param in model_fp32.named_parameters():
            if "bbox_embed" in name and ".layers.2." in name:  # zero-initialised: would make every box the anchor
                param.normal_(0.0, 0.05)
    model_bf16 = GroundingDino(configs.swint_ogc()).eval()
    model_bf16.load_state_dict(model_fp32.state_dict())
    model_bf16 = model_bf16.to(torch.bfloat16)
    matched = total = 0
    for seed in range(2):
        image, objects = render_scene(10**12 + 900 + seed, (480, 640), num_objects=(2, 4))
        caption = category_prompt(objects, seed, num_negatives=2).caption
        pixels, _, _ = processing.preprocess([image], short_side=480, max_side=640)
        with torch.no_grad():
            reference = model_fp32(pixels, caption)
            found = model_bf16(pixels.bfloat16(), caption)
        best_fp32, token_fp32 = reference.logits[0].max(-1)
        best_bf16, token_bf16 = found.logits[0].float().max(-1)
        threshold = torch.quantile(best_fp32, 0.97)
        keep_fp32, keep_bf16 = best_fp32 > threshold, best_bf16 > threshold
        boxes_fp32, boxes_bf16 = reference.boxes[0][keep_fp32], found.boxes[0].float()[keep_bf16]
        labels_fp32, labels_bf16 = token_fp32[keep_fp32].tolist(), token_bf16[keep_bf16].tolist()
        used = torch.zeros(len(boxes_bf16), dtype=torch.bool)
        for box, label in zip(boxes_fp32, labels_fp32):
            error = (boxes_bf16 - box).abs().amax(-1)
            for j in error.argsort().tolist():
                if not used[j] and labels_bf16[j] == label and error[j] <= 0.01:
                    used[j] = True
                    matched += 1
                    break
        total += max(len(boxes_fp32), len(boxes_bf16))
    assert total >= 40
    assert matched / total >= 0.98, f"{matched} of {total} detections matched"
