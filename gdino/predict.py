"""The one detection path: prompt -> encoding (once), frames + encoding -> detections.

``GroundingDino.detect``/``refer``, ``groundwatch detect`` and the daemon's detector all come through here, so
pre-processing (``gdino.processing.preprocess``), the forward pass and post-processing are the same everywhere:

    encoding = encode(model, "red car . person .")       # tokenise, BERT + feat_map, sub-sentence names: once
    found = detect(model, frames, encoding)               # per batch of uint8 RGB (H, W, 3) frames
    best = refer(model, frames, "the large green triangle")

Images are resized to the model's own scale (``config.input_short_side``/``input_max_side``: 800/1333 for the
published weights, the training scale for the small default model) unless the caller asks for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import processing
from .processing import Detections
from .text import TextEncoding, chunk_caption, normalize_caption


@dataclass(frozen=True)
class PromptPass:
    """One window of a prompt through the text encoder, with what post-processing needs to name its boxes."""

    text: TextEncoding  # one caption: input_ids (1, T), features (1, T, hidden)
    label_names: tuple[str, ...]  # the caption's sub-sentences ("red car . person ." -> ("red car", "person"))
    label_of_position: tuple[int, ...]  # per token position, index into label_names (-1 for special tokens)


@dataclass(frozen=True)
class PromptEncoding:
    """A prompt ready to run on any number of frames: one pass per text-encoder window (long prompts: several)."""

    prompt: str
    passes: tuple[PromptPass, ...]

    @property
    def label_names(self) -> list[str]:
        return [name for prompt_pass in self.passes for name in prompt_pass.label_names]


def _prompt_pass(model, text: TextEncoding) -> PromptPass:
    names, label_of_position = processing.sub_sentences(text.input_ids[0].tolist(), model.tokenizer)
    return PromptPass(text, tuple(names), tuple(label_of_position))


@torch.no_grad()
def encode(model, prompt: str | TextEncoding) -> PromptEncoding:
    """Tokenise and encode ``prompt`` once (split into several passes past ``config.max_text_len`` tokens).

    A ready single-caption ``TextEncoding`` is wrapped as it is. Raises ``gdino.text.PromptError`` for a prompt
    with no words or a phrase longer than the text window.
    """
    if isinstance(prompt, TextEncoding):
        return PromptEncoding(prompt.captions[0], (_prompt_pass(model, prompt),))
    caption = normalize_caption(prompt)
    captions = chunk_caption(caption, model.config.max_text_len, model.tokenizer)
    return PromptEncoding(caption, tuple(_prompt_pass(model, model.encode_text(c)) for c in captions))


def _pixels(model, frames, short_side: int | None, max_side: int | None):
    """uint8 RGB frames -> (pixel_values (B, 3, H, W) normalised in the model's dtype, pixel_mask, sizes).

    The resize runs on the model's device (a GPU is much faster for 1080p video)."""
    parameter = model.feat_map.weight
    pixel_values, pixel_mask, sizes = processing.preprocess(
        list(frames), device=parameter.device, short_side=short_side or model.config.input_short_side,
        max_side=max_side or model.config.input_max_side)
    return pixel_values.to(dtype=parameter.dtype), pixel_mask, sizes


@torch.no_grad()
def detect(model, frames: Sequence[np.ndarray], encoding: PromptEncoding, *, box_threshold: float = 0.35,
           text_threshold: float = 0.25, remove_combined: bool = False, short_side: int | None = None,
           max_side: int | None = None) -> list[Detections]:
    """uint8 RGB (H, W, 3) frames -> one ``Detections`` per frame (pixel xyxy boxes, scores, phrases).

    Thresholds and ``remove_combined`` as the official ``predict`` (``gdino.processing.postprocess``). The passes of
    a long prompt run one after the other on the same pixels; their detections are merged, labels renumbered.
    """
    pixel_values, pixel_mask, sizes = _pixels(model, frames, short_side, max_side)
    results = None
    for prompt_pass in encoding.passes:
        out = model(pixel_values, prompt_pass.text, pixel_mask=pixel_mask)
        found = processing.postprocess(
            out.logits.float(), out.boxes.float(), prompt_pass.text, sizes, model.tokenizer,
            box_threshold=box_threshold, text_threshold=text_threshold, remove_combined=remove_combined,
            prompt_labels=(list(prompt_pass.label_names), list(prompt_pass.label_of_position)))
        results = found if results is None else [processing.merge(a, b) for a, b in zip(results, found)]
    return results


@torch.no_grad()
def refer(model, frames: Sequence[np.ndarray], expression: str | TextEncoding, *, min_score: float = 0.0,
          short_side: int | None = None, max_side: int | None = None) -> list[Detections]:
    """Referring-expression mode: per frame the single box that best matches the whole expression ("the large
    green triangle"), as a ``Detections`` with at most one entry (``gdino.processing.referring_box``)."""
    pixel_values, pixel_mask, sizes = _pixels(model, frames, short_side, max_side)
    text = expression if isinstance(expression, TextEncoding) else model.encode_text(expression)
    out = model(pixel_values, text, pixel_mask=pixel_mask)
    return processing.referring_box(out.logits.float(), out.boxes.float(), text, sizes, model.tokenizer,
                                    min_score=min_score)
