"""Checkpoint layouts, key mapping and safe I/O.

Three layouts are read, one is used inside groundwatch:

- **official** (``groundingdino_swint_ogc.pth`` and friends): a torch pickle with the weights under ``"model"``,
  keys ``backbone.0.*``, ``bert.*``, ``feat_map.*``, ``input_proj.*``, ``transformer.*``, ``bbox_embed.*``. This is
  the layout of ``gdino.model.GroundingDino.state_dict()``, so it is the working layout of this module.
- **Hugging Face** (``config.json`` + ``model.safetensors``, as ``GroundingDinoForObjectDetection.save_pretrained``
  writes it): keys under ``model.*``, q/k/v projections split. Two spellings exist: the one on disk (``"saved"``:
  hub files and ``save_pretrained`` output) and the in-memory ``state_dict()`` of transformers 5 (``"module"``:
  Swin under ``swin.``, ``q_proj``/``k_proj``/``v_proj``/``o_proj``). Both are read; either can be written.
- **groundwatch** (``groundwatch convert`` output): a folder with ``groundwatch.json`` (format version and our
  config) and ``model.safetensors`` in the official key layout, plus ``vocab.txt`` when the source had one.

Nothing here unpickles arbitrary objects: ``.pth`` files are read with ``torch.load(weights_only=True)`` and
everything else is safetensors. Every failure is a :class:`CheckpointError` with a message meant for a person.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from gdino.config import GroundingDinoConfig, SwinConfig, TextConfig

FORMAT_NAME = "groundwatch"
FORMAT_VERSION = 1
CONFIG_FILE = "groundwatch.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.txt"

StateDict = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A weights file or folder that cannot be used, with a message that says why."""


# --------------------------------------------------------------------------------------------------------------
# Rename table, official <-> Hugging Face ("saved" spelling)
# --------------------------------------------------------------------------------------------------------------

_HF_SWIN = "model.backbone.conv_encoder.model."
_QKV = ("query", "key", "value")


@dataclass(frozen=True)
class _Rule:
    """One family of keys. ``official`` and ``hf`` are templates with ``{i}``/``{j}``/``{k}`` digit fields.

    kind "prefix": the templates are key prefixes; whatever follows is copied unchanged.
    kind "fused": ``official`` names a fused (3d, ...) tensor with a ``{p}`` field (weight/bias) and ``hf`` the three
    split tensors with ``{qkv}`` (query/key/value) and ``{p}`` fields; q, k, v are stacked in that order on dim 0.
    ``hf_shift`` adds a constant to a digit field on the way to Hugging Face (Swin stage norms: norm{k} -> stage{k+1}).
    """

    official: str
    hf: str
    kind: str = "prefix"
    hf_shift: tuple[tuple[str, int], ...] = ()


def _layer_rules(official_prefix: str, hf_prefix: str, pairs: Iterable[tuple[str, str]]) -> list[_Rule]:
    return [_Rule(official_prefix + o, hf_prefix + h) for o, h in pairs]


def _build_rules() -> list[_Rule]:
    rules: list[_Rule] = []
    # Swin image backbone.
    block_o = "backbone.0.layers.{i}.blocks.{j}."
    block_h = _HF_SWIN + "encoder.layers.{i}.blocks.{j}."
    rules += [
        _Rule("backbone.0.patch_embed.proj.", _HF_SWIN + "embeddings.patch_embeddings.projection."),
        _Rule("backbone.0.patch_embed.norm.", _HF_SWIN + "embeddings.norm."),
        _Rule(block_o + "attn.qkv.{p}", block_h + "attention.self.{qkv}.{p}", kind="fused"),
        *_layer_rules(block_o, block_h, [
            ("norm1.", "layernorm_before."),
            ("norm2.", "layernorm_after."),
            ("attn.proj.", "attention.output.dense."),
            ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
            ("mlp.fc1.", "intermediate.dense."),
            ("mlp.fc2.", "output.dense."),
        ]),
        _Rule("backbone.0.layers.{i}.downsample.", _HF_SWIN + "encoder.layers.{i}.downsample."),
        # The official code numbers the per-level norms by stage index (0-based), HF by "stage{n}" (1-based).
        _Rule("backbone.0.norm{k}.", _HF_SWIN + "hidden_states_norms.stage{k}.", hf_shift=(("k", 1),)),
    ]
    # Text backbone and its projection; multi-scale input projections.
    rules += [
        _Rule("bert.", "model.text_backbone."),
        _Rule("feat_map.", "model.text_projection."),
        _Rule("input_proj.", "model.input_proj_vision."),
    ]
    # Transformer-level parameters.
    rules += [
        _Rule("transformer.level_embed", "model.level_embed"),
        _Rule("transformer.tgt_embed.", "model.query_position_embeddings."),
        _Rule("transformer.enc_output_norm.", "model.enc_output_norm."),
        _Rule("transformer.enc_output.", "model.enc_output."),
        _Rule("transformer.enc_out_bbox_embed.", "model.encoder_output_bbox_embed."),
        _Rule("transformer.decoder.norm.", "model.decoder.layer_norm."),
        _Rule("transformer.decoder.ref_point_head.", "model.decoder.reference_points_head."),
    ]
    # Feature enhancer: deformable image self-attention, text self-attention, image<->text fusion.
    rules += _layer_rules("transformer.encoder.layers.{i}.", "model.encoder.layers.{i}.deformable_layer.", [
        ("self_attn.", "self_attn."),
        ("norm1.", "self_attn_layer_norm."),
        ("linear1.", "fc1."),
        ("linear2.", "fc2."),
        ("norm2.", "final_layer_norm."),
    ])
    text_o = "transformer.encoder.text_layers.{i}."
    text_h = "model.encoder.layers.{i}.text_enhancer_layer."
    rules.append(_Rule(text_o + "self_attn.in_proj_{p}", text_h + "self_attn.{qkv}.{p}", kind="fused"))
    rules += _layer_rules(text_o, text_h, [
        ("self_attn.out_proj.", "self_attn.out_proj."),
        ("linear1.", "fc1."),
        ("linear2.", "fc2."),
        ("norm1.", "layer_norm_before."),
        ("norm2.", "layer_norm_after."),
    ])
    rules += _layer_rules("transformer.encoder.fusion_layers.{i}.", "model.encoder.layers.{i}.fusion_layer.", [
        ("gamma_v", "vision_param"),
        ("gamma_l", "text_param"),
        ("layer_norm_v.", "layer_norm_vision."),
        ("layer_norm_l.", "layer_norm_text."),
        ("attn.v_proj.", "attn.vision_proj."),
        ("attn.l_proj.", "attn.text_proj."),
        ("attn.values_v_proj.", "attn.values_vision_proj."),
        ("attn.values_l_proj.", "attn.values_text_proj."),
        ("attn.out_v_proj.", "attn.out_vision_proj."),
        ("attn.out_l_proj.", "attn.out_text_proj."),
    ])
    # Decoder layers: text cross-attention and query self-attention are nn.MultiheadAttention (fused in_proj).
    dec_o = "transformer.decoder.layers.{i}."
    dec_h = "model.decoder.layers.{i}."
    rules += [
        _Rule(dec_o + "ca_text.in_proj_{p}", dec_h + "encoder_attn_text.{qkv}.{p}", kind="fused"),
        _Rule(dec_o + "self_attn.in_proj_{p}", dec_h + "self_attn.{qkv}.{p}", kind="fused"),
    ]
    rules += _layer_rules(dec_o, dec_h, [
        ("cross_attn.", "encoder_attn."),
        ("norm1.", "encoder_attn_layer_norm."),
        ("ca_text.out_proj.", "encoder_attn_text.out_proj."),
        ("catext_norm.", "encoder_attn_text_layer_norm."),
        ("self_attn.out_proj.", "self_attn.out_proj."),
        ("norm2.", "self_attn_layer_norm."),
        ("linear1.", "fc1."),
        ("linear2.", "fc2."),
        ("norm3.", "final_layer_norm."),
    ])
    return rules


_RULES = _build_rules()

# The box head is one module that appears under several names (shared across decoder layers in the published
# models, and always aliased as transformer.decoder.bbox_embed); it is handled apart from the table.
_OFFICIAL_BOX = re.compile(r"^(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.(.+)$")
_HF_BOX = re.compile(r"^(?:model\.decoder\.)?bbox_embed\.(\d+)\.(.+)$")

# Keys that exist in some files but are not weights of the model: dropped on read, never written.
_OFFICIAL_IGNORED = (
    re.compile(r"^bert\.pooler\."),  # BERT pooler: Grounding DINO never uses the pooled output
    re.compile(r"^bert\.embeddings\.(position_ids|token_type_ids)$"),  # buffers of older transformers
    re.compile(r"\.attn\.relative_position_index$"),  # Swin buffers, rebuilt from the window size
    re.compile(r"\.attn_mask$"),
)
_HF_IGNORED = (
    re.compile(r"^model\.backbone\.conv_encoder\.model\.(swin\.)?layernorm\."),  # SwinModel's final norm, unused
    re.compile(r"^model\.text_backbone\.pooler\."),
    re.compile(r"^model\.text_backbone\.embeddings\.(position_ids|token_type_ids)$"),
    re.compile(r"relative_position_index$"),
)

# The in-memory spelling of transformers 5 ("module") vs the on-disk spelling ("saved"), Swin only.
_MODULE_TO_SAVED = (
    (_HF_SWIN + "swin.embeddings.", _HF_SWIN + "embeddings."),
    (_HF_SWIN + "swin.encoder.", _HF_SWIN + "encoder."),
)
_MODULE_BLOCK_TO_SAVED = (
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
_SAVED_BLOCK = re.compile(r"^(model\.backbone\.conv_encoder\.model\.encoder\.layers\.\d+\.blocks\.\d+\.)(.*)$")


def _compile(template: str, prefix: bool) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for part in parts:
        if part in ("{i}", "{j}", "{k}"):
            out.append(rf"(?P<{part[1:-1]}>\d+)")
        elif part == "{p}":
            out.append(r"(?P<p>weight|bias)")
        elif part == "{qkv}":
            out.append(r"(?P<qkv>query|key|value)")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + ("(?P<rest>.*)$" if prefix else "$"))


_COMPILED = [
    (rule, _compile(rule.official, rule.kind == "prefix"), _compile(rule.hf, rule.kind == "prefix"))
    for rule in _RULES
]


def _fill(template: str, fields: Mapping[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: str(fields[m.group(1)]), template)


def _shifted(fields: dict, shift: Iterable[tuple[str, int]], sign: int) -> dict:
    fields = dict(fields)
    for name, delta in shift:
        fields[name] = int(fields[name]) + sign * delta
    return fields


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _num_indexed(keys: Iterable[str], pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in keys if (m := regex.match(key))}
    return max(found) + 1 if found else 0


def _to_saved_spelling(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rewrite transformers-5 in-memory Swin names to the on-disk names; other keys pass through."""
    out: StateDict = {}
    for key, value in state.items():
        for module_prefix, saved_prefix in _MODULE_TO_SAVED:
            if key.startswith(module_prefix):
                key = saved_prefix + key[len(module_prefix):]
                break
        if match := _SAVED_BLOCK.match(key):
            head, tail = match.groups()
            for module_name, saved_name in _MODULE_BLOCK_TO_SAVED:
                if tail.startswith(module_name):
                    key = head + saved_name + tail[len(module_name):]
                    break
        out[key] = value
    return out


def _to_module_spelling(state: Mapping[str, torch.Tensor]) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        if match := _SAVED_BLOCK.match(key):
            head, tail = match.groups()
            for module_name, saved_name in _MODULE_BLOCK_TO_SAVED:
                if tail.startswith(saved_name):
                    key = head + module_name + tail[len(saved_name):]
                    break
        for module_prefix, saved_prefix in _MODULE_TO_SAVED:
            if key.startswith(saved_prefix):
                key = module_prefix + key[len(saved_prefix):]
                break
        out[key] = value
    return out


def is_hf_layout(keys: Iterable[str]) -> bool:
    return any(key.startswith(("model.backbone.", "model.text_backbone.", "model.encoder.")) for key in keys)


def is_official_layout(keys: Iterable[str]) -> bool:
    return any(key.startswith(("backbone.0.", "bert.", "transformer.")) for key in keys)


def hf_to_official(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Map a Hugging Face ``GroundingDinoForObjectDetection`` state dict to the official layout.

    Accepts the on-disk spelling and the transformers-5 in-memory spelling. q/k/v projections are stacked into the
    official fused tensors; the box head, stored once on disk when shared, is repeated under every decoder index
    and under its ``transformer.decoder.bbox_embed`` alias, as in the official files. Known unused keys (Swin's
    final ``layernorm``, BERT pooler, buffers) are dropped; any other key that maps nowhere raises
    :class:`CheckpointError`.
    """
    state = _to_saved_spelling(state)
    out: StateDict = {}
    fused_parts: dict[str, dict[str, torch.Tensor]] = {}
    boxes: dict[int, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in state.items():
        if any(pattern.search(key) for pattern in _HF_IGNORED):
            continue
        if match := _HF_BOX.match(key):
            index, rest = int(match.group(1)), match.group(2)
            # Prefer the top-level copy; the decoder alias is the same module.
            if key.startswith("bbox_embed.") or rest not in boxes.get(index, {}):
                boxes.setdefault(index, {})[rest] = value
            continue
        for rule, official_re, hf_re in _COMPILED:
            match = hf_re.match(key)
            if not match:
                continue
            fields = _shifted(match.groupdict(), rule.hf_shift, -1)
            if rule.kind == "prefix":
                out[_fill(rule.official, fields) + fields["rest"]] = value
            else:
                fused_parts.setdefault(_fill(rule.official, fields), {})[fields["qkv"]] = value
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} Hugging Face keys have no official name: {_format_keys(unmapped)}")
    incomplete = {k: sorted(set(_QKV) - set(parts)) for k, parts in fused_parts.items() if len(parts) != 3}
    if incomplete:
        detail = "; ".join(f"{k} lacks {'/'.join(v)}" for k, v in sorted(incomplete.items())[:10])
        raise CheckpointError(f"incomplete query/key/value projections: {detail}")
    for key, parts in fused_parts.items():
        out[key] = torch.cat([parts[name] for name in _QKV], dim=0)
    num_decoder_layers = _num_indexed(state, r"^model\.decoder\.layers\.(\d+)\.")
    if boxes:
        if 0 not in boxes:
            raise CheckpointError("the box head bbox_embed.0 is missing")
        for index in range(max(num_decoder_layers, max(boxes) + 1)):
            # save_pretrained stores a shared head once, under index 0.
            params = boxes.get(index, boxes[0])
            for rest, value in params.items():
                out[f"bbox_embed.{index}.{rest}"] = value
                out[f"transformer.decoder.bbox_embed.{index}.{rest}"] = value
    return out


def official_to_hf(state: Mapping[str, torch.Tensor], layout: str = "saved") -> StateDict:
    """Map an official-layout state dict to Hugging Face names.

    ``layout="saved"``: the names ``save_pretrained`` writes (a shared box head once, as ``bbox_embed.0``);
    ``layout="module"``: the keys of ``GroundingDinoForObjectDetection.state_dict()`` in the installed transformers 5
    (every alias present), ready for ``load_state_dict(strict=True)``. Both include Swin's unused final
    ``layernorm`` as an identity norm, because transformers 5 carries one.
    """
    if layout not in ("saved", "module"):
        raise ValueError(f"layout must be 'saved' or 'module', not {layout!r}")
    out: StateDict = {}
    boxes: dict[int, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in state.items():
        if any(pattern.search(key) for pattern in _OFFICIAL_IGNORED):
            continue
        if match := _OFFICIAL_BOX.match(key):
            index, rest = int(match.group(1)), match.group(2)
            if key.startswith("bbox_embed.") or rest not in boxes.get(index, {}):
                boxes.setdefault(index, {})[rest] = value
            continue
        for rule, official_re, hf_re in _COMPILED:
            match = official_re.match(key)
            if not match:
                continue
            fields = match.groupdict()
            if rule.kind == "prefix":
                out[_fill(rule.hf, _shifted(fields, rule.hf_shift, +1)) + fields["rest"]] = value
            else:
                if value.shape[0] % 3:
                    raise CheckpointError(f"{key}: fused q/k/v tensor of shape {tuple(value.shape)} is not 3*d wide")
                for name, part in zip(_QKV, value.chunk(3, dim=0)):
                    out[_fill(rule.hf, {**fields, "qkv": name})] = part
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} keys are not part of the official layout: {_format_keys(unmapped)}")
    shared = bool(boxes) and all(
        boxes[i].keys() == boxes[0].keys() and all(torch.equal(boxes[i][r], boxes[0][r]) for r in boxes[0])
        for i in boxes
    )
    for index, params in sorted(boxes.items()):
        for rest, value in params.items():
            if layout == "module":
                out[f"bbox_embed.{index}.{rest}"] = value
                out[f"model.decoder.bbox_embed.{index}.{rest}"] = value
            elif index == 0 or not shared:
                out[f"bbox_embed.{index}.{rest}"] = value
    patch = state.get("backbone.0.patch_embed.proj.weight")
    if patch is not None:
        stages = _num_indexed(state, r"^backbone\.0\.layers\.(\d+)\.")
        width = patch.shape[0] * 2 ** max(stages - 1, 0)
        # transformers 5 spells this key the same way in memory and on disk.
        out[_HF_SWIN + "swin.layernorm.weight"] = torch.ones(width, dtype=patch.dtype)
        out[_HF_SWIN + "swin.layernorm.bias"] = torch.zeros(width, dtype=patch.dtype)
    return _to_module_spelling(out) if layout == "module" else out


def drop_ignored_official(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove keys an official file may carry that are not weights (BERT pooler, Swin index buffers, ...)."""
    return {k: v for k, v in state.items() if not any(p.search(k) for p in _OFFICIAL_IGNORED)}


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
    stages = _num_indexed(keys, r"^backbone\.0\.layers\.(\d+)\.")
    depths = tuple(_num_indexed(keys, rf"^backbone\.0\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
    tables = [_shape(state, f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(stages)]
    window = int(round((math.sqrt(tables[0][0]) + 1) / 2))
    mlp_hidden = _shape(state, "backbone.0.layers.0.blocks.0.mlp.fc1.weight")[0]
    norm_pattern = re.compile(r"^backbone\.0\.norm(\d+)\.weight$")
    out_indices = tuple(sorted(int(m.group(1)) for k in keys if (m := norm_pattern.match(k))))
    vocab, text_hidden = _shape(state, "bert.embeddings.word_embeddings.weight")
    text_layers = _num_indexed(keys, r"^bert\.encoder\.layer\.(\d+)\.")
    hidden_dim = _shape(state, "feat_map.weight")[0]
    levels = _shape(state, "transformer.level_embed")[0]
    enc_weights = _shape(state, "transformer.encoder.layers.0.self_attn.attention_weights.weight")[0]
    dec_weights = _shape(state, "transformer.decoder.layers.0.cross_attn.attention_weights.weight")[0]
    decoder_layers = _num_indexed(keys, r"^transformer\.decoder\.layers\.(\d+)\.")

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
        encoder_layers=_num_indexed(keys, r"^transformer\.encoder\.layers\.(\d+)\."),
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


# --------------------------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------------------------


def _shape_of(value) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(int(v) for v in value)
    return None


def check_keys(expected, got, *, what: str = "checkpoint") -> None:
    """Strict accounting: raise :class:`CheckpointError` unless ``got`` has exactly the keys of ``expected``.

    ``expected``/``got``: mappings of key -> tensor or shape (shapes are then compared too), or iterables of keys.
    The message lists missing keys, unexpected keys and shape mismatches, sorted and truncated to a readable length.
    """
    expected_map = expected if isinstance(expected, Mapping) else dict.fromkeys(expected)
    got_map = got if isinstance(got, Mapping) else dict.fromkeys(got)
    missing = sorted(set(expected_map) - set(got_map))
    unexpected = sorted(set(got_map) - set(expected_map))
    mismatched = []
    for key in sorted(set(expected_map) & set(got_map)):
        want, have = _shape_of(expected_map[key]), _shape_of(got_map[key])
        if want is not None and have is not None and want != have:
            mismatched.append(f"{key} {have} (expected {want})")
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: {_format_keys(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_format_keys(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatches: {_format_keys(mismatched, limit=10)}")
    raise CheckpointError("\n".join(lines))


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str = "checkpoint") -> None:
    """Load ``state`` (official key layout) into ``model`` after strict accounting (:func:`check_keys`).

    The one place weights enter a model (``gdino.load``, resuming training). The text encoder (``bert.*``) may be
    absent only when the model's config builds it from its package (``text.pretrained``, e.g. the frozen MiniLM
    of the default model, which is not written into checkpoints); its weights then went through the same check
    when the model was built (``gdino.model.text_encoder``).
    """
    expected = model.state_dict()
    if model.config.text.pretrained is not None and not any(key.startswith("bert.") for key in state):
        expected = {key: value for key, value in expected.items() if not key.startswith("bert.")}
    check_keys(expected, state, what=what)
    full = model.state_dict()
    full.update(state)
    model.load_state_dict(full, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------------------------


def _load_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt? ({exc})") from None


def _load_torch(path: Path) -> dict:
    import pickle

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0]
        if "Weights only load failed" in reason:
            reason = "it holds Python objects besides tensors, which groundwatch refuses to unpickle"
        raise CheckpointError(f"{path}: not a loadable weights file ({reason})") from None
    except Exception as exc:  # torch.load fails on garbage in many ways (RuntimeError, EOFError, IndexError, ...)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch file, truncated or corrupt? ({reason})") from None
    return data


def _tensors_only(data, path: Path) -> StateDict:
    if isinstance(data, Mapping):
        for wrapper in ("model", "state_dict", "module"):
            if wrapper in data and isinstance(data[wrapper], Mapping):
                data = data[wrapper]
                break
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict of tensors, found {type(data).__name__})")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a checkpoint (entries that are not tensors: {_format_keys(map(str, bad))})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in data.items()}


def _to_official(state: StateDict, path: Path) -> StateDict:
    if is_hf_layout(state):
        return hf_to_official(state)
    if is_official_layout(state):
        return drop_ignored_official(state)
    raise CheckpointError(
        f"{path}: unknown weights layout (neither official Grounding DINO nor Hugging Face); "
        f"first keys: {_format_keys(list(state)[:5], limit=5)}"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _load_hf_weights(folder: Path) -> StateDict:
    single = folder / WEIGHTS_FILE
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        state: StateDict = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            state.update(_load_safetensors(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return _tensors_only(_load_torch(folder / "pytorch_model.bin"), folder / "pytorch_model.bin")
    raise CheckpointError(f"{folder}: Hugging Face folder without weights (no {WEIGHTS_FILE})")


def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, GroundingDinoConfig | None, Path | None]:
    """Read weights in any supported layout; returns ``(state_dict in the official layout, config, vocab path)``.

    ``config`` is None for bare weight files (official ``.pth``, lone ``.safetensors``); use :func:`infer_config`.
    ``vocab`` is the folder's ``vocab.txt`` when it has one.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"weights not found: {path}")
    if path.is_dir():
        vocab = path / VOCAB_FILE if (path / VOCAB_FILE).is_file() else None
        if (path / CONFIG_FILE).is_file():
            meta = _read_json(path / CONFIG_FILE)
            if meta.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{path / CONFIG_FILE}: not a groundwatch config (format={meta.get('format')!r})")
            if meta.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: groundwatch format version {meta.get('format_version')!r}, this version reads "
                    f"{FORMAT_VERSION}"
                )
            try:
                config = GroundingDinoConfig.from_dict(meta["config"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path / CONFIG_FILE}: bad model config ({exc})") from None
            if not (path / WEIGHTS_FILE).is_file():
                raise CheckpointError(f"{path}: groundwatch folder without {WEIGHTS_FILE}")
            return _to_official(_load_safetensors(path / WEIGHTS_FILE), path), config, vocab
        if (path / "config.json").is_file():
            config = config_from_hf(_read_json(path / "config.json"))
            state = _load_hf_weights(path)
            if not is_hf_layout(state):
                raise CheckpointError(f"{path}: config.json present but the weights are not in the Hugging Face layout")
            return hf_to_official(state), config, vocab
        raise CheckpointError(f"{path}: folder is not a checkpoint (no {CONFIG_FILE} or config.json)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    with path.open("rb") as handle:
        head = handle.read(9)
    # safetensors starts with a little-endian u64 header length followed by '{'; torch files are zip or pickle.
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        state = _load_safetensors(path)
    else:
        state = _tensors_only(_load_torch(path), path)
    return _to_official(state, path), None, None


def _distinct_storage(state: Mapping[str, torch.Tensor]) -> StateDict:
    """safetensors refuses tensors that share memory; aliases (the shared box head) are written as copies."""
    seen: set[tuple[int, int]] = set()
    out: StateDict = {}
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ident in seen else value
        seen.add(ident)
    return out


def save(state: Mapping[str, torch.Tensor], config: GroundingDinoConfig, dst: str | os.PathLike,
         vocab_path: str | os.PathLike | None = None) -> Path:
    """Write ``state`` (official layout) and ``config`` as a groundwatch folder at ``dst``; returns ``dst``.

    The folder is assembled next to ``dst`` and moved into place, so a crash never leaves half a checkpoint.
    """
    from safetensors.torch import save_file

    dst = Path(dst).expanduser()
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / CONFIG_FILE).is_file():
        raise CheckpointError(f"{dst}: folder is not empty and is not a groundwatch checkpoint; refusing to overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        save_file(_distinct_storage(state), str(staging / WEIGHTS_FILE),
                  metadata={"format": "pt", "layout": "official", "producer": FORMAT_NAME})
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config.to_dict()}
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if vocab_path is not None:
            shutil.copyfile(vocab_path, staging / VOCAB_FILE)
        if dst.exists():
            shutil.rmtree(dst)
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def convert(src: str | os.PathLike, dst: str | os.PathLike,
            check: Callable[[GroundingDinoConfig, StateDict], None] | None = None) -> tuple[Path, GroundingDinoConfig]:
    """Read ``src`` in any layout, verify it against its config and write a groundwatch folder at ``dst``.

    ``check(config, state)`` replaces the default verification (:func:`check_keys` against
    :func:`expected_shapes`); ``gdino.load`` users may pass one that builds the model itself.
    """
    state, config, vocab = read_checkpoint(src)
    if config is None:
        config = infer_config(state)
    if check is None:
        check_keys(expected_shapes(config), state, what=str(src))
    else:
        check(config, state)
    return save(state, config, dst, vocab_path=vocab), config
