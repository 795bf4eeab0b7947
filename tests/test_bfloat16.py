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
