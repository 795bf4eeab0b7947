"""Removal (`--mode inpaint`): the described object is gone from its box, the rest of the frame is untouched.

OpenCV's Telea inpainting is checked on real detections of the default model; the diffusers path on a tiny,
randomly initialised inpainting pipeline built in a temporary folder (no download), end to end through
`groundwatch redact --inpaint-model`."""

import importlib.util
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import gdino
from gdino import shapes
from streamer.cli import main as cli_main
from streamer.editing.masks import box_mask, redact

ASSET = Path(gdino.__file__).parent / "assets" / "default"
needs_default = pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="default weights not shipped")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return gdino.load("default")


def colour_pixels(image: np.ndarray, colour: str, box) -> int:
    """Pixels inside `box` (xyxy, whole pixels) within 60 of the named colour (objects are drawn within +-12 of it
    per channel; backgrounds and clutter are desaturated and mid-toned, far from every named colour)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    region = image[y1:y2, x1:x2].astype(np.float64)
    distance = np.linalg.norm(region - np.array(shapes.COLOURS[colour], np.float64), axis=2)
    return int((distance < 60).sum())


@needs_default
def test_telea_removes_every_pixel_of_the_described_object(model):
    removed = 0
    for seed in range(shapes.EVAL_SEED_OFFSET + 7_000, shapes.EVAL_SEED_OFFSET + 7_005):
        image, objects = shapes.render_scene(seed, (192, 256), num_objects=(2, 3), clutter=0.3)
        # The colour test needs the target's colour to be its own: Telea fills the box from its border, and another
        # object of that colour next to it (a cyan ring beside the cyan circle) would bleed in.
        target = next((o for o in objects if [p.colour for p in objects].count(o.colour) == 1), None)
        if target is None:
            continue
        assert colour_pixels(image, target.colour, target.box_xyxy) > 20, "the colour test cannot see the object"
        found = model.detect(image, f"{target.category} .", box_threshold=0.25, remove_combined=True)
        if len(found.boxes_xyxy) == 0:
            continue  # a detector miss on a still frame is the leak test's business, not removal's
        out = redact(image, found.boxes_xyxy, "inpaint", padding=0.2)
        assert colour_pixels(out, target.colour, target.box_xyxy) == 0, seed
        outside = ~box_mask(found.boxes_xyxy, 0.2, image.shape[1], image.shape[0])
        assert np.array_equal(out[outside], image[outside]), "pixels outside the padded boxes changed"
        removed += 1
    assert removed >= 3, f"the described object was found and removed in only {removed} scenes"


def build_tiny_inpainting_pipeline(folder: Path) -> None:
    """A Stable Diffusion inpainting pipeline of a few thousand random weights, saved like a real one.

    The CLIP tokenizer is made from a vocabulary written here (letters and the two special tokens), so nothing
    is fetched."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_hidden_layers=2, vocab_size=100, max_position_embeddings=77, projection_dim=16))
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["<|startoftext|>", "<|endoftext|>"] + [c + "</w>" for c in letters] + list(letters)
    vocab_dir = folder.parent / "tokenizer-source"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.json").write_text(json.dumps({word: i for i, word in enumerate(words)}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1, set_alpha_to_one=False)
    pipeline = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipeline.save_pretrained(str(folder))


needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers not installed (the 'edit' extra: pip install groundwatch[edit])")


@needs_diffusers
def test_diffusers_inpainter_changes_only_the_masked_pixels(tmp_path):
    from streamer.editing.diffusion import DiffusersInpainter

    build_tiny_inpainting_pipeline(tmp_path / "pipeline")
    inpainter = DiffusersInpainter(tmp_path / "pipeline", steps=2)
    assert inpainter.resolution == 32  # the UNet's 16 latent pixels times the VAE's factor 2
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    boxes = np.array([[30, 20, 70, 60], [100, 70, 118, 88]], np.int32)
    out = inpainter(frame, boxes)
    assert out.shape == frame.shape and out.dtype == np.uint8
    mask = np.zeros(frame.shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = True
    assert np.array_equal(out[~mask], frame[~mask]), "pixels outside the mask changed"
    assert (out[mask] != frame[mask]).any(axis=1).mean() > 0.5, "the masked pixels were not painted"


@needs_diffusers
@needs_default
@pytest.mark.slow
def test_redact_with_inpaint_model_end_to_end(tmp_path):
    """`groundwatch redact --mode inpaint --inpaint-model PATH` on a shapes video: same shape and frame count,
    and (re-encoding aside) the picture outside the redacted boxes is the input's."""
    from streamer.media import write_video

    build_tiny_inpainting_pipeline(tmp_path / "pipeline")
    frames, truths = shapes.render_video(shapes.EVAL_SEED_OFFSET + 7_100, 4, (192, 256), fps=10)
    target = truths[0].categories[0]
    source = write_video(tmp_path / "in.mp4", frames, fps=10)
    out, report = tmp_path / "out.mp4", tmp_path / "report.json"
    code = cli_main(["redact", str(source), "--prompt", f"{target} .", "-o", str(out), "--mode", "inpaint",
                     "--inpaint-model", str(tmp_path / "pipeline"), "--inpaint-steps", "1", "--quiet",
                     "--report", str(report)])
    assert code == 0
    with av.open(str(source)) as container:
        before = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(out)) as container:
        after = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert after.shape == before.shape
    record = json.loads(report.read_text())
    assert record["frames"], "nothing was redacted: the detector found no object"
    redacted = np.zeros(before.shape[:3], bool)
    for entry in record["frames"]:
        boxes = np.array(entry["detected"] + entry["interpolated"] + entry["extrapolated"]).reshape(-1, 4)
        # The report's boxes are rounded to 0.1 px; one more pixel of margin covers that and the codec's blocks.
        redacted[entry["frame"]] = box_mask(boxes, 0.2, before.shape[2], before.shape[1])
    import cv2

    near = np.stack([cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0 for m in redacted])
    difference = np.abs(after.astype(int) - before.astype(int)).max(axis=3)
    assert np.percentile(difference[~near], 99) <= 12, "the picture changed outside the redacted boxes"
    assert difference[redacted].mean() > 5, "the redacted boxes look like the input"


def test_inpaint_model_without_the_folder_is_a_clear_error(tmp_path, capsys):
    from streamer.media import write_video

    source = write_video(tmp_path / "in.mp4", np.zeros((3, 32, 32, 3), np.uint8))
    out = tmp_path / "out.mp4"
    code = cli_main(["redact", str(source), "--prompt", "face .", "-o", str(out), "--mode", "inpaint",
                     "--inpaint-model", str(tmp_path / "nowhere"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert ("not a diffusers pipeline folder" in err) or ("pip install 'groundwatch[edit]'" in err), err
    assert not out.exists()
