"""Contrastive denoising queries (DINO's CDN) for training Grounding DINO.

Each group holds, per ground-truth object, one *positive* query (its box jittered by less than the box's own
half-size times ``box_noise``: the decoder must reconstruct the true box and phrase) and one *negative* query
(jittered by between one and two times that: the decoder must say "no object"). The negatives are the anchors
that lie near an object but not on it, the ones that otherwise become duplicate detections.

Grounding has no fixed label set, so a query's content is the mean of the projected text features of its
object's phrase tokens (the features ``feat_map`` gives, before the feature enhancer). Label noise swaps that
for another phrase's features with probability ``label_noise``; the query must still answer with its true
phrase. No parameter is added to the model, so checkpoints keep the published layout.

Attention: the matching queries never see the denoising queries and the groups never see each other, so the
matching part of the decoder computes exactly what it computes without denoising (a test checks this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gdino.boxes import cxcywh_to_xyxy


@dataclass
class DenoisingQueries:
    """What the model's decoder takes, plus what the loss needs to score it.

    ``content`` (B, N, C) and ``boxes`` (B, N, 4) cxcywh in (0, 1) come before the matching queries;
    ``attention_mask(Q)`` is the decoder self-attention mask over all N + Q queries. Query ``g * 2M + k`` is the
    positive for object k of group g and ``g * 2M + M + k`` its negative (M = most objects in an image of the
    batch); ``valid`` (B, N) marks slots that stand for a real object.
    """

    content: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor  # (B, N) bool
    positive: torch.Tensor  # (N,) bool
    object_index: torch.Tensor  # (N,) long: the object (per image) of each slot
    groups: int
    max_objects: int

    @property
    def num_queries(self) -> int:
        return int(self.content.shape[1])

    def attention_mask(self, num_matching: int) -> torch.Tensor:
        """(N + Q, N + Q) bool, True where a query may attend: the matching queries see only each other, each
        denoising group sees itself and the matching queries."""
        num_dn = self.num_queries
        total = num_dn + num_matching
        device = self.content.device
        allowed = torch.ones(total, total, dtype=torch.bool, device=device)
        allowed[num_dn:, :num_dn] = False
        group = torch.arange(num_dn, device=device) // (2 * self.max_objects)
        allowed[:num_dn, :num_dn] = group[:, None] == group[None, :]
        return allowed


def jitter_boxes(boxes_cxcywh: torch.Tensor, negative: torch.Tensor, box_noise: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each corner of each box by a random fraction of its half-size: in [0, box_noise) for positives,
    [box_noise, 2 box_noise) for negatives (``negative`` (N,) bool), in a random direction. (N, 4) cxcywh."""
    xyxy = cxcywh_to_xyxy(boxes_cxcywh)
    half = boxes_cxcywh[:, 2:].repeat(1, 2) / 2
    magnitude = torch.rand(xyxy.shape, generator=generator, device=xyxy.device, dtype=xyxy.dtype)
    magnitude = magnitude + negative[:, None].to(xyxy.dtype)
    sign = torch.randint(0, 2, xyxy.shape, generator=generator, device=xyxy.device).to(xyxy.dtype) * 2 - 1
    moved = (xyxy + sign * magnitude * half * box_noise).clamp(0.0, 1.0)
    # Keep a sliver of width and height so the inverse sigmoid of the reference stays finite.
    x0 = torch.minimum(moved[:, 0], moved[:, 2])
    x1 = torch.maximum(moved[:, 0], moved[:, 2])
    y0 = torch.minimum(moved[:, 1], moved[:, 3])
    y1 = torch.maximum(moved[:, 1], moved[:, 3])
    out = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0).clamp_min(1e-3), (y1 - y0).clamp_min(1e-3)], -1)
    return out.clamp(1e-3, 1 - 1e-3)


def phrase_features(text_features: torch.Tensor, positive_map: torch.Tensor) -> torch.Tensor:
    """(T, C) token features and (N, T) positive map -> (N, C): mean feature of each object's phrase tokens."""
    weights = positive_map / positive_map.sum(-1, keepdim=True).clamp_min(1.0)
    return weights.to(text_features.dtype) @ text_features


def build_denoising(
    target_boxes: list[torch.Tensor],  # per image (N_i, 4) cxcywh
    target_maps: list[torch.Tensor],  # per image (N_i, T)
    text_features: torch.Tensor,  # (B, T, C)
    total_queries: int = 100,
    box_noise: float = 0.4,
    label_noise: float = 0.5,
    generator: torch.Generator | None = None,
) -> DenoisingQueries | None:
    """Groups of positive/negative denoising queries for a batch; None when the batch has no object.

    The number of groups is ``total_queries // (2 * max objects)`` (at least 1), DINO's dynamic grouping.
    """
    device, dtype = text_features.device, text_features.dtype
    batch = len(target_boxes)
    max_objects = max((int(b.shape[0]) for b in target_boxes), default=0)
    if max_objects == 0:
        return None
    groups = max(1, total_queries // (2 * max_objects))
    per_group = 2 * max_objects
    num_dn = groups * per_group
    dim = text_features.shape[-1]

    slot = torch.arange(num_dn, device=device)
    within = slot % per_group
    positive = within < max_objects
    object_index = within % max_objects

    content = text_features.new_zeros(batch, num_dn, dim)
    boxes = torch.full((batch, num_dn, 4), 0.5, device=device, dtype=dtype)
    boxes[..., 2:] = 0.1
    valid = torch.zeros(batch, num_dn, dtype=torch.bool, device=device)
    for b in range(batch):
        count = int(target_boxes[b].shape[0])
        if count == 0:
            continue
        use = object_index < count
        objects = object_index[use]
        phrase = phrase_features(text_features[b], target_maps[b].to(device))  # (N_b, C)
        chosen = objects.clone()
        if label_noise > 0 and count > 1:
            swap = torch.rand(objects.shape, generator=generator, device=device) < label_noise
            other = torch.randint(0, count, objects.shape, generator=generator, device=device)
            chosen = torch.where(swap, other, objects)
        content[b, use] = phrase[chosen]
        boxes[b, use] = jitter_boxes(target_boxes[b].to(device, dtype)[objects], ~positive[use], box_noise,
                                     generator)
        valid[b, use] = True
    return DenoisingQueries(content, boxes, valid, positive, object_index, groups, max_objects)
