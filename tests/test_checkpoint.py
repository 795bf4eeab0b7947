"""Checkpoint layouts: the key mapping both ways, config translation, safe readers and the errors they give."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from gdino import checkpoint as ck
from gdino.checkpoint import CheckpointError
from gdino.config import swinb_cogcoor, swint_ogc, tiny

transformers = pytest.importorskip("transformers")

OFFICIAL_PREFIXES = ("backbone.0.", "bert.", "feat_map.", "input_proj.", "transformer.", "bbox_embed.")


def _hf_model(cfg):
    torch.manual_seed(0)
    model = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig(**ck.config_to_hf(cfg)))
    # Fresh HF heads start at zero; make every tensor distinct so a swapped key cannot go unnoticed. Swin's
    # final layernorm is unused by the detector and not in the official layout: it stays the identity.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "swin.layernorm" not in name:
                param.copy_(torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_config():
    return tiny(pretrained_text=None)


@pytest.fixture(scope="module")
def hf_tiny(tiny_config):
    return _hf_model(tiny_config)


@pytest.fixture(scope="module")
def hf_state(hf_tiny):
    return hf_tiny.state_dict()


@pytest.fixture(scope="module")
def official(hf_state):
    return ck.hf_to_official(hf_state)


@pytest.fixture(scope="module")
def hf_folder(hf_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "grounding-dino-tiny"
    hf_tiny.save_pretrained(folder)
    return folder


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------------------------


def test_round_trip_hf_official_hf_is_exact(hf_state, official):
    back = ck.official_to_hf(official, layout="module")
    _assert_same_state(back, hf_state)


def test_official_key_set(official, tiny_config):
    assert all(key.startswith(OFFICIAL_PREFIXES) for key in official)
    assert {prefix for prefix in OFFICIAL_PREFIXES if any(k.startswith(prefix) for k in official)} == set(
        OFFICIAL_PREFIXES)
    assert not any("pooler" in key or "position_ids" in key or "relative_position_index" in key for key in official)
    # Fused projections: Swin qkv, text-enhancer and decoder nn.MultiheadAttention in_proj.
    emb = tiny_config.backbone.embed_dim
    assert official["backbone.0.layers.0.blocks.0.attn.qkv.weight"].shape == (3 * emb, emb)
    dim = tiny_config.hidden_dim
    for key in ("transformer.encoder.text_layers.0.self_attn.in_proj_weight",
                "transformer.decoder.layers.0.ca_text.in_proj_weight",
                "transformer.decoder.layers.0.self_attn.in_proj_weight"):
        assert official[key].shape == (3 * dim, dim)
    # Swin norms per returned stage, numbered like the official code (stage index, 0-based).
    assert {k for k in official if re.match(r"backbone\.0\.norm\d\.weight$", k)} == {
        f"backbone.0.norm{i}.weight" for i in tiny_config.backbone.out_indices}
    assert "transformer.encoder.fusion_layers.0.gamma_v" in official
    # The shared box head under every decoder index and under its decoder alias.
    for i in range(tiny_config.decoder_layers):
        assert torch.equal(official[f"bbox_embed.{i}.layers.0.weight"], official["bbox_embed.0.layers.0.weight"])
        assert f"transformer.decoder.bbox_embed.{i}.layers.2.bias" in official


def test_qkv_split_order_is_query_key_value(hf_state, official):
    prefix = "model.backbone.conv_encoder.model.swin.encoder.layers.1.blocks.0.attention."
    fused = official["backbone.0.layers.1.blocks.0.attn.qkv.weight"]
    for part, name in zip(fused.chunk(3), ("q_proj", "k_proj", "v_proj")):
        assert torch.equal(part, hf_state[prefix + name + ".weight"])
    fused = official["transformer.decoder.layers.1.ca_text.in_proj_bias"]
    for part, name in zip(fused.chunk(3), ("query", "key", "value")):
        assert torch.equal(part, hf_state[f"model.decoder.layers.1.encoder_attn_text.{name}.bias"])
    assert torch.equal(official["transformer.encoder.fusion_layers.2.gamma_l"],
                       hf_state["model.encoder.layers.2.fusion_layer.text_param"])
    assert torch.equal(official["backbone.0.norm1.weight"],
                       hf_state["model.backbone.conv_encoder.model.hidden_states_norms.stage2.weight"])


def test_saved_spelling_reads_the_same_and_writes_what_save_pretrained_writes(hf_folder, official):
    saved = load_file(str(hf_folder / "model.safetensors"))
    _assert_same_state(ck.hf_to_official(saved), official)
    written = ck.official_to_hf(official, layout="saved")
    assert sorted(written) == sorted(saved)


def test_hf_loads_our_saved_layout(tmp_path, hf_folder, hf_state, official):
    folder = tmp_path / "from-official"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ck.official_to_hf(official, layout="saved").items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    reloaded = transformers.GroundingDinoForObjectDetection.from_pretrained(folder)
    _assert_same_state(reloaded.state_dict(), hf_state)


def test_unknown_or_incomplete_keys_are_reported(official, hf_state):
    with pytest.raises(CheckpointError, match="not part of the official layout: foo.weight"):
        ck.official_to_hf({**official, "foo.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no official name: model.extra"):
        ck.hf_to_official({**hf_state, "model.extra": torch.zeros(1)})
    partial = {k: v for k, v in hf_state.items() if not k.endswith("text_enhancer_layer.self_attn.value.weight")}
    with pytest.raises(CheckpointError, match="lacks value"):
        ck.hf_to_official(partial)


def test_official_file_extras_are_dropped(official):
    extras = {
        "bert.pooler.dense.weight": torch.zeros(2, 2),
        "bert.embeddings.position_ids": torch.arange(4)[None],
        "backbone.0.layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49, dtype=torch.long),
    }
    _assert_same_state(ck.drop_ignored_official({**official, **extras}), official)


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def _official_input_size(cfg):
    """The inference resize is not stored in weights or HF configs: those read back with the official 800/1333."""
    return dataclasses.replace(cfg, input_short_side=800, input_max_side=1333)


@pytest.mark.parametrize("make", [lambda: tiny(pretrained_text=None), swint_ogc, swinb_cogcoor])
def test_config_round_trip_through_hf(make):
    cfg = _official_input_size(make())
    hf_config = transformers.GroundingDinoConfig(**ck.config_to_hf(cfg))
    assert ck.config_from_hf(hf_config.to_dict()) == cfg
    assert ck.config_from_hf(json.loads(hf_config.to_json_string())) == cfg


def test_unsupported_hf_config_is_refused():
    hf = ck.config_to_hf(swint_ogc())
    with pytest.raises(CheckpointError, match="two_stage"):
        ck.config_from_hf({**hf, "two_stage": False})
    with pytest.raises(CheckpointError, match="FFN widths differ"):
        ck.config_from_hf({**hf, "decoder_ffn_dim": 1024})
    with pytest.raises(CheckpointError, match="text_config.model_type"):
        ck.config_from_hf({**hf, "text_config": {"model_type": "roberta"}})


def test_infer_config_from_official_shapes(official, tiny_config):
    inferred = ck.infer_config(official)
    # drop_path_rate only acts in training and leaves no trace in the weights.
    backbone = dataclasses.replace(tiny_config.backbone, drop_path_rate=inferred.backbone.drop_path_rate)
    expected = dataclasses.replace(_official_input_size(tiny_config), backbone=backbone)
    assert inferred == expected


def test_expected_shapes_match_the_mapping(official, tiny_config):
    ck.check_keys(ck.expected_shapes(tiny_config), official)


def test_expected_shapes_match_our_model(tiny_config):
    """The lead's model must produce exactly the official layout that the mapping produces."""
    model_module = pytest.importorskip("gdino.model")
    ck.check_keys(ck.expected_shapes(tiny_config), model_module.GroundingDino(tiny_config).state_dict(),
                  what="GroundingDino(tiny).state_dict()")


@pytest.mark.slow
def test_full_swin_t_round_trip():
    """One full-size case: the Swin-T OGC HF model (random weights, ~170M parameters) maps both ways exactly."""
    cfg = swint_ogc()
    hf_state = transformers.GroundingDinoForObjectDetection(
        transformers.GroundingDinoConfig(**ck.config_to_hf(cfg))).state_dict()
    official = ck.hf_to_official(hf_state)
    ck.check_keys(ck.expected_shapes(cfg), official)
    assert ck.infer_config(official) == cfg
    assert sum(1 for k in official if re.match(r"bbox_embed\.\d+\.layers\.0\.weight$", k)) == 6
    _assert_same_state(ck.official_to_hf(official, layout="module"), hf_state)


# --------------------------------------------------------------------------------------------------------------
# Reading, writing, converting
# --------------------------------------------------------------------------------------------------------------


def test_read_official_pth_with_wrapper_and_module_prefix(tmp_path, official):
    path = tmp_path / "groundingdino_tiny.pth"
    wrapped = {f"module.{k}": v for k, v in official.items()}
    wrapped["module.bert.pooler.dense.bias"] = torch.zeros(3)
    torch.save({"model": wrapped, "epoch": 3}, path)
    state, config, vocab = ck.read_checkpoint(path)
    _assert_same_state(state, official)
    assert config is None and vocab is None
    bare = tmp_path / "bare.pth"
    torch.save(official, bare)
    _assert_same_state(ck.read_checkpoint(bare)[0], official)


def test_read_hf_folder(hf_folder, official, tiny_config, tmp_path):
    state, config, vocab = ck.read_checkpoint(hf_folder)
    _assert_same_state(state, official)
    assert config == _official_input_size(tiny_config) and vocab is None


def test_save_read_convert(tmp_path, hf_folder, official, tiny_config):
    (hf_folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    try:
        dst, cfg = ck.convert(hf_folder, tmp_path / "converted")
    finally:
        (hf_folder / "vocab.txt").unlink()
    assert cfg == _official_input_size(tiny_config)
    meta = json.loads((dst / "groundwatch.json").read_text())
    assert meta["format"] == "groundwatch" and meta["format_version"] == 1
    state, config, vocab = ck.read_checkpoint(dst)
    _assert_same_state(state, official)
    assert config == _official_input_size(tiny_config) and vocab == dst / "vocab.txt"
    # An official .pth converts too (its config inferred from the shapes); converting again overwrites in place.
    pth = tmp_path / "official.pth"
    torch.save({"model": official}, pth)
    dst2, cfg2 = ck.convert(pth, dst)
    assert cfg2.hidden_dim == tiny_config.hidden_dim and ck.read_checkpoint(dst2)[2] is None


def test_save_refuses_to_clobber_an_unrelated_folder(tmp_path, official, tiny_config):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        ck.save(official, tiny_config, tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.jpg").exists()


def test_convert_into_the_folder_that_holds_its_source_is_refused(tmp_path, official, tiny_config):
    """`groundwatch convert gw/orig.pth gw`, gw a groundwatch folder, deleted the whole folder, the source with it,
    before writing the converted copy (found by an audit). Refused; the folder is left as it was."""
    gw = ck.save(official, tiny_config, tmp_path / "gw")
    pth = gw / "orig.pth"
    torch.save({"model": official}, pth)
    before = sorted(p.name for p in gw.iterdir())
    with pytest.raises(CheckpointError, match="holds the source"):
        ck.convert(pth, gw)
    assert sorted(p.name for p in gw.iterdir()) == before and pth.is_file()


def test_a_save_that_fails_at_the_swap_keeps_the_previous_checkpoint(tmp_path, official, tiny_config, monkeypatch):
    """Replacing a checkpoint folder deleted the old one and then renamed the new one in; a failure between the
    two (or Ctrl-C) cleaned up the new one too, so neither was left. The old folder is now moved aside first and
    put back if the new one cannot take its place."""
    from pathlib import Path

    gw = ck.save(official, tiny_config, tmp_path / "gw")
    before = (gw / "model.safetensors").read_bytes()
    real_rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == gw and self.name.startswith(".gw.") and ".old-" not in self.name:  # the staged copy
            raise OSError("disk went away")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="disk went away"):
        ck.save(official, tiny_config, gw)
    monkeypatch.undo()
    assert (gw / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gw"]


def test_convert_checks_shapes_against_the_config(tmp_path, official):
    folder = ck.save(official, swint_ogc(), tmp_path / "mislabelled")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        ck.convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


class NotATensor:
    pass


def test_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="weights not found"):
        ck.read_checkpoint(tmp_path / "nope.pth")


def test_truncated_torch_file(tmp_path, official):
    path = tmp_path / "cut.pth"
    torch.save({"model": official}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ck.read_checkpoint(path)


def test_truncated_safetensors(tmp_path, hf_folder):
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "config.json").write_text((hf_folder / "config.json").read_text())
    data = (hf_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ck.read_checkpoint(folder)
    lone = tmp_path / "cut.safetensors"
    lone.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ck.read_checkpoint(lone)


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"this is not a checkpoint at all" * 10, "truncated or corrupt"),
])
def test_garbage_files(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        ck.read_checkpoint(path)


def test_pickled_objects_are_refused_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": NotATensor()}}, path)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        ck.read_checkpoint(path)


def test_wrong_layouts(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2), "fc.bias": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="unknown weights layout"):
        ck.read_checkpoint(foreign)
    lone = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(lone))
    with pytest.raises(CheckpointError, match="unknown weights layout"):
        ck.read_checkpoint(lone)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ck.read_checkpoint(listing)
    mixed = tmp_path / "mixed.pth"
    torch.save({"model": {"backbone.0.x": torch.zeros(1), "step": 3}}, mixed)
    with pytest.raises(CheckpointError, match="not tensors: step"):
        ck.read_checkpoint(mixed)


def test_bad_folders(tmp_path, hf_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ck.read_checkpoint(empty)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="without weights"):
        ck.read_checkpoint(no_weights)
    (no_weights / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable JSON"):
        ck.read_checkpoint(no_weights)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "groundwatch.json").write_text(json.dumps({"format": "groundwatch", "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        ck.read_checkpoint(ours)


def test_check_keys_lists_missing_unexpected_and_mismatched():
    expected = {f"k{i:03d}": (2, 2) for i in range(30)}
    got = {f"k{i:03d}": torch.zeros(2, 2) for i in range(5, 30)}
    got["k010"] = torch.zeros(3)
    got.update({"zz.extra": torch.zeros(1), "aa.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError) as info:
        ck.check_keys(expected, got)
    message = str(info.value)
    assert "5 missing keys: k000, k001, k002, k003, k004" in message
    assert "2 unexpected keys: aa.extra, zz.extra" in message
    assert "k010 (3,) (expected (2, 2))" in message
    many = {f"m{i:03d}": torch.zeros(1) for i in range(50)}
    with pytest.raises(CheckpointError, match=r"50 unexpected keys: m000, .*m019, \.\.\. \(30 more\)"):
        ck.check_keys({}, many)
    ck.check_keys(["a", "b"], {"b": torch.zeros(1), "a": torch.zeros(1)})
