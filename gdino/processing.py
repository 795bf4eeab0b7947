"""Image preparation and detection post-processing, as the official Grounding DINO ``predict`` does them.

Pre-processing: uint8 RGB (H, W, 3) arrays -> resize so the short side is 800 and the long side at most 1333
(DETR's ``get_size_with_aspect_ratio``; antialiased bilinear on the 8-bit image, as PIL and torchvision do)
-> [0, 1] -> ImageNet mean/std -> zero padding at the bottom/right to a common size, with a pixel mask
(True = valid pixel).

Post-processing: sigmoid of the token logits; a query is kept when its best token probability exceeds
``box_threshold``; its phrase is made of the prompt tokens whose probability exceeds ``text_threshold``, with
position 0 and special tokens masked and "." removed from the text; ``remove_combined`` limits the phrase to the
sub-sentence around the best token. Boxes go from normalised cxcywh to xyxy pixels of the original image.

``Detections`` fields: ``boxes_xyxy`` float32 (N, 4) pixels, ``scores`` float32 (N,) best token probability,
``phrases`` list[str], ``labels`` int64 (N,) index into ``label_names`` of the prompt sub-sentence holding the
best token (-1 if it is a special token), ``label_names`` the prompt's sub-sentences in order ("red car . person ."
-> ["red car", "person"]), ``token_ids`` list of the vocabulary ids forming each phrase, ``query_indices`` int64
(N,) decoder query each detection came from.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import to_pixels_xyxy
from .text import CLS_ID, PERIOD_ID, QUESTION_ID, SEP_ID

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHORT_SIDE = 800
MAX_SIDE = 1333

# remove_combined in the official predict() splits on these only ("?" is not among them).
REMOVE_COMBINED_SEPARATOR_IDS = (CLS_ID, SEP_ID, PERIOD_ID)


class ImageError(ValueError):
    """An input image that cannot be used (wrong type, shape, dtype or empty)."""


# --------------------------------------------------------------------------------------------------------------
# Pre-processing
# --------------------------------------------------------------------------------------------------------------


def resized_size(height: int, width: int, short_side: int = SHORT_SIDE, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(height, width) after the official resize: short side ``short_side``, long side at most ``max_side``.

    DETR's ``get_size_with_aspect_ratio``, integer truncation included (so an image may come out one pixel
    different from a float-exact scale). transformers' version differs from it on a few aspect ratios.
    """
    size = short_side
    if max_side is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_side:
            size = int(round(max_side * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def validate_image(image, index: int = 0) -> np.ndarray:
    """Check one input image; returns it as a C-contiguous uint8 (H, W, 3) array or raises :class:`ImageError`."""
    name = f"image {index}"
    if isinstance(image, torch.Tensor):
        raise ImageError(f"{name}: expected a numpy uint8 (H, W, 3) RGB array, got a torch tensor "
                         "(for tensors call the model directly with normalised (B, 3, H, W) input)")
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy uint8 (H, W, 3) RGB array, got {type(image).__name__}")
    if image.ndim != 3:
        raise ImageError(f"{name}: expected shape (H, W, 3), got {tuple(image.shape)} "
                         f"({'grayscale? convert to RGB' if image.ndim == 2 else f'{image.ndim} dimensions'})")
    if image.shape[2] != 3:
        hint = " (RGBA? drop the alpha channel)" if image.shape[2] == 4 else ""
        hint = " (channels first? expected channels last)" if image.shape[0] == 3 and not hint else hint
        raise ImageError(f"{name}: expected 3 colour channels last, got shape {tuple(image.shape)}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{name}: empty image of shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8 (0-255), got {image.dtype}")
    return np.ascontiguousarray(image)


def _resize_normalise(image: np.ndarray, device, short_side: int, max_side: int) -> torch.Tensor:
    height, width = image.shape[:2]
    out_h, out_w = resized_size(height, width, short_side, max_side)
    pixels = torch.from_numpy(image).to(device).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    if (out_h, out_w) != (height, width):
        # The official pipeline resizes an 8-bit image and gets an 8-bit image back. On the CPU, torch resizes
        # uint8 natively with the fixed-point filter that matches PIL (and torchvision) exactly; elsewhere we
        # resize in float and round, which is within one 8-bit level.
        if pixels.device.type == "cpu":
            pixels = F.interpolate(pixels.contiguous(), size=(out_h, out_w), mode="bilinear", align_corners=False,
                                   antialias=True)
        else:
            pixels = F.interpolate(pixels.float(), size=(out_h, out_w), mode="bilinear", align_corners=False,
                                   antialias=True).round_().clamp_(0, 255)
    return normalize(pixels[0])  # (3, h, w)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 255] (uint8 or float) -> float32 normalised with the ImageNet mean and std.

    The one normalisation of the project: inference (``preprocess``) and training (``gdino.train.data``).
    """
    pixels = pixels.float()
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1) * 255.0
    return (pixels - mean) / std


def preprocess(images, device: str | torch.device | None = None, short_side: int = SHORT_SIDE,
               max_side: int = MAX_SIDE) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """uint8 RGB (H, W, 3) array(s) -> ``(pixel_values, pixel_mask, original_sizes)``.

    pixel_values (B, 3, H, W) float32 normalised, zero-padded bottom/right; pixel_mask (B, H, W) bool, True on
    valid pixels; original_sizes [(height, width)] of the inputs, for mapping boxes back. ``device`` is where the
    resize runs (a GPU is much faster for 1080p video).
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        validate_image(images)  # raises with the type
    if len(images) == 0:
        raise ImageError("no images given")
    arrays = [validate_image(image, i) for i, image in enumerate(images)]
    device = torch.device(device) if device is not None else torch.device("cpu")
    prepared = [_resize_normalise(a, device, short_side, max_side) for a in arrays]
    height = max(p.shape[1] for p in prepared)
    width = max(p.shape[2] for p in prepared)
    pixel_values = torch.zeros((len(prepared), 3, height, width), dtype=torch.float32, device=device)
    pixel_mask = torch.zeros((len(prepared), height, width), dtype=torch.bool, device=device)
    for i, p in enumerate(prepared):
        pixel_values[i, :, : p.shape[1], : p.shape[2]] = p
        pixel_mask[i, : p.shape[1], : p.shape[2]] = True
    return pixel_values, pixel_mask, [tuple(a.shape[:2]) for a in arrays]


# --------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Detections:
    """Detections for one image; see the module docstring for the fields."""

    boxes_xyxy: np.ndarray  # (N, 4) float32, pixels of the original image
    scores: np.ndarray  # (N,) float32
    phrases: list[str]
    labels: np.ndarray  # (N,) int64 into label_names, -1 when the best token is special
    label_names: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    query_indices: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.phrases)

    @classmethod
    def empty(cls, label_names: Sequence[str] = ()) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), [], np.zeros((0,), np.int64),
                   list(label_names), [], np.zeros((0,), np.int64))

    def to_json(self) -> list[dict]:
        return [
            {"box_xyxy": [round(float(v), 2) for v in box], "score": round(float(score), 4), "phrase": phrase,
             "label": int(label), "label_name": self.label_names[label] if 0 <= label < len(self.label_names) else None}
            for box, score, phrase, label in zip(self.boxes_xyxy, self.scores, self.phrases, self.labels)
        ]


def _input_ids(text) -> torch.Tensor:
    ids = getattr(text, "input_ids", text)
    ids = torch.as_tensor(ids)
    return ids[None] if ids.ndim == 1 else ids


def _clean_phrase(text: str) -> str:
    # The official predict() removes every "."; collapsing the spaces left behind is ours.
    return " ".join(text.replace(".", " ").split())


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    return ids | {CLS_ID, SEP_ID}


def sub_sentences(input_ids: Sequence[int], tokenizer) -> tuple[list[str], list[int]]:
    """The prompt's sub-sentences and, per token position, the index of the one it belongs to (-1 for specials).

    A sub-sentence runs from after one separator up to and including the next, like the model's text mask.
    """
    special = _special_ids(tokenizer)
    names, block_of, current = [], [], []
    for token in input_ids:
        token = int(token)
        if token in special:
            block_of.append(-1)
            if current:
                names.append(current)
                current = []
            continue
        block_of.append(len(names))
        if token in (PERIOD_ID, QUESTION_ID):
            names.append(current)
            current = []
        else:
            current.append(token)
    if current:
        names.append(current)
    return [_clean_phrase(tokenizer.decode(tokens)) for tokens in names], block_of


def _phrase_positions(probs_row: torch.Tensor, ids: list[int], special: set[int], text_threshold: float,
                      remove_combined: bool) -> list[int]:
    posmap = probs_row > text_threshold
    posmap[0] = False
    if remove_combined:
        separators = [i for i, t in enumerate(ids) if t in REMOVE_COMBINED_SEPARATOR_IDS]
        best = int(probs_row.argmax())
        slot = bisect.bisect_left(separators, best)
        left, right = separators[slot - 1], separators[slot % len(separators)]
        posmap[: left + 1] = False
        posmap[right:] = False
    return [i for i in posmap.nonzero().flatten().tolist() if ids[i] not in special]


def _batched(logits: torch.Tensor, boxes_cxcywh: torch.Tensor, text, image_sizes: Sequence[tuple[int, int]]):
    """One image's or a batch's outputs -> (logits (B, Q, T), boxes (B, Q, 4), input_ids (B, T), tokens to read)."""
    if logits.ndim == 2:
        logits, boxes_cxcywh = logits[None], boxes_cxcywh[None]
    input_ids = _input_ids(text).cpu()
    batch = logits.shape[0]
    if input_ids.shape[0] == 1 and batch > 1:
        input_ids = input_ids.expand(batch, -1)
    if len(image_sizes) != batch or input_ids.shape[0] != batch:
        raise ValueError(f"{batch} images of logits, {len(image_sizes)} sizes and {input_ids.shape[0]} prompts")
    return logits, boxes_cxcywh, input_ids, min(input_ids.shape[1], logits.shape[2])


def postprocess(logits: torch.Tensor, boxes_cxcywh: torch.Tensor, text, image_sizes: Sequence[tuple[int, int]],
                tokenizer, box_threshold: float = 0.35, text_threshold: float = 0.25,
                remove_combined: bool = False,
                prompt_labels: tuple[list[str], list[int]] | None = None) -> list[Detections]:
    """Model outputs -> one :class:`Detections` per image, as the official ``predict`` does.

    logits (B, Q, T) raw (masked tokens -inf); boxes_cxcywh (B, Q, 4) in [0, 1]; ``text`` the ``TextEncoding``
    used (or input ids (B, T)); image_sizes [(height, width)] of the original images. Detections keep the
    decoder's query order. ``prompt_labels``: :func:`sub_sentences` of a prompt shared by every image, computed
    once per prompt by the caller (``gdino.predict``) instead of decoded again for every image.
    """
    logits, boxes_cxcywh, input_ids, length = _batched(logits, boxes_cxcywh, text, image_sizes)
    batch = logits.shape[0]
    probs = logits[..., :length].detach().float().sigmoid().cpu()  # (B, Q, T); -inf -> 0
    scores = probs.max(dim=-1).values  # (B, Q)
    special = _special_ids(tokenizer)
    results = []
    for b in range(batch):
        ids = input_ids[b, :length].tolist()
        names, block_of = prompt_labels if prompt_labels is not None else sub_sentences(ids, tokenizer)
        keep = (scores[b] > box_threshold).nonzero().flatten()
        if keep.numel() == 0:
            results.append(Detections.empty(names))
            continue
        height, width = image_sizes[b]
        boxes_xyxy = to_pixels_xyxy(boxes_cxcywh[b, keep].detach().float().cpu(), height, width)
        token_ids, labels = [], []
        for q in keep.tolist():
            positions = _phrase_positions(probs[b, q].clone(), ids, special, text_threshold, remove_combined)
            token_ids.append([ids[i] for i in positions])
            labels.append(block_of[int(probs[b, q].argmax())])
        phrases = [_clean_phrase(p) for p in tokenizer.batch_decode(token_ids)]
        results.append(Detections(
            boxes_xyxy=boxes_xyxy.numpy().astype(np.float32), scores=scores[b, keep].numpy().astype(np.float32),
            phrases=phrases, labels=np.asarray(labels, np.int64), label_names=list(names), token_ids=token_ids,
            query_indices=keep.numpy().astype(np.int64),
        ))
    return results


def merge(first: Detections, second: Detections) -> Detections:
    """Detections of two passes over one image with different prompt chunks -> one set (labels renumbered)."""
    offset = len(first.label_names)
    second_labels = np.where(second.labels >= 0, second.labels + offset, -1)
    return Detections(
        boxes_xyxy=np.concatenate([first.boxes_xyxy, second.boxes_xyxy]).astype(np.float32),
        scores=np.concatenate([first.scores, second.scores]).astype(np.float32),
        phrases=first.phrases + second.phrases,
        labels=np.concatenate([first.labels, second_labels]).astype(np.int64),
        label_names=first.label_names + second.label_names,
        token_ids=first.token_ids + second.token_ids,
        query_indices=np.concatenate([first.query_indices, second.query_indices]).astype(np.int64),
    )


def referring_box(logits: torch.Tensor, boxes_cxcywh: torch.Tensor, text, image_sizes: Sequence[tuple[int, int]],
                  tokenizer, min_score: float = 0.0) -> list[Detections]:
    """Referring-expression mode: the single box that best matches the whole prompt, per image.

    A query's score is its mean probability over the expression's word tokens (specials and "."/"?" excluded),
    so every word counts, not just the best one ("the red car on the left" is not "car"). Returns at most one
    detection per image (none when the best score is not above ``min_score``); its phrase is the expression.
    """
    logits, boxes_cxcywh, input_ids, length = _batched(logits, boxes_cxcywh, text, image_sizes)
    batch = logits.shape[0]
    special = _special_ids(tokenizer) | {PERIOD_ID, QUESTION_ID}
    results = []
    for b in range(batch):
        ids = input_ids[b, :length].tolist()
        words = torch.tensor([t not in special for t in ids])
        expression = [t for t in ids if t not in special]
        name = _clean_phrase(tokenizer.decode(expression))
        if not words.any():
            results.append(Detections.empty([name]))
            continue
        probs = logits[b, :, :length].detach().float().sigmoid().cpu()  # (Q, T)
        query_scores = probs[:, words].mean(dim=1)  # (Q,)
        best = int(query_scores.argmax())
        if float(query_scores[best]) <= min_score:
            results.append(Detections.empty([name]))
            continue
        height, width = image_sizes[b]
        box = to_pixels_xyxy(boxes_cxcywh[b, best:best + 1].detach().float().cpu(), height, width)
        results.append(Detections(
            boxes_xyxy=box.numpy().astype(np.float32),
            scores=np.asarray([float(query_scores[best])], np.float32),
            phrases=[name], labels=np.zeros((1,), np.int64), label_names=[name], token_ids=[expression],
            query_indices=np.asarray([best], np.int64),
        ))
    return results
