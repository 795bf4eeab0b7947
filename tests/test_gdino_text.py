"""Prompt handling: offline tokenizer, sub-sentence mask, text-encoding cache, long and bad prompts."""

from __future__ import annotations

import pytest
import torch
from transformers.models.grounding_dino import modeling_grounding_dino as hf_gd

from gdino import config as configs
from gdino import predict
from gdino.model import GroundingDino
from gdino.text import PromptError, chunk_caption, count_tokens, get_tokenizer, normalize_caption, sub_sentence_mask


def test_tokenizer_is_bert_uncased_offline():
    """transformers 5 silently ignored vocab_file= and gave a 5-token vocabulary: every word became [UNK]."""
    tokenizer = get_tokenizer()
    assert len(tokenizer) == 30522
    assert tokenizer("a cat.")["input_ids"] == [101, 1037, 4937, 1012, 102]
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"]) == [101, 102, 1012, 1029]


def test_normalize_caption():
    assert normalize_caption("  Red Car . Person") == "red car . person."
    for bad in ("", "   ", " . . ", "?!"):
        with pytest.raises(PromptError):
            normalize_caption(bad)
    with pytest.raises(PromptError):
        normalize_caption(None)


@pytest.mark.parametrize("captions", [
    ["a cat."],
    ["red circle . blue square . the big green triangle ."],
    ["person . white van .", "remote control ? dog, cat . x ."],  # padded batch, '?' separator, comma inside
])
def test_sub_sentence_mask_matches_transformers(captions):
    tokenizer = get_tokenizer()
    ids = tokenizer(captions, padding="longest", return_tensors="pt")["input_ids"]
    mask, positions = sub_sentence_mask(ids)
    ref_mask, ref_positions = hf_gd.generate_masks_with_special_tokens_and_transfer_map(
        ids, torch.tensor([101, 102, 1012, 1029]))
    assert torch.equal(mask, ref_mask)
    assert torch.equal(positions, ref_positions)


def test_sub_sentence_blocks_by_hand():
    """[CLS] red circle . blue [SEP]: the block 'red circle .' sees itself, positions restart at 0."""
    ids = torch.tensor([[101, 2417, 4418, 1012, 2630, 102]])
    mask, positions = sub_sentence_mask(ids)
    assert positions.tolist() == [[0, 0, 1, 2, 0, 0]]
    assert mask[0, 1].tolist() == [False, True, True, True, False, False]
    assert mask[0, 0].tolist() == [True, False, False, False, False, False]


def test_long_prompt_is_split_not_cut():
    tokenizer = get_tokenizer()
    phrases = [f"object number {i}" for i in range(120)]
    caption = normalize_caption(" . ".join(phrases))
    chunks = chunk_caption(caption, 256, tokenizer)
    assert len(chunks) >= 2
    assert all(count_tokens(c, tokenizer) <= 256 for c in chunks)
    rejoined = [p.strip() for c in chunks for p in c.split(".") if p.strip()]
    assert rejoined == phrases


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GroundingDino(configs.tiny(pretrained_text=None)).eval()


def test_text_encoding_is_cached(tiny_model, monkeypatch):
    calls = []
    original = tiny_model.bert.forward
    monkeypatch.setattr(tiny_model.bert, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    tiny_model.clear_text_cache()
    first = tiny_model.encode_text("Red circle . blue square")
    again = tiny_model.encode_text("red circle . blue square .")  # same after normalisation
    assert again is first and len(calls) == 1
    images = torch.randn(2, 3, 224, 256)
    with torch.no_grad():
        tiny_model(images, "red circle . blue square .")
        tiny_model(images, "red circle . blue square .")
    assert len(calls) == 1
    tiny_model.encode_text("green star .")
    assert len(calls) == 2


def test_forward_refuses_bad_images_and_prompts(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model(torch.randn(3, 64, 64), "cat .")
    with pytest.raises(TypeError, match="float"):
        tiny_model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "cat .")
    with pytest.raises(PromptError):
        tiny_model(torch.randn(1, 3, 64, 64), " . ")
    long_prompt = " . ".join(f"thing {i}" for i in range(200))
    with pytest.raises(PromptError, match="several passes"):
        tiny_model(torch.randn(1, 3, 64, 64), long_prompt)


def test_detect_runs_long_prompts_in_passes(tiny_model):
    """A prompt past 256 tokens is run in several passes and merged, not cut."""
    image = (torch.rand(96, 128, 3) * 255).to(torch.uint8).numpy()
    prompt = " . ".join(f"thing {i}" for i in range(150))
    passes = predict.encode(tiny_model, prompt).passes
    assert len(passes) >= 2
    found = tiny_model.detect(image, prompt, box_threshold=0.0, text_threshold=0.0)
    per_pass = [tiny_model.detect(image, p.text.captions[0], box_threshold=0.0, text_threshold=0.0) for p in passes]
    assert len(found.scores) == sum(len(d.scores) for d in per_pass)


def test_refer_returns_one_box_per_image(tiny_model):
    images = [(torch.rand(120, 160, 3) * 255).to(torch.uint8).numpy() for _ in range(2)]
    found = tiny_model.refer(images, "the large green triangle")
    assert len(found) == 2
    for detections, image in zip(found, images):
        assert len(detections.scores) == 1
        x0, y0, x1, y1 = detections.boxes_xyxy[0]
        # cxcywh in [0, 1] may reach past the border by half a side, as in the reference post-processing.
        assert x0 <= x1 and y0 <= y1
        assert -0.5 * image.shape[1] <= x0 and x1 <= 1.5 * image.shape[1]
        assert detections.phrases == ["the large green triangle"]
