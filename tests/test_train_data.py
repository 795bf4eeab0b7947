"""Training data: shapes samples, COCO and ODVG readers, positive maps against the real tokenizer, configs."""

import json

import cv2
import numpy as np
import pytest
import torch

from gdino.text import normalize_caption, tokenize
from gdino.train.data import CocoDataset, OdvgDataset, ShapesDataset, collate
from gdino.train.targets import positive_map


def _tokens_of(caption, spans):
    caption = normalize_caption(caption)
    tok = tokenize([caption])
    pm = positive_map([spans], tok.offsets[0], tok.input_ids.shape[1])[0]
    ids = tok.input_ids[0][pm.bool()].tolist()
    from gdino.text import get_tokenizer

    return " ".join(get_tokenizer().convert_ids_to_tokens(ids)).replace(" ##", "")  # word pieces joined


def test_shapes_sample_targets_line_up_with_the_caption():
    ds = ShapesDataset(seed=2, image_size=128, referring=0.0)
    for i in range(5):
        sample = ds[i]
        assert sample.image.shape == (128, 128, 3)
        assert len(sample.target) == len(sample.phrases) > 0
        for spans, phrase in zip(sample.target.spans, sample.phrases):
            (start, end), = spans
            assert sample.caption[start:end] == phrase
            assert _tokens_of(sample.caption, spans) == phrase
        boxes = sample.target.boxes_cxcywh
        assert boxes.shape[1] == 4 and (boxes >= 0).all() and (boxes <= 1).all()


def test_referring_samples_have_one_target():
    ds = ShapesDataset(seed=2, image_size=128, referring=1.0)
    sample = ds[0]
    assert sample.caption.startswith("the ") and len(sample.target) == 1
    assert _tokens_of(sample.caption, sample.target.spans[0]) == sample.phrases[0]


def test_training_and_held_out_seeds_never_meet():
    from gdino import shapes

    train = ShapesDataset(seed=123)
    held = ShapesDataset(seed=123, held_out=True)
    assert train.scene_seed(10**8) < shapes.EVAL_SEED_OFFSET <= held.scene_seed(0)


def test_collate_pads_and_masks():
    ds = ShapesDataset(image_size=64)
    small = ds[0]
    small.image = small.image[:40, :50]
    batch = collate([small, ds[1]])
    assert batch.images.shape == (2, 3, 64, 64)
    assert batch.pixel_mask[0, :40, :50].all() and not batch.pixel_mask[0, 40:].any()
    assert batch.padded


def _write_image(path, h=60, w=80):
    cv2.imwrite(str(path), np.full((h, w, 3), 127, np.uint8))


def test_coco_dataset(tmp_path):
    _write_image(tmp_path / "a.jpg")
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 80}],
            "categories": [{"id": 1, "name": "Dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "traffic light"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 20], "iscrowd": 0,
                             "area": 600}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoDataset(tmp_path / "ann.json", tmp_path, image_size=120, max_size=200)
    sample = ds[0]
    assert sample.image.shape[:2] == (120, 160)
    assert sorted(p.strip() for p in sample.caption.rstrip(" .").split(" . ")) == ["cat", "dog", "traffic light"]
    (start, end), = sample.target.spans[0]
    assert sample.caption[start:end] == "dog"
    assert torch.allclose(sample.target.boxes_cxcywh, torch.tensor([[25 / 80, 30 / 60, 30 / 80, 20 / 60]]))


def test_odvg_detection_and_grounding(tmp_path):
    _write_image(tmp_path / "a.jpg")
    lines = [
        {"filename": "a.jpg", "height": 60, "width": 80,
         "detection": {"instances": [{"bbox": [0, 0, 40, 30], "label": 0, "category": "person"}]}},
        {"filename": "a.jpg", "height": 60, "width": 80,
         "grounding": {"caption": "A man holding a red umbrella",
                       "regions": [{"bbox": [8, 8, 40, 40], "phrase": "a red umbrella"}]}},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    (tmp_path / "labels.json").write_text(json.dumps({"0": "person", "1": "bicycle"}))
    ds = OdvgDataset(tmp_path / "d.jsonl", tmp_path, label_map=tmp_path / "labels.json", image_size=60)
    det = ds[0]
    (start, end), = det.target.spans[0]
    assert det.caption[start:end] == "person" and "bicycle" in det.caption
    grounding = ds[1]
    (start, end), = grounding.target.spans[0]
    assert grounding.caption[start:end] == "a red umbrella"
    assert torch.allclose(grounding.target.boxes_cxcywh, torch.tensor([[24 / 80, 24 / 60, 32 / 80, 32 / 60]]))


def test_train_config_reports_every_unknown_key(tmp_path):
    from gdino.train.cli import read_config

    (tmp_path / "bad.toml").write_text('[data]\nkind = "shapes"\nfoo = 1\n[optim]\nlrr = 1\n[extra]\n')
    with pytest.raises(ValueError) as err:
        read_config(tmp_path / "bad.toml")
    message = str(err.value)
    assert "foo" in message and "lrr" in message and "[extra]" in message


def test_shipped_training_config_parses():
    from pathlib import Path

    from gdino.train.cli import build_dataset, read_config
    from gdino.train.loop import LoopConfig, OptimConfig, config_from_dict

    config = read_config(Path(__file__).parent.parent / "configs" / "default.toml")
    config_from_dict(OptimConfig, config["optim"], "optim")
    config_from_dict(LoopConfig, config["loop"], "loop")
    assert isinstance(build_dataset(config["data"]), ShapesDataset)
