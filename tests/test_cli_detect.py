"""``groundwatch detect`` / ``groundwatch convert``: outputs on a tiny random model, one-line errors on bad input."""

from __future__ import annotations

import json
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from gdino import checkpoint as ck
from gdino.cli import convert_main, detect_main
from gdino.config import tiny


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A groundwatch folder holding a randomly initialised tiny model."""
    import gdino

    torch.manual_seed(0)
    config = tiny(pretrained_text=None)
    model = gdino.build(config)
    return ck.save(model.state_dict(), config, tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = tmp_path / "street.png"
    cv2.imwrite(str(path), image)
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_detect_writes_annotated_image_and_json(tiny_weights, image_file, tmp_path, capsys):
    outdir = tmp_path / "out"
    code = detect_main([str(image_file), str(image_file), "--prompt", "red car . person .", "--weights",
                        str(tiny_weights), "--box-threshold", "0", "--text-threshold", "0.3", "-o", str(outdir)])
    assert code == 0, capsys.readouterr().err
    records = [json.loads((outdir / name).read_text()) for name in ("street_detections.json",
                                                                    "street_2_detections.json")]
    for record in records:
        assert record["width"] == 90 and record["height"] == 60 and record["mode"] == "detect"
        assert record["label_names"] == ["red car", "person"]
        # Threshold 0 keeps every query of the tiny model.
        assert len(record["detections"]) == tiny().num_queries
        first = record["detections"][0]
        assert set(first) == {"box_xyxy", "score", "phrase", "label", "label_name"} and len(first["box_xyxy"]) == 4
    annotated = cv2.imread(str(outdir / "street_detections.jpg"))
    assert annotated is not None and annotated.shape == (60, 90, 3)
    assert "street.png: 100 detections" in capsys.readouterr().out


def test_referring_mode_gives_one_box(tiny_weights, image_file, tmp_path):
    outdir = tmp_path / "out"
    code = detect_main([str(image_file), "--prompt", "the person on the left", "--referring", "--weights",
                        str(tiny_weights), "-o", str(outdir)])
    assert code == 0
    record = json.loads((outdir / "street_detections.json").read_text())
    assert record["mode"] == "referring" and len(record["detections"]) == 1
    assert record["detections"][0]["phrase"] == "the person on the left"


def test_referring_mode_uses_the_models_input_size(tiny_weights, image_file, tmp_path):
    """`detect --referring` used to re-implement refer and resize to 800 px whatever the model's config said
    (the tiny and default models work at 192): its box differed from `model.refer` on the same image."""
    import gdino

    outdir = tmp_path / "out"
    code = detect_main([str(image_file), "--prompt", "the person on the left", "--referring", "--weights",
                        str(tiny_weights), "-o", str(outdir)])
    assert code == 0
    record = json.loads((outdir / "street_detections.json").read_text())
    model = gdino.load(tiny_weights)
    assert model.config.input_short_side != 800
    image = cv2.imread(str(image_file))[:, :, ::-1].copy()
    expected = model.refer(image, "the person on the left")
    assert record["detections"][0]["box_xyxy"] == pytest.approx(expected.boxes_xyxy[0].tolist(), abs=0.02)
    assert record["detections"][0]["score"] == pytest.approx(float(expected.scores[0]), abs=1e-4)


def test_missing_image(tmp_path, capsys):
    code = detect_main([str(tmp_path / "nope.jpg"), "--prompt", "cat", "--weights", str(tmp_path / "w.pth")])
    assert code == 2
    assert "image not found" in _one_line_error(capsys)


def test_file_that_is_not_an_image(tmp_path, capsys):
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    assert detect_main([str(path), "--prompt", "cat"]) == 2
    assert "cannot decode image" in _one_line_error(capsys)


def _png_declaring(path, width: int, height: int):
    """A valid 1x1 PNG whose IHDR (CRC fixed) declares width x height: a few hundred bytes, never decoded here."""
    data = bytearray(cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes())
    # Signature (8 bytes), then the IHDR chunk: length (4), type (4), width, height, ... and its CRC.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("width, height", [(20000, 20000), (12000, 10000)])
def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(width, height, tmp_path, monkeypatch,
                                                                        capsys):
    """A 1.2 MB PNG declaring 20000x20000 pixels (a decompression bomb) used to be decoded in full: 4.9 GB of
    memory before the model even loaded. Its header is now checked against the pixel limit and the pixels are
    never decoded."""
    import gdino.cli

    def no_decoding(*args, **kwargs):
        raise AssertionError("the pixels of an over-sized image were decoded")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    bomb = _png_declaring(tmp_path / "bomb.png", width, height)
    assert detect_main([str(bomb), "--prompt", "cat", "--weights", str(tmp_path / "never-loaded.pth"),
                        "-o", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert "bomb.png" in line and "too large" in line, line
    assert f"{gdino.cli.MAX_IMAGE_PIXELS // 1_000_000} megapixels" in line, line
    if width * height < 150_000_000:  # below Pillow's own hard cap the exact size is known
        assert f"{width}x{height}" in line, line


def test_images_are_decoded_one_at_a_time_after_the_model_loads(image_file, tmp_path, monkeypatch):
    """Every image given to `detect` used to be decoded before the model loaded and kept in memory until the end
    (24 photos of 12 MP: 1.4 GB; a thousand killed the process). Only headers are checked before the model
    loads; each image is decoded just before its detection. A stand-in model keeps the test small."""
    import gdino
    from gdino.processing import Detections

    events = []
    real_imdecode = cv2.imdecode

    def imdecode(*args, **kwargs):
        events.append("decode")
        return real_imdecode(*args, **kwargs)

    class StandIn:
        def detect(self, image, prompt, **kwargs):
            events.append("detect")
            return Detections.empty(["cat"])

    def load(*args, **kwargs):
        events.append("load")
        return StandIn()

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    monkeypatch.setattr(gdino, "load", load)
    code = detect_main([str(image_file), str(image_file), str(image_file), "--prompt", "cat", "--weights",
                        "stand-in", "-o", str(tmp_path / "out")])
    assert code == 0
    assert events == ["load"] + ["decode", "detect"] * 3
    assert json.loads((tmp_path / "out" / "street_3_detections.json").read_text())["width"] == 90


def test_missing_weights(image_file, tmp_path, capsys):
    code = detect_main([str(image_file), "--prompt", "cat", "--weights", str(tmp_path / "missing.pth"),
                        "-o", str(tmp_path / "out")])
    assert code == 1
    assert "weights not found" in _one_line_error(capsys)


def test_truncated_weights(image_file, tmp_path, capsys, tiny_weights):
    data = (tiny_weights / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    code = detect_main([str(image_file), "--prompt", "cat", "--weights", str(cut), "-o", str(tmp_path / "out")])
    assert code == 1
    assert "truncated or corrupt" in _one_line_error(capsys)


def test_wrong_layout_weights(image_file, tmp_path, capsys):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    code = detect_main([str(image_file), "--prompt", "cat", "--weights", str(path), "-o", str(tmp_path / "out")])
    assert code == 1
    assert "unknown weights layout" in _one_line_error(capsys)


def test_bad_arguments(image_file, capsys, tmp_path):
    assert detect_main([str(image_file), "--prompt", "cat", "--box-threshold", "2"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert detect_main([str(image_file)]) == 2  # --prompt is required
    capsys.readouterr()
    assert detect_main([str(image_file), "--prompt", "  "]) == 2
    assert "prompt is empty" in _one_line_error(capsys)


def test_bad_dtype_request(image_file, tiny_weights, tmp_path, capsys):
    code = detect_main([str(image_file), "--prompt", "cat", "--weights", str(tiny_weights), "--dtype", "int8",
                        "-o", str(tmp_path / "out")])
    assert code == 2
    assert "dtype" in _one_line_error(capsys)


def test_convert_command(tiny_weights, tmp_path, capsys):
    assert convert_main([str(tiny_weights), str(tmp_path / "copy")]) == 0
    assert "Swin embed 32" in capsys.readouterr().out
    state, config, _ = ck.read_checkpoint(tmp_path / "copy")
    assert config == tiny(pretrained_text=None)
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "weights not found" in _one_line_error(capsys)
