"""streamer.editing.masks: what a redaction touches and what it leaves alone."""

import numpy as np
import pytest

from streamer.editing.masks import MODES, box_mask, padded_boxes, redact


def test_padded_boxes_round_outwards_and_clip():
    """A box covering part of a pixel must cover all of it, or a sliver of the object leaks."""
    boxes = padded_boxes(np.array([[10.3, 20.5, 50.2, 60.9], [-5.0, -5.0, 3.0, 3.0]]), 0.0, 40, 100)
    assert boxes.tolist() == [[10, 20, 40, 61], [0, 0, 3, 3]]
    grown = padded_boxes(np.array([[10.0, 10.0, 20.0, 30.0]]), 0.5, 100, 100)
    assert grown.tolist() == [[5, 0, 25, 40]]


def test_degenerate_and_non_finite_boxes_are_dropped():
    boxes = padded_boxes(np.array([[5.0, 5.0, 5.0, 9.0], [np.nan, 0, 4, 4], [200, 200, 300, 300]]), 0.1, 64, 64)
    assert len(boxes) == 0


@pytest.mark.parametrize("mode", MODES)
def test_redaction_changes_the_box_and_nothing_outside_it(mode):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    before = frame.copy()
    out = redact(frame, np.array([[30.0, 20.0, 70.0, 60.0]]), mode, padding=0.1)
    assert np.array_equal(frame, before), "the input frame was modified"
    inside = box_mask(np.array([[30.0, 20.0, 70.0, 60.0]]), 0.1, 120, 90)
    assert np.array_equal(out[~inside], frame[~inside])
    changed = (out != frame).any(axis=2)[inside].mean()
    assert changed > 0.9, f"{mode}: only {changed:.2f} of the box's pixels changed"


def test_blur_leaves_no_detail_inside_a_large_box():
    """A plain Gaussian blur of a fixed size leaves a big face readable; the redaction scales with the box."""
    frame = np.zeros((400, 400, 3), dtype=np.uint8)
    frame[::8] = 255  # fine stripes: detail a small blur would keep
    out = redact(frame, np.array([[50.0, 50.0, 350.0, 350.0]]), "blur", padding=0.0)
    region = out[60:340, 60:340].astype(np.float64)
    assert region.std() < 0.1 * frame[60:340, 60:340].std()


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown redaction mode"):
        redact(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4)), "smudge")
