"""``GroundingDino``: the module (its ``state_dict`` keys follow the official checkpoint), its output, the text
branch with its per-prompt cache, and the convenience ``detect``/``refer`` over ``gdino.predict``."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import predict
from ..backbone import SwinBackbone
from ..config import GroundingDinoConfig
from ..text import PromptError, TextEncoding, get_tokenizer, normalize_caption, tokenize
from .layers import MLP, contrastive_logits, inverse_sigmoid, sine_position_map
from .precision import float32_region, mixed_dtype
from .text_encoder import build_text_encoder
from .transformer import Transformer

TEXT_CACHE_SIZE = 64


@dataclass
class GroundingDinoOutput:
    logits: torch.Tensor  # (B, Q, T) raw token logits, masked tokens -inf
    boxes: torch.Tensor  # (B, Q, 4) cxcywh in [0, 1]
    aux_outputs: list[dict] = field(default_factory=list)  # decoder layers 0..n-2: {"logits", "boxes"}
    encoder_output: dict = field(default_factory=dict)  # query selection: {"logits", "boxes", "indices"}
    text: TextEncoding | None = None
    denoising: list[dict] = field(default_factory=list)  # training with denoising queries: per layer {logits, boxes}


class GroundingDino(nn.Module):
    def __init__(self, config: GroundingDinoConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_dim
        self.backbone = nn.ModuleList([SwinBackbone(config.backbone)])
        self.bert = build_text_encoder(config)
        self.feat_map = nn.Linear(config.text.hidden_size, dim)
        nn.init.xavier_uniform_(self.feat_map.weight)
        nn.init.constant_(self.feat_map.bias, 0.0)

        channels = self.backbone[0].channels
        projections = [nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim)) for c in channels]
        in_channels = channels[-1]
        for _ in range(config.num_feature_levels - len(channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, dim)))
            in_channels = dim
        self.input_proj = nn.ModuleList(projections)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)

        self.transformer = Transformer(config)
        box_head = MLP(dim, dim, 4, 3)
        nn.init.constant_(box_head.layers[-1].weight, 0.0)
        nn.init.constant_(box_head.layers[-1].bias, 0.0)
        if config.decoder_bbox_embed_share:
            self.bbox_embed = nn.ModuleList([box_head] * config.decoder_layers)
        else:
            self.bbox_embed = nn.ModuleList(
                [box_head] + [MLP(dim, dim, 4, 3) for _ in range(config.decoder_layers - 1)])
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self._position_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: OrderedDict[str | tuple, TextEncoding] = OrderedDict()  # caption or token ids
        self.vocab_path: str | None = None

    # -- text ------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return get_tokenizer(self.vocab_path)

    def encode_text(self, captions: str | list[str]) -> TextEncoding:
        """Run BERT + ``feat_map`` on one caption (cached in eval mode) or a batch of captions."""
        if isinstance(captions, str):
            caption = " ".join(normalize_caption(captions).split())
            if self.training:
                return self._encode([caption])
            cached = self._text_cache.get(caption)
            if cached is None:
                # Captions that differ only in spacing tokenise alike: key the cache by the token ids.
                key = tuple(self.tokenizer(caption)["input_ids"])
                cached = self._text_cache.get(key)
                if cached is None:
                    with torch.no_grad():
                        cached = self._encode([caption])
                    self._text_cache[key] = cached
                self._text_cache[caption] = cached
                while len(self._text_cache) > 2 * TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
            self._text_cache.move_to_end(caption)
            return cached
        if not captions:
            raise PromptError("no prompt given")
        return self._encode([normalize_caption(c) for c in captions])

    def _encode(self, captions: list[str]) -> TextEncoding:
        tokens = tokenize(captions, self.tokenizer)
        if tokens.input_ids.shape[1] > self.config.max_text_len:
            raise PromptError(
                f"the prompt has {tokens.input_ids.shape[1]} tokens, more than the model's "
                f"{self.config.max_text_len}; model.detect() splits long prompts into several passes")
        device = self.feat_map.weight.device
        input_ids = tokens.input_ids.to(device)
        attention_mask = tokens.attention_mask.to(device)
        position_ids = tokens.position_ids.to(device)
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask[:, None],  # (B, 1, T, T) bool, True = may attend
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
        ).last_hidden_state
        features = self.feat_map(hidden.to(self.feat_map.weight.dtype))
        return TextEncoding(captions, input_ids, tokens.token_mask.to(device), position_ids, attention_mask,
                            features, tokens.offsets)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def train(self, mode: bool = True):
        self._text_cache.clear()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._text_cache = OrderedDict()
        self._position_cache = {}
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._text_cache.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- image -----------------------------------------------------------------------------------------------

    def _image_levels(self, images: torch.Tensor, pixel_mask: torch.Tensor):
        features = self.backbone[0](images)
        sources, masks, positions = [], [], []
        num_feats = self.config.hidden_dim // 2
        temperature = self.config.position_temperature
        for level, feature in enumerate(features):
            sources.append(self.input_proj[level](feature))
        last = features[-1]
        for level in range(len(features), self.config.num_feature_levels):
            source = self.input_proj[level](last if level == len(features) else sources[-1])
            sources.append(source)
        all_valid = not self.training and bool(pixel_mask.all())
        for source in sources:
            if all_valid:  # unpadded frames: the masks and sine maps depend on the size only
                key = (tuple(source.shape), source.device, source.dtype)
                cached = self._position_cache.get(key)
                if cached is None:
                    mask = torch.ones((source.shape[0], *source.shape[-2:]), dtype=torch.bool, device=source.device)
                    cached = (mask, sine_position_map(mask, num_feats, temperature).to(source.dtype))
                    if len(self._position_cache) > 32:
                        self._position_cache.clear()
                    self._position_cache[key] = cached
                masks.append(cached[0])
                positions.append(cached[1])
                continue
            mask = F.interpolate(pixel_mask[None].float(), size=source.shape[-2:])[0].bool()
            masks.append(mask)
            positions.append(sine_position_map(mask, num_feats, temperature).to(source.dtype))
        return sources, masks, positions

    def _as_text(self, text, batch: int) -> TextEncoding:
        if isinstance(text, TextEncoding):
            return text.expand(batch)
        if isinstance(text, str):
            return self.encode_text(text).expand(batch)
        if isinstance(text, (list, tuple)):
            if len(text) == 1:
                return self.encode_text(text[0]).expand(batch)
            if len(text) != batch:
                raise ValueError(f"{len(text)} prompts for {batch} images")
            return self.encode_text(list(text))
        raise PromptError(f"text must be a str, a list of str or a TextEncoding, got {type(text).__name__}")

    def forward(self, images: torch.Tensor | list[torch.Tensor], text, pixel_mask: torch.Tensor | None = None,
                denoising=None) -> GroundingDinoOutput:
        """images (B, 3, H, W) normalised (or a list of (3, H_i, W_i), padded here); pixel_mask (B, H, W),
        True for valid pixels. Returns logits (B, Q, T) and boxes (B, Q, 4) cxcywh in [0, 1].

        ``denoising``: contrastive denoising queries for training (``gdino.train.denoising``); their outputs come
        back separately in ``output.denoising`` and leave the matching queries' outputs unchanged."""
        if isinstance(images, (list, tuple)):
            images, pixel_mask = pad_images(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a normalised float tensor, got {images.dtype}")
        batch, _, height, width = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.bool, device=images.device)
        text = self._as_text(text, batch)
        mixed = mixed_dtype(self)  # gdino.model.precision: bfloat16 matmuls, float32 elsewhere
        with torch.autocast(images.device.type, dtype=mixed) if mixed else contextlib.nullcontext():
            sources, masks, positions = self._image_levels(images, pixel_mask.bool())
            hidden_states, references, memory_text, encoder_output = self.transformer(sources, masks, positions,
                                                                                      text, denoising)

        outputs, denoised = [], []
        num_dn = 0 if denoising is None else denoising.num_queries
        head_dtype = self.bbox_embed[0].layers[0].weight.dtype
        with float32_region(images.device):  # the class and box heads: float32 in mixed precision
            memory_text = memory_text.to(head_dtype)
            for index, (hidden, reference) in enumerate(zip(hidden_states, references)):
                hidden = hidden.to(head_dtype)
                logits = contrastive_logits(hidden, memory_text, text.token_mask)
                boxes = (self.bbox_embed[index](hidden) + inverse_sigmoid(reference)).sigmoid()
                outputs.append({"logits": logits[:, num_dn:], "boxes": boxes[:, num_dn:]})
                if num_dn:
                    denoised.append({"logits": logits[:, :num_dn], "boxes": boxes[:, :num_dn]})
        encoder_output = dict(encoder_output)
        return GroundingDinoOutput(
            logits=outputs[-1]["logits"], boxes=outputs[-1]["boxes"], aux_outputs=outputs[:-1],
            encoder_output=encoder_output, text=text, denoising=denoised,
        )

    # -- detection -------------------------------------------------------------------------------------------

    def detect(self, images, prompt, box_threshold: float = 0.35, text_threshold: float = 0.25,
               remove_combined: bool = False, short_side: int | None = None, max_side: int | None = None):
        """uint8 RGB (H, W, 3) array(s) -> per image ``Detections`` (pixel xyxy boxes, scores, phrases).

        Images are resized as the official predict does: short side ``config.input_short_side`` (800), long side
        at most ``config.input_max_side`` (1333); the small default model uses the scale it was trained at.
        Prompts past ``max_text_len`` tokens run in several passes whose detections are merged.
        A convenience over ``gdino.predict.encode`` + ``gdino.predict.detect``, the one detection path.
        """
        single = not isinstance(images, (list, tuple))
        found = predict.detect(self, [images] if single else list(images), predict.encode(self, prompt),
                               box_threshold=box_threshold, text_threshold=text_threshold,
                               remove_combined=remove_combined, short_side=short_side, max_side=max_side)
        return found[0] if single else found

    def refer(self, images, expression: str, min_score: float = 0.0):
        """Referring-expression mode: per image the single box that best matches the whole expression
        ("the large green triangle"), as a ``Detections`` with at most one entry (``gdino.predict.refer``)."""
        single = not isinstance(images, (list, tuple))
        found = predict.refer(self, [images] if single else list(images), expression, min_score=min_score)
        return found[0] if single else found


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H_i, W_i) tensors -> (B, 3, H, W) zero-padded bottom/right and a (B, H, W) valid-pixel mask."""
    if not images:
        raise ValueError("no images given")
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    mask = torch.zeros((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for index, img in enumerate(images):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image {index} must be (3, H, W), got {tuple(img.shape)}")
        batch[index, :, : img.shape[1], : img.shape[2]] = img
        mask[index, : img.shape[1], : img.shape[2]] = True
    return batch, mask
