"""Matcher, losses and positive maps on hand-built tensors (no model needed); metrics are in test_evaluate.py."""

import math

import pytest
import torch

from gdino.train.losses import SetCriterion, sigmoid_focal_loss
from gdino.train.matcher import HungarianMatcher
from gdino.train.targets import Target, positive_map

BIG = 8.0  # a confident logit


def _logits(num_queries, num_tokens, on: dict[int, list[int]]):
    logits = torch.full((1, num_queries, num_tokens), -BIG)
    for q, tokens in on.items():
        logits[0, q, tokens] = BIG
    return logits


def test_matcher_pairs_queries_with_their_boxes():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]])
    logits = _logits(3, 6, {0: [1], 1: [3, 4], 2: [1]})
    targets = torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    maps = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.float32)
    (queries, target_index), = HungarianMatcher()(logits, boxes, [targets], [maps])
    assert dict(zip(queries.tolist(), target_index.tolist())) == {1: 0, 0: 1}


def test_matcher_class_cost_breaks_a_box_tie():
    """Two queries with the same box: the one whose tokens light up the target's phrase wins."""
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = _logits(2, 5, {0: [1], 1: [3]})
    maps = torch.tensor([[0, 0, 0, 1, 0]], dtype=torch.float32)
    (queries, _), = HungarianMatcher()(logits, boxes, [torch.tensor([[0.5, 0.5, 0.2, 0.2]])], [maps])
    assert queries.tolist() == [1]


def test_matcher_with_empty_targets_and_more_targets_than_queries():
    matcher = HungarianMatcher()
    logits = torch.randn(2, 3, 4)
    boxes = torch.rand(2, 3, 4) * 0.5 + 0.25
    many = torch.rand(5, 4) * 0.5 + 0.25
    out = matcher(logits, boxes, [torch.zeros(0, 4), many], [torch.zeros(0, 4), torch.ones(5, 4)])
    assert out[0][0].numel() == 0 and out[0][1].numel() == 0
    assert out[1][0].numel() == 3 and len(set(out[1][1].tolist())) == 3


def test_matcher_survives_masked_tokens():
    """Padding tokens carry -inf logits; they must not turn the cost into NaN."""
    logits = torch.randn(1, 4, 6)
    logits[..., 4:] = float("-inf")
    maps = torch.tensor([[1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    (q, t), = HungarianMatcher()(logits, torch.rand(1, 4, 4) * 0.5 + 0.25, [torch.tensor([[0.5] * 4])], [maps])
    assert q.numel() == 1


def test_focal_loss_matches_its_definition_and_ignores_masked_entries():
    logits = torch.tensor([[2.0, -1.0, float("-inf")]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False]])
    loss = sigmoid_focal_loss(logits, targets, valid)
    p0, p1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    expected = 0.25 * (1 - p0) ** 2 * -math.log(p0) + 0.75 * p1**2 * -math.log(1 - p1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2] == 0


def test_criterion_is_near_zero_for_a_perfect_prediction_and_positive_otherwise():
    target_boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]])]
    maps = [torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.float32)]
    token_mask = torch.tensor([[True] * 6])
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3], [0.5, 0.5, 0.5, 0.5]]])
    logits = _logits(3, 6, {0: [1, 2], 1: [4]}) * 2
    aux = [{"logits": logits.clone(), "boxes": boxes.clone()}]
    outputs = {"logits": logits, "boxes": boxes, "aux_outputs": aux,
               "encoder_output": {"logits": logits.clone(), "boxes": boxes.clone()}}
    losses = SetCriterion(HungarianMatcher())(outputs, target_boxes, maps, token_mask)
    assert losses["bbox"].item() < 1e-6 and losses["giou"].item() < 1e-6 and losses["class"].item() < 1e-4
    assert {"aux0_bbox", "enc_bbox"} <= set(losses)
    moved = dict(outputs, boxes=boxes + torch.tensor([0.05, 0.0, 0.0, 0.0]))
    worse = SetCriterion(HungarianMatcher())(moved, target_boxes, maps, token_mask)
    assert worse["bbox"].item() == pytest.approx(0.05 * 2 / 2, rel=1e-4)  # L1 summed, divided by 2 boxes
    assert worse["loss"].item() > losses["loss"].item()


def test_criterion_with_no_targets_pushes_all_scores_down():
    logits = torch.zeros(1, 4, 5, requires_grad=True)
    boxes = torch.full((1, 4, 4), 0.5, requires_grad=True)
    losses = SetCriterion(HungarianMatcher(), aux=False, encoder=False)(
        {"logits": logits, "boxes": boxes}, [torch.zeros(0, 4)], [torch.zeros(0, 5)], torch.ones(1, 5, dtype=bool))
    losses["loss"].backward()
    assert losses["bbox"].item() == 0 and (logits.grad > 0).all()


def test_positive_map_from_char_spans():
    caption = "red circle . blue star ."
    offsets = [(0, 0), (0, 3), (4, 10), (11, 12), (13, 17), (18, 22), (23, 24), (0, 0), (0, 0)]
    pm = positive_map([[(13, 22)], [(0, 10)]], offsets, 9)
    assert pm[0].nonzero().flatten().tolist() == [4, 5]
    assert pm[1].nonzero().flatten().tolist() == [1, 2]
    assert caption[13:22] == "blue star"
