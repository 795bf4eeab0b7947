"""Set losses: token-level sigmoid focal loss, L1 and GIoU on matched boxes, over every decoder layer and the
encoder's query selection; optionally the same terms on contrastive denoising queries (no matching)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gdino.boxes import cxcywh_to_xyxy, generalized_iou_matrix
from gdino.train.matcher import HungarianMatcher, build_matcher


def sigmoid_focal_loss(
    logits: torch.Tensor,  # (..., T) raw
    targets: torch.Tensor,  # (..., T) {0, 1}
    valid: torch.Tensor | None = None,  # (..., T) bool; invalid entries contribute nothing
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Element-wise focal loss (RetinaNet), summed. Masked entries (e.g. -inf padding logits) are zeroed
    before the log so they give neither loss nor NaN gradients."""
    if valid is not None:
        logits = torch.where(valid, logits, torch.zeros_like(logits))
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if valid is not None:
        loss = loss * valid
    return loss.sum()


def box_terms(pred_cxcywh: torch.Tensor, gt_cxcywh: torch.Tensor, norm: float, like: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed L1 and (1 - GIoU) of paired boxes over ``norm``; zeros that keep ``like`` in the graph when none."""
    if not pred_cxcywh.numel():
        zero = like.sum() * 0.0
        return zero, zero
    pred, gt = pred_cxcywh.float(), gt_cxcywh.to(pred_cxcywh.device).float()
    loss_bbox = F.l1_loss(pred, gt, reduction="none").sum() / norm
    giou = torch.diag(generalized_iou_matrix(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)))
    return loss_bbox, (1 - giou).sum() / norm


class SetCriterion(nn.Module):
    """Matches each prediction set to the targets and sums class, L1 and GIoU losses.

    ``forward(outputs, boxes, positive_maps, token_mask)`` takes the model output (``logits`` (B, Q, T),
    ``boxes`` (B, Q, 4) cxcywh, ``aux_outputs`` list of {logits, boxes}, ``encoder_output`` {logits, boxes})
    and returns a dict of weighted losses (``loss`` is their total) plus unweighted per-term logs.
    Losses are normalised by the number of target boxes in the batch (at least 1).
    """

    def __init__(self, matcher: HungarianMatcher, weight_class: float = 2.0, weight_bbox: float = 5.0,
                 weight_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0, aux: bool = True,
                 encoder: bool = True, denoising: dict | None = None):
        super().__init__()
        # Contrastive denoising (gdino.train.denoising): None, or {"queries", "box_noise", "label_noise"}.
        self.denoising = denoising
        self.matcher = matcher
        self.weight_class = weight_class
        self.weight_bbox = weight_bbox
        self.weight_giou = weight_giou
        self.alpha = alpha
        self.gamma = gamma
        self.aux = aux
        self.encoder = encoder

    def single(
        self,
        logits: torch.Tensor,  # (B, Q, T)
        boxes_cxcywh: torch.Tensor,  # (B, Q, 4)
        target_boxes: Sequence[torch.Tensor],  # per image (N_i, 4) cxcywh
        target_maps: Sequence[torch.Tensor],  # per image (N_i, T)
        token_mask: torch.Tensor,  # (B, T) bool
        num_boxes: float,
    ) -> dict[str, torch.Tensor]:
        indices = self.matcher(logits, boxes_cxcywh, target_boxes, target_maps)
        batch, num_queries, num_tokens = logits.shape
        class_target = torch.zeros_like(logits, dtype=torch.float32)
        for b, (q, t) in enumerate(indices):
            if len(q):
                class_target[b, q.to(logits.device)] = target_maps[b][t.to(target_maps[b].device)].float()
        valid = token_mask[:, None, :].expand(batch, num_queries, num_tokens)
        loss_class = sigmoid_focal_loss(logits.float(), class_target, valid, self.alpha, self.gamma) / num_boxes

        batch_index = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query_index = torch.cat([q for q, _ in indices]).to(logits.device)
        gt = [target_boxes[b][t.to(target_boxes[b].device)] for b, (_, t) in enumerate(indices)]
        loss_bbox, loss_giou = box_terms(boxes_cxcywh[batch_index, query_index],
                                         torch.cat(gt).to(logits.device), num_boxes, boxes_cxcywh)
        return {"class": loss_class, "bbox": loss_bbox, "giou": loss_giou}

    def denoising_terms(self, logits, boxes_cxcywh, dn, target_boxes, target_maps, token_mask, num_boxes
                        ) -> dict[str, torch.Tensor]:
        """Losses of the denoising queries (no matching: each query knows its object). Positives must give
        their object's tokens and box, negatives no token at all. Normalised per group, as the matched terms."""
        batch, num_dn, num_tokens = logits.shape
        device = logits.device
        class_target = torch.zeros(batch, num_dn, num_tokens, device=device)
        pred, gt = [], []
        for b in range(batch):
            slots = torch.nonzero(dn.valid[b] & dn.positive, as_tuple=False).flatten()
            if not len(slots):
                continue
            objects = dn.object_index[slots]
            class_target[b, slots] = target_maps[b].to(device)[objects].float()
            pred.append(boxes_cxcywh[b, slots])
            gt.append(target_boxes[b].to(device)[objects])
        valid = token_mask[:, None, :] & dn.valid[:, :, None]
        norm = num_boxes * dn.groups
        loss_class = sigmoid_focal_loss(logits.float(), class_target, valid, self.alpha, self.gamma) / norm
        loss_bbox, loss_giou = box_terms(torch.cat(pred) if pred else boxes_cxcywh.new_zeros(0, 4),
                                         torch.cat(gt) if gt else boxes_cxcywh.new_zeros(0, 4), norm, boxes_cxcywh)
        return {"class": loss_class, "bbox": loss_bbox, "giou": loss_giou}

    def forward(self, outputs, target_boxes, target_maps, token_mask, denoising=None) -> dict[str, torch.Tensor]:
        """``denoising``: the ``DenoisingQueries`` the model was run with (their outputs in ``outputs.denoising``)."""
        get = (lambda o, k: o[k]) if isinstance(outputs, dict) else (lambda o, k: getattr(o, k))
        num_boxes = max(1.0, float(sum(int(t.shape[0]) for t in target_boxes)))
        sets = [("", get(outputs, "logits"), get(outputs, "boxes"))]
        if self.aux:
            aux = get(outputs, "aux_outputs") or []
            sets += [(f"aux{i}_", a["logits"], a["boxes"]) for i, a in enumerate(aux)]
        if self.encoder:
            enc = get(outputs, "encoder_output")
            if enc is not None:
                sets.append(("enc_", enc["logits"], enc["boxes"]))
        named_terms = [(prefix, self.single(logits, boxes, target_boxes, target_maps, token_mask, num_boxes))
                       for prefix, logits, boxes in sets]
        dn_outputs = (get(outputs, "denoising") or []) if denoising is not None else []
        for index, layer in enumerate(dn_outputs):
            last = index == len(dn_outputs) - 1
            if self.aux or last:
                named_terms.append(("dn_" if last else f"dn_aux{index}_", self.denoising_terms(
                    layer["logits"], layer["boxes"], denoising, target_boxes, target_maps, token_mask, num_boxes)))
        logs: dict[str, torch.Tensor] = {}
        total = None
        for prefix, terms in named_terms:
            weighted = (self.weight_class * terms["class"] + self.weight_bbox * terms["bbox"]
                        + self.weight_giou * terms["giou"])
            total = weighted if total is None else total + weighted
            for key, value in terms.items():
                logs[f"{prefix}{key}"] = value.detach()
        logs["loss"] = total
        return logs


def build_criterion(cfg: dict) -> SetCriterion:
    """The one place the training config's loss weights are read."""

    return SetCriterion(
        build_matcher(cfg),
        weight_class=float(cfg.get("loss_class", 2.0)),
        weight_bbox=float(cfg.get("loss_bbox", 5.0)),
        weight_giou=float(cfg.get("loss_giou", 2.0)),
        alpha=float(cfg.get("focal_alpha", 0.25)),
        aux=bool(cfg.get("aux_loss", True)),
        encoder=bool(cfg.get("encoder_loss", True)),
        denoising={"queries": int(cfg.get("dn_queries", 100)), "box_noise": float(cfg.get("dn_box_noise", 0.4)),
                   "label_noise": float(cfg.get("dn_label_noise", 0.5))} if cfg.get("denoising", False) else None,
    )
