"""The one detection path (`gdino.predict`): the library, the CLI and the daemon's detector give the same answer,
and a prompt is prepared once, not on every frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gdino import predict, processing
from gdino.config import tiny
from streamer.config import ModelConfig
from streamer.inference import GdinoDetector


@pytest.fixture(scope="module")
def detector():
    """The daemon's detector on the tiny random model (seeded), with the model's own input size."""
    config = tiny()
    return GdinoDetector.from_config(ModelConfig(weights="tiny", box_threshold=0.0, text_threshold=0.2,
                                                 short_side=config.input_short_side, max_side=config.input_max_side))


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(2)]


def _same(a: processing.Detections, b: processing.Detections) -> None:
    np.testing.assert_allclose(a.boxes_xyxy, b.boxes_xyxy, atol=1e-4)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert a.phrases == b.phrases and a.label_names == b.label_names
    np.testing.assert_array_equal(a.labels, b.labels)


def test_daemon_detector_and_model_detect_agree(detector, frames):
    """The daemon's detector used to repeat preprocessing, the forward pass and post-processing its own way; it
    is now an adapter over `gdino.predict`, so it answers exactly as `GroundingDino.detect`."""
    prompt = "red car . person . dog ."
    ours = detector.detect(frames, detector.encode(prompt))
    library = detector.model.detect(frames, prompt, box_threshold=0.0, text_threshold=0.2, remove_combined=True)
    assert len(ours) == 2 and len(ours[0]) == tiny().num_queries
    for a, b in zip(ours, library):
        _same(a, b)
    assert ours[0].label_names == ["red car", "person", "dog"]


def test_prompt_is_prepared_once_not_per_frame(detector, frames, monkeypatch):
    """Sub-sentence names used to be decoded from the token ids again for every frame of every batch; the
    encoding now carries them, so running frames prepares nothing more."""
    encoding = detector.encode("red car . person .")
    assert encoding.label_names == ["red car", "person"]
    calls = []
    original = processing.sub_sentences
    monkeypatch.setattr(processing, "sub_sentences", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(detector.model, "encode_text", lambda *_: pytest.fail("text encoded again"))
    for _ in range(3):
        found = detector.detect(frames, encoding)
    assert calls == [] and found[1].label_names == ["red car", "person"]


def test_long_prompt_passes_are_merged_with_labels_renumbered(detector, frames):
    prompt = " . ".join(f"thing {i}" for i in range(120))
    encoding = detector.encode(prompt)
    assert len(encoding.passes) >= 2
    [found] = predict.detect(detector.model, frames[:1], encoding, box_threshold=0.0)
    assert found.label_names == [f"thing {i}" for i in range(120)]
    per_pass = tiny().num_queries * len(encoding.passes)
    assert len(found) == per_pass and found.labels.max() >= len(encoding.passes[0].label_names)


def test_refer_follows_the_models_input_size(detector, frames):
    """`refer` resizes as `detect` does (the model's configured scale), whoever calls it."""
    model = detector.model
    [found] = predict.refer(model, frames[:1], "the large green triangle")
    pixel_values, pixel_mask, _ = processing.preprocess(frames[:1], short_side=model.config.input_short_side,
                                                        max_side=model.config.input_max_side)
    with torch.no_grad():
        out = model(pixel_values, "the large green triangle", pixel_mask=pixel_mask)
    [expected] = processing.referring_box(out.logits, out.boxes, out.text, [(72, 96)], model.tokenizer)
    _same(found, expected)
