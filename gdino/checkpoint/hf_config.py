"""Model configs: ours <-> Hugging Face's ``config.json``, and a config inferred from official weights alone
(their shapes), with the expected shape of every key."""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from gdino.config import GroundingDinoConfig, SwinConfig, TextConfig

from .formats import CheckpointError
from .rename import hf_to_official, num_indexed


# --------------------------------------------------------------------------------------------------------------
# Configs: ours <-> Hugging Face, and inference from official weights
# --------------------------------------------------------------------------------------------------------------


def config_to_hf(cfg: GroundingDinoConfig) -> dict:
    """A ``transformers.GroundingDinoConfig`` dict for ``cfg`` (``GroundingDinoConfig(**config_to_hf(cfg))``)."""
    bb, text = cfg.backbone, cfg.text
    temperature = cfg.position_temperature
    return {
        "model_type": "grounding-dino",
        "backbone_config": {
            "model_type": "swin",
            "embed_dim": bb.embed_dim,
            "depths": list(bb.depths),
            "num_heads": list(bb.num_heads),
            "window_size": bb.window_size,
            "patch_size": bb.patch_size,
            "mlp_ratio": bb.mlp_ratio,
            "drop_path_rate": bb.drop_path_rate,
            # HF counts the patch embedding as "stem", so our stage i is its stage i+1.
            "out_indices": [i + 1 for i in bb.out_indices],
            "image_size": 224 * (bb.window_size // 7) if bb.window_size % 7 == 0 else 224,
        },
        "text_config": {
            "model_type": "bert",
            "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_layers,
            "num_attention_heads": text.num_heads,
            "intermediate_size": text.intermediate_size,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_position_embeddings,
            "type_vocab_size": text.type_vocab_size,
            "layer_norm_eps": text.layer_norm_eps,
        },
        "use_pretrained_backbone": False,
        "d_model": cfg.hidden_dim,
        "encoder_attention_heads": cfg.num_heads,
        "decoder_attention_heads": cfg.num_heads,
        "encoder_ffn_dim": cfg.dim_feedforward,
        "decoder_ffn_dim": cfg.dim_feedforward,
        "encoder_layers": cfg.encoder_layers,
        "decoder_layers": cfg.decoder_layers,
        "num_queries": cfg.num_queries,
        "num_feature_levels": cfg.num_feature_levels,
        "encoder_n_points": cfg.encoder_points,
        "decoder_n_points": cfg.decoder_points,
        "max_text_len": cfg.max_text_len,
        "positional_embedding_temperature": int(temperature) if float(temperature).is_integer() else temperature,
        "layer_norm_eps": cfg.layer_norm_eps,
        "dropout": cfg.dropout,
        "fusion_droppath": cfg.fusion_droppath,
        "two_stage_bbox_embed_share": cfg.two_stage_bbox_embed_share,
        "decoder_bbox_embed_share": cfg.decoder_bbox_embed_share,
        "two_stage": True,
        "embedding_init_target": True,
        "query_dim": 4,
        "position_embedding_type": "sine",
        "activation_function": "relu",
    }


def _as_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise CheckpointError(f"unreadable config of type {type(config).__name__}")


def config_from_hf(hf_config: Mapping | object) -> GroundingDinoConfig:
    """Our config from a Hugging Face ``config.json`` dict (or a ``transformers.GroundingDinoConfig``).

    Raises :class:`CheckpointError` for variants this implementation does not build (another backbone or text
    encoder, one-stage, learned position embeddings, different encoder/decoder widths).
    """
    hf = _as_dict(hf_config)
    bb = _as_dict(hf.get("backbone_config"))
    text = _as_dict(hf.get("text_config"))
    problems = []

    def want(name, value, expected):
        if value is not None and value != expected:
            problems.append(f"{name}={value!r} (groundwatch builds {expected!r})")

    want("backbone_config.model_type", bb.get("model_type", "swin"), "swin")
    want("text_config.model_type", text.get("model_type", "bert"), "bert")
    want("two_stage", hf.get("two_stage"), True)
    want("embedding_init_target", hf.get("embedding_init_target"), True)
    want("query_dim", hf.get("query_dim"), 4)
    want("position_embedding_type", hf.get("position_embedding_type"), "sine")
    want("activation_function", hf.get("activation_function"), "relu")
    want("use_timm_backbone", hf.get("use_timm_backbone"), False)
    enc_heads, dec_heads = hf.get("encoder_attention_heads", 8), hf.get("decoder_attention_heads", 8)
    enc_ffn, dec_ffn = hf.get("encoder_ffn_dim", 2048), hf.get("decoder_ffn_dim", 2048)
    if enc_heads != dec_heads:
        problems.append(f"encoder/decoder heads differ ({enc_heads} vs {dec_heads})")
    if enc_ffn != dec_ffn:
        problems.append(f"encoder/decoder FFN widths differ ({enc_ffn} vs {dec_ffn})")
    if problems:
        raise CheckpointError("unsupported Hugging Face config: " + "; ".join(problems))

    swin_defaults, text_defaults, ours = SwinConfig(), TextConfig(), GroundingDinoConfig()
    out_indices = bb.get("out_indices") or [2, 3, 4]
    try:
        backbone = SwinConfig(
            embed_dim=int(bb.get("embed_dim", swin_defaults.embed_dim)),
            depths=tuple(int(d) for d in bb.get("depths", swin_defaults.depths)),
            num_heads=tuple(int(h) for h in bb.get("num_heads", swin_defaults.num_heads)),
            window_size=int(bb.get("window_size", swin_defaults.window_size)),
            patch_size=int(bb.get("patch_size", swin_defaults.patch_size)),
            mlp_ratio=float(bb.get("mlp_ratio", swin_defaults.mlp_ratio)),
            out_indices=tuple(int(i) - 1 for i in out_indices),
            drop_path_rate=float(bb.get("drop_path_rate", swin_defaults.drop_path_rate)),
        )
        text_cfg = TextConfig(
            hidden_size=int(text.get("hidden_size", text_defaults.hidden_size)),
            num_layers=int(text.get("num_hidden_layers", text_defaults.num_layers)),
            num_heads=int(text.get("num_attention_heads", text_defaults.num_heads)),
            intermediate_size=int(text.get("intermediate_size", text_defaults.intermediate_size)),
            vocab_size=int(text.get("vocab_size", text_defaults.vocab_size)),
            max_position_embeddings=int(text.get("max_position_embeddings", text_defaults.max_position_embeddings)),
            type_vocab_size=int(text.get("type_vocab_size", text_defaults.type_vocab_size)),
            layer_norm_eps=float(text.get("layer_norm_eps", text_defaults.layer_norm_eps)),
            pretrained=None,
        )
        return GroundingDinoConfig(
            backbone=backbone,
            text=text_cfg,
            hidden_dim=int(hf.get("d_model", ours.hidden_dim)),
            num_heads=int(enc_heads),
            dim_feedforward=int(enc_ffn),
            encoder_layers=int(hf.get("encoder_layers", ours.encoder_layers)),
            decoder_layers=int(hf.get("decoder_layers", ours.decoder_layers)),
            num_queries=int(hf.get("num_queries", ours.num_queries)),
            num_feature_levels=int(hf.get("num_feature_levels", ours.num_feature_levels)),
            encoder_points=int(hf.get("encoder_n_points", ours.encoder_points)),
            decoder_points=int(hf.get("decoder_n_points", ours.decoder_points)),
            max_text_len=int(hf.get("max_text_len", ours.max_text_len)),
            position_temperature=float(hf.get("positional_embedding_temperature", ours.position_temperature)),
            layer_norm_eps=float(hf.get("layer_norm_eps", ours.layer_norm_eps)),
            dropout=float(hf.get("dropout", ours.dropout)),
            fusion_droppath=float(hf.get("fusion_droppath", ours.fusion_droppath)),
            two_stage_bbox_embed_share=bool(hf.get("two_stage_bbox_embed_share", ours.two_stage_bbox_embed_share)),
            decoder_bbox_embed_share=bool(hf.get("decoder_bbox_embed_share", ours.decoder_bbox_embed_share)),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"unreadable Hugging Face config: {exc}") from None


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"cannot infer the model config: key {key} is missing")
    return tuple(state[key].shape)


_KNOWN_TEXT_HEADS = {768: 12, 384: 12, 1024: 16}


def infer_config(state: Mapping[str, torch.Tensor], num_heads: int = 8) -> GroundingDinoConfig:
    """The config of an official-layout state dict, read from its tensor shapes.

    Head counts leave no trace in the weights: the detector transformer gets ``num_heads`` (8 in every published
    model and in ``tiny``), BERT the head count of the known encoder of that width (768: bert-base, 12; 384:
    MiniLM, 12; 1024: bert-large, 16), else ``hidden_size // 64``. ``max_text_len`` stays 256.
    """
    keys = list(state)
    embed_dim, _, patch, _ = _shape(state, "backbone.0.patch_embed.proj.weight")
    stages = num_indexed(keys, r"^backbone\.0\.layers\.(\d+)\.")
    depths = tuple(num_indexed(keys, rf"^backbone\.0\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
    tables = [_shape(state, f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(stages)]
    window = int(round((math.sqrt(tables[0][0]) + 1) / 2))
    mlp_hidden = _shape(state, "backbone.0.layers.0.blocks.0.mlp.fc1.weight")[0]
    norm_pattern = re.compile(r"^backbone\.0\.norm(\d+)\.weight$")
    out_indices = tuple(sorted(int(m.group(1)) for k in keys if (m := norm_pattern.match(k))))
    vocab, text_hidden = _shape(state, "bert.embeddings.word_embeddings.weight")
    text_layers = num_indexed(keys, r"^bert\.encoder\.layer\.(\d+)\.")
    hidden_dim = _shape(state, "feat_map.weight")[0]
    levels = _shape(state, "transformer.level_embed")[0]
    enc_weights = _shape(state, "transformer.encoder.layers.0.self_attn.attention_weights.weight")[0]
    dec_weights = _shape(state, "transformer.decoder.layers.0.cross_attn.attention_weights.weight")[0]
    decoder_layers = num_indexed(keys, r"^transformer\.decoder\.layers\.(\d+)\.")

    def same(a: str, b: str) -> bool:
        pairs = [(k, b + k[len(a):]) for k in keys if k.startswith(a)]
        return bool(pairs) and all(o in state and torch.equal(state[k], state[o]) for k, o in pairs)

    shared = decoder_layers <= 1 or all(same("bbox_embed.0.", f"bbox_embed.{i}.") for i in range(1, decoder_layers))
    return GroundingDinoConfig(
        backbone=SwinConfig(
            embed_dim=embed_dim, depths=depths, num_heads=tuple(t[1] for t in tables), window_size=window,
            patch_size=patch, mlp_ratio=mlp_hidden / embed_dim, out_indices=out_indices,
        ),
        text=TextConfig(
            hidden_size=text_hidden, num_layers=text_layers,
            num_heads=_KNOWN_TEXT_HEADS.get(text_hidden, max(text_hidden // 64, 1)),
            intermediate_size=_shape(state, "bert.encoder.layer.0.intermediate.dense.weight")[0],
            vocab_size=vocab,
            max_position_embeddings=_shape(state, "bert.embeddings.position_embeddings.weight")[0],
            type_vocab_size=_shape(state, "bert.embeddings.token_type_embeddings.weight")[0],
            pretrained=None,
        ),
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        dim_feedforward=_shape(state, "transformer.encoder.layers.0.linear1.weight")[0],
        encoder_layers=num_indexed(keys, r"^transformer\.encoder\.layers\.(\d+)\."),
        decoder_layers=decoder_layers,
        num_queries=_shape(state, "transformer.tgt_embed.weight")[0],
        num_feature_levels=levels,
        encoder_points=enc_weights // (num_heads * levels),
        decoder_points=dec_weights // (num_heads * levels),
        two_stage_bbox_embed_share=same("transformer.enc_out_bbox_embed.", "bbox_embed.0."),
        decoder_bbox_embed_share=shared,
    )


def expected_shapes(cfg: GroundingDinoConfig) -> dict[str, tuple[int, ...]]:
    """Official-layout key -> shape for ``cfg``, taken from a Hugging Face model built on the meta device.

    An independent statement of what a checkpoint for ``cfg`` must hold (no memory is allocated).
    """
    from transformers import GroundingDinoConfig as HFConfig
    from transformers import GroundingDinoForObjectDetection

    with torch.device("meta"):
        hf_model = GroundingDinoForObjectDetection(HFConfig(**config_to_hf(cfg)))
    official = hf_to_official(hf_model.state_dict())
    return {key: tuple(value.shape) for key, value in official.items()}
