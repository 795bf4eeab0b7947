"""Pre- and post-processing against independent implementations (transformers' Grounding DINO processors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gdino import processing
from gdino.processing import Detections, ImageError, postprocess, preprocess, referring_box, resized_size
from gdino.text import get_tokenizer

transformers = pytest.importorskip("transformers")

# One 8-bit level after normalisation, the largest std: 1 / 255 / 0.225.
ONE_LEVEL = 1.0 / 255.0 / min(processing.IMAGENET_STD)


def bert_tokenizer():
    """The project's tokenizer when it has the full BERT-uncased vocabulary, else one built here from the same file."""
    tokenizer = get_tokenizer()
    if len(tokenizer) != 30522:
        from transformers import BertTokenizerFast

        from gdino.text import default_vocab_path

        tokenizer = BertTokenizerFast(vocab=str(default_vocab_path()), do_lower_case=True)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return bert_tokenizer()


@pytest.fixture(scope="module")
def hf_image_processor():
    return transformers.GroundingDinoImageProcessor()


def _official_size(height, width, size=800, max_size=1333):
    """DETR's get_size_with_aspect_ratio, written out from the reference for an independent check."""
    min_original, max_original = float(min(height, width)), float(max(height, width))
    if max_original / min_original * size > max_size:
        size = int(round(max_size * min_original / max_original))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


@pytest.mark.parametrize("height,width", [(480, 640), (640, 480), (1080, 1920), (800, 1333), (333, 1000),
                                          (100, 100), (1, 2000), (2000, 7), (799, 800), (720, 1280), (4000, 3000)])
def test_resized_size_is_the_official_formula(height, width):
    assert resized_size(height, width) == _official_size(height, width)
    out_h, out_w = resized_size(height, width)
    assert min(out_h, out_w) <= 800


def test_resized_size_agrees_with_transformers_on_common_sizes():
    from transformers.image_transforms import get_size_with_aspect_ratio

    # transformers' variant keeps the unrounded short side for the long side; on these sizes both agree.
    for height, width in [(480, 640), (720, 1280), (1080, 1920), (600, 800), (427, 640), (1024, 768), (375, 500)]:
        assert resized_size(height, width) == tuple(get_size_with_aspect_ratio((height, width), 800, 1333))


def test_known_difference_from_transformers_on_extreme_aspect_ratios():
    """Where the long-side cap binds, DETR truncates size * long / short with the rounded short side and may pass
    1333 by a pixel or two; transformers uses the unrounded one. We keep the official numbers."""
    from transformers.image_transforms import get_size_with_aspect_ratio

    assert resized_size(64, 900) == (95, 1335)
    assert tuple(get_size_with_aspect_ratio((64, 900), 800, 1333)) == (95, 1333)


@pytest.mark.parametrize("sizes", [[(97, 131)], [(480, 640), (300, 200), (200, 700)]])
def test_pixels_match_transformers_image_processor(sizes, hf_image_processor):
    """Normalised pixels equal GroundingDinoImageProcessor's to 1e-5 on the CPU (both resize the 8-bit image with
    the PIL-exact antialiased bilinear filter); the float path used off-CPU is within one 8-bit level."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    images += [np.repeat(np.repeat(img[::8, ::8], 8, 0), 8, 1)[: img.shape[0], : img.shape[1]].copy()
               for img in images]
    pixel_values, pixel_mask, original_sizes = preprocess(images)
    expected = hf_image_processor(images=images, return_tensors="pt")
    assert original_sizes == [img.shape[:2] for img in images]
    hf_mask = expected["pixel_mask"].bool()
    for i, img in enumerate(images):
        h, w = resized_size(*img.shape[:2])
        assert int(pixel_mask[i].sum()) == h * w and bool(pixel_mask[i, :h, :w].all())
        assert int(hf_mask[i].sum()) == h * w
        ours = pixel_values[i, :, :h, :w]
        theirs = expected["pixel_values"][i, :, :h, :w]
        assert float((ours - theirs).abs().max()) <= 1e-5, f"image {i}"
        assert float(pixel_values[i, :, h:, :].abs().sum() + pixel_values[i, :, :, w:].abs().sum()) == 0.0


def test_float_resize_path_is_within_one_level():
    """The path used on GPUs (float resize, then rounding) stays within one 8-bit level of the uint8 path."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    exact = processing._resize_normalise(image, torch.device("cpu"), 800, 1333)
    uint8 = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    size = resized_size(97, 131)
    approx = torch.nn.functional.interpolate(uint8, size=size, mode="bilinear", antialias=True).round().clamp(0, 255)
    mean = torch.tensor(processing.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(processing.IMAGENET_STD).view(3, 1, 1)
    approx = (approx[0] / 255.0 - mean) / std
    assert float((approx - exact).abs().max()) <= ONE_LEVEL + 1e-5


def test_unresized_image_is_exact_normalisation():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (800, 900, 3), dtype=np.uint8)  # short side already 800: no resize
    pixel_values, mask, _ = preprocess(image)
    mean = np.array(processing.IMAGENET_MEAN, np.float32)
    std = np.array(processing.IMAGENET_STD, np.float32)
    expected = ((image.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(pixel_values[0].numpy(), expected, atol=1e-5)
    assert mask.all()


@pytest.mark.parametrize("bad,message", [
    (np.zeros((10, 10), np.uint8), "grayscale"),
    (np.zeros((10, 10, 4), np.uint8), "RGBA"),
    (np.zeros((3, 10, 10), np.uint8), "channels"),
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (np.zeros((2, 2, 2, 3, 1), np.uint8), "dimensions"),
    ("image.jpg", "numpy"),
    (torch.zeros(10, 10, 3, dtype=torch.uint8), "torch tensor"),
])
def test_bad_images_get_clear_errors(bad, message):
    with pytest.raises(ImageError, match=message):
        preprocess(bad)


def test_bad_image_in_a_list_is_named_by_index():
    good = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="image 1"):
        preprocess([good, np.zeros((10, 10, 3), np.int64)])
    with pytest.raises(ValueError, match="no images"):
        preprocess([])


# --------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------

PROMPTS = ["a cat . remote control .", "red car . person on a bike . dog .", "the tallest giraffe ."]


def _random_outputs(tokenizer, prompts, queries=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    encoded = tokenizer(prompts, padding="longest", return_tensors="pt")
    input_ids = encoded["input_ids"]
    batch, length = input_ids.shape
    logits = torch.randn(batch, queries, length, generator=generator) * 2.0 - 1.0
    logits = logits.masked_fill(~encoded["attention_mask"].bool()[:, None, :], float("-inf"))
    # Like a trained model, the closing [SEP] never scores: keep it below any threshold.
    logits = logits.masked_fill((input_ids == tokenizer.sep_token_id)[:, None, :], -10.0)
    boxes = torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.25  # (B, Q, 4) cxcywh
    return logits, boxes, input_ids


def _hf_reference(tokenizer, logits, boxes, input_ids, sizes, box_threshold, text_threshold):
    from transformers import GroundingDinoProcessor

    processor = GroundingDinoProcessor(image_processor=transformers.GroundingDinoImageProcessor(), tokenizer=tokenizer)
    padded = torch.full((*logits.shape[:2], 256), float("-inf"))
    padded[..., : logits.shape[2]] = logits

    class Output:  # the two fields post_process_grounded_object_detection reads
        pass

    output = Output()
    output.logits, output.pred_boxes = padded, boxes
    return processor.post_process_grounded_object_detection(
        output, input_ids=input_ids, threshold=box_threshold, text_threshold=text_threshold, target_sizes=sizes)


@pytest.mark.parametrize("box_threshold,text_threshold", [(0.35, 0.25), (0.5, 0.4), (0.2, 0.6)])
def test_postprocess_matches_transformers(tokenizer, box_threshold, text_threshold):
    logits, boxes, input_ids = _random_outputs(tokenizer, PROMPTS)
    sizes = [(480, 640), (1080, 1920), (333, 500)]
    ours = postprocess(logits, boxes, input_ids, sizes, tokenizer, box_threshold, text_threshold)
    theirs = _hf_reference(tokenizer, logits, boxes, input_ids, sizes, box_threshold, text_threshold)
    total = 0
    for mine, ref in zip(ours, theirs):
        assert len(mine) == len(ref["scores"])
        total += len(mine)
        np.testing.assert_allclose(mine.scores, ref["scores"].numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(mine.boxes_xyxy, ref["boxes"].numpy(), rtol=0, atol=1e-3)
        # The official predict() drops "." from phrases; transformers keeps them.
        assert mine.phrases == [" ".join(t.replace(".", " ").split()) for t in ref["text_labels"]]
        assert mine.boxes_xyxy.dtype == np.float32 and mine.scores.dtype == np.float32
    assert total > 5  # the comparison saw real detections


def test_postprocess_accepts_a_text_encoding_like_object_and_single_image(tokenizer):
    logits, boxes, input_ids = _random_outputs(tokenizer, PROMPTS[:1])

    class Text:
        pass

    text = Text()
    text.input_ids = input_ids
    a = postprocess(logits, boxes, text, [(100, 200)], tokenizer)
    b = postprocess(logits[0], boxes[0], input_ids[0], [(100, 200)], tokenizer)
    assert a[0].phrases == b[0].phrases
    np.testing.assert_array_equal(a[0].boxes_xyxy, b[0].boxes_xyxy)


def _single_query(tokenizer, prompt, token_probs: dict[str, float]):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    probs = torch.full((1, 1, ids.shape[1]), 0.01)
    for i, token in enumerate(tokens):
        if token in token_probs:
            probs[0, 0, i] = token_probs[token]
    logits = torch.logit(probs)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    return logits, boxes, ids


def test_phrases_labels_and_remove_combined(tokenizer):
    prompt = "red car . person . dog ."
    logits, boxes, ids = _single_query(tokenizer, prompt, {"red": 0.5, "car": 0.9, "person": 0.4})
    [found] = postprocess(logits, boxes, ids, [(100, 200)], tokenizer)
    assert found.phrases == ["red car person"]  # official: every token above text_threshold
    assert found.label_names == ["red car", "person", "dog"]
    assert found.labels.tolist() == [0]  # best token "car" sits in sub-sentence 0
    assert found.token_ids == [tokenizer.convert_tokens_to_ids(["red", "car", "person"])]
    np.testing.assert_allclose(found.boxes_xyxy, [[80.0, 30.0, 120.0, 70.0]], atol=1e-4)
    [combined] = postprocess(logits, boxes, ids, [(100, 200)], tokenizer, remove_combined=True)
    assert combined.phrases == ["red car"]  # limited to the sub-sentence of the best token
    logits, boxes, ids = _single_query(tokenizer, prompt, {"red": 0.3, "car": 0.3, "dog": 0.95})
    [combined] = postprocess(logits, boxes, ids, [(100, 200)], tokenizer, remove_combined=True)
    assert combined.phrases == ["dog"] and combined.labels.tolist() == [2]


def test_special_tokens_never_enter_a_phrase(tokenizer):
    logits, boxes, ids = _single_query(tokenizer, "cat .", {"[CLS]": 0.99, "[SEP]": 0.99, "cat": 0.9})
    [found] = postprocess(logits, boxes, ids, [(10, 10)], tokenizer)
    assert found.phrases == ["cat"]
    assert found.labels.tolist() == [-1]  # the best token is [CLS]


def test_nothing_above_threshold_gives_empty_detections(tokenizer):
    logits, boxes, ids = _random_outputs(tokenizer, PROMPTS[:2])
    results = postprocess(logits, boxes, ids, [(10, 10), (10, 10)], tokenizer, box_threshold=1.0)
    assert [len(r) for r in results] == [0, 0]
    assert results[0].boxes_xyxy.shape == (0, 4) and results[0].label_names == ["a cat", "remote control"]


def test_merge_renumbers_labels(tokenizer):
    a = postprocess(*_single_query(tokenizer, "cat . dog .", {"dog": 0.9}), [(10, 10)], tokenizer)[0]
    b = postprocess(*_single_query(tokenizer, "bird . fish .", {"fish": 0.9}), [(10, 10)], tokenizer)[0]
    merged = processing.merge(a, b)
    assert merged.label_names == ["cat", "dog", "bird", "fish"]
    assert merged.labels.tolist() == [1, 3] and merged.phrases == ["dog", "fish"]
    assert [d["label_name"] for d in merged.to_json()] == ["dog", "fish"]


def test_referring_box_scores_the_whole_expression(tokenizer):
    ids = tokenizer("the red car on the left .", return_tensors="pt")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    probs = torch.full((1, 3, ids.shape[1]), 0.05)
    # Query 0 is very sure about "car" alone; query 2 matches every word fairly well.
    probs[0, 0, tokens.index("car")] = 0.99
    probs[0, 2, 1:-2] = 0.6
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.8, 0.5, 0.2, 0.2]]])
    [best] = referring_box(torch.logit(probs), boxes, ids, [(100, 100)], tokenizer)
    assert len(best) == 1 and best.query_indices.tolist() == [2]
    assert best.phrases == ["the red car on the left"]
    np.testing.assert_allclose(best.boxes_xyxy, [[70.0, 40.0, 90.0, 60.0]], atol=1e-4)
    assert abs(float(best.scores[0]) - 0.6) < 1e-5
    [none] = referring_box(torch.logit(probs), boxes, ids, [(100, 100)], tokenizer, min_score=0.7)
    assert len(none) == 0


def test_detections_empty_and_json():
    empty = Detections.empty(["cat"])
    assert len(empty) == 0 and empty.to_json() == []
