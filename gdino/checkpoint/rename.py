"""The rename table between the official key layout (ours) and Hugging Face's, both spellings of the latter,
with the fused q/k/v split and merge: pure functions of state dicts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .formats import CheckpointError, StateDict, format_keys


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


def num_indexed(keys: Iterable[str], pattern: str) -> int:
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
        raise CheckpointError(f"{len(unmapped)} Hugging Face keys have no official name: {format_keys(unmapped)}")
    incomplete = {k: sorted(set(_QKV) - set(parts)) for k, parts in fused_parts.items() if len(parts) != 3}
    if incomplete:
        detail = "; ".join(f"{k} lacks {'/'.join(v)}" for k, v in sorted(incomplete.items())[:10])
        raise CheckpointError(f"incomplete query/key/value projections: {detail}")
    for key, parts in fused_parts.items():
        out[key] = torch.cat([parts[name] for name in _QKV], dim=0)
    num_decoder_layers = num_indexed(state, r"^model\.decoder\.layers\.(\d+)\.")
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
        raise CheckpointError(f"{len(unmapped)} keys are not part of the official layout: {format_keys(unmapped)}")
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
        stages = num_indexed(state, r"^backbone\.0\.layers\.(\d+)\.")
        width = patch.shape[0] * 2 ** max(stages - 1, 0)
        # transformers 5 spells this key the same way in memory and on disk.
        out[_HF_SWIN + "swin.layernorm.weight"] = torch.ones(width, dtype=patch.dtype)
        out[_HF_SWIN + "swin.layernorm.bias"] = torch.zeros(width, dtype=patch.dtype)
    return _to_module_spelling(out) if layout == "module" else out


def drop_ignored_official(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Remove keys an official file may carry that are not weights (BERT pooler, Swin index buffers, ...)."""
    return {k: v for k, v in state.items() if not any(p.search(k) for p in _OFFICIAL_IGNORED)}
