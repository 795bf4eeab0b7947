"""Training targets: boxes and positive token maps built from the char spans of phrases in a caption."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Target:
    """Ground truth of one image.

    ``boxes_cxcywh`` (N, 4) in [0, 1] of the (unpadded) image; ``spans`` per object, the char spans in the
    caption of the phrase it answers to (a phrase may be several spans, e.g. a referring expression split in
    words; usually one).
    """

    boxes_cxcywh: torch.Tensor  # (N, 4) cxcywh in [0, 1]
    spans: list[list[tuple[int, int]]]

    def __len__(self) -> int:
        return int(self.boxes_cxcywh.shape[0])


def positive_map(
    spans: Sequence[Sequence[tuple[int, int]]],
    offsets: Sequence[tuple[int, int]],
    num_tokens: int,
) -> torch.Tensor:
    """(N, T) float {0, 1}: token t is positive for object n when its char span overlaps one of n's spans.

    ``offsets`` are the per-token (start, end) char spans of the tokenised caption ((0, 0) for special and
    padding tokens, which are never positive).
    """
    out = torch.zeros(len(spans), num_tokens)
    for n, object_spans in enumerate(spans):
        for start, end in object_spans:
            for t, (token_start, token_end) in enumerate(offsets[:num_tokens]):
                if token_end <= token_start:
                    continue
                if token_start < end and token_end > start:
                    out[n, t] = 1.0
    return out


def positive_maps(targets: Sequence[Target], offsets: Sequence[Sequence[tuple[int, int]]], num_tokens: int,
                  device=None) -> list[torch.Tensor]:
    """Positive map per image, ``(N_i, T)`` each, on ``device``."""
    return [positive_map(t.spans, o, num_tokens).to(device) for t, o in zip(targets, offsets)]
