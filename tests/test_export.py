"""ONNX export (image graph with the text encoding as inputs, text graph) and the ONNX Runtime / OpenVINO backends.

Parity is against groundwatch's own PyTorch model on the same weights, one exported file per model serving every
frame size, batch size and prompt length (height, width, batch and tokens are dynamic axes). Tolerances: float32, 1e-4 absolute on boxes (normalised cxcywh) and
on logits relative to their largest magnitude (ONNX Runtime); OpenVINO fuses and reorders more, stated below.
The full-size models are exported once per session (module fixtures) and marked slow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gdino
from gdino import backends, export
from gdino import checkpoint as ck
from gdino import config as configs
from gdino.cli import detect_main, export_main
from gdino.model import GroundingDino

sys.path.insert(0, str(Path(__file__).parent))
from random_weights import random_model  # noqa: E402

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ATOL = 1e-4  # ONNX Runtime, float32: boxes absolute, logits relative to max |logit|
OPENVINO_ATOL = 2e-4  # OpenVINO's CPU plugin fuses LayerNorm/MatMul chains differently: measured <= 6e-5 here
PROMPTS = ("red circle .", "red circle . blue square . a small green triangle .",
           "person . white van . dog with a red leash . a yellow bicycle leaning on a wall . traffic light .")


def assert_outputs_match(mine, ref, atol: float) -> None:
    finite = torch.isfinite(ref.logits)
    assert torch.equal(torch.isfinite(mine.logits), finite), "masked token positions differ"
    scale = max(1.0, float(ref.logits[finite].abs().max()))
    logit_err = (mine.logits[finite] - ref.logits[finite]).abs().max() / scale
    box_err = (mine.boxes - ref.boxes).abs().max()
    assert logit_err <= atol, f"logits differ by {logit_err:.2e} (relative to {scale:.1f})"
    assert box_err <= atol, f"boxes differ by {box_err:.2e}"


def assert_selection_tolerant_match(mine, ref, atol: float) -> None:
    """Random full-size weights put query-selection candidates within float32 rounding of one another (see
    tests/test_gdino_parity.py): compare the queries selected at the same rank, require 99% of them to be."""
    finite = torch.isfinite(ref.logits)
    assert torch.equal(torch.isfinite(mine.logits), finite)
    scale = max(1.0, float(ref.logits[finite].abs().max()))
    logit_err = torch.where(finite, (mine.logits - ref.logits).abs(), 0).amax(-1) / scale  # (B, Q)
    box_err = (mine.boxes - ref.boxes).abs().amax(-1)
    same = box_err <= atol
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} of {same.numel()} queries differ"
    assert logit_err[same].max() <= 10 * atol, f"logits differ by {logit_err[same].max():.2e}"


def run_torch(model, images, prompt):
    with torch.no_grad():
        return model(images, prompt)


# ----------------------------------------------------------------------------------------------------------------
# Tiny random model: fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = configs.tiny(pretrained_text=None)
    model = random_model(config)
    root = tmp_path_factory.mktemp("tiny_export")
    weights = ck.save(model.state_dict(), config, root / "weights")
    model = gdino.load(weights)
    info = export.to_onnx(model, root / "image.onnx", height=128, width=160)
    return {"model": model, "weights": weights, "info": info, "root": root}


# Frame sizes through the one tiny file (traced at 128x160): the traced size, others of both orientations, sides
# that are multiples of no stride or window (the pads computed in the graph), and 32x32, the smallest, whose 22
# image tokens are fewer than the 100 queries (the query axis follows the image).
TINY_SIZES = ((128, 160), (96, 224), (160, 96), (100, 130), (32, 32))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_tiny_exported_graph_matches_torch_at_every_size(tiny, backend):
    """One file, traced at 128x160, run at other heights and widths, batch 1 and 2, prompts of 4 to 27 tokens.
    (Before height and width were dynamic, the same file declared 128x160 and refused every other size; exported
    with the axes merely declared dynamic, ONNX Runtime stopped at the first deformable attention's Split.)"""
    if backend == "openvino":
        pytest.importorskip("openvino")
    model, info = tiny["model"], tiny["info"]
    exported = backends.open_model(model, backend, onnx_path=info.path)
    atol = ATOL if backend == "onnxruntime" else OPENVINO_ATOL
    torch.manual_seed(1)
    cases = ((1, PROMPTS[1]), (2, PROMPTS[0]), (1, PROMPTS[2]), (2, PROMPTS[1]), (2, PROMPTS[2]))
    for (height, width), (batch, prompt) in zip(TINY_SIZES, cases):
        images = torch.randn(batch, 3, height, width)
        mine, ref = exported(images, prompt), run_torch(model, images, prompt)
        assert mine.logits.shape == ref.logits.shape, (height, width, batch)
        assert ref.logits.shape[0] == batch and ref.logits.shape[2] == ref.text.num_tokens
        assert_outputs_match(mine, ref, atol)
    # 32x32 has fewer image tokens (22) than queries (100): the query axis follows, as in the model.
    assert run_torch(model, torch.randn(1, 3, 32, 32), PROMPTS[0]).logits.shape[1] < model.config.num_queries


def test_tiny_padded_batch_matches_torch(tiny):
    """Frames of different sizes in one batch are padded; the graph takes the pixel mask like the model."""
    model, info = tiny["model"], tiny["info"]
    exported = backends.open_model(model, "onnxruntime", onnx_path=info.path)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 112, 176)  # not the traced size: the masks' sizes come from the graph too
    mask = torch.ones(2, 112, 176, dtype=torch.bool)
    mask[1, 80:, :] = False
    mask[1, :, 130:] = False
    images[1][:, ~mask[1]] = 0
    with torch.no_grad():
        ref = model(images, PROMPTS[1], pixel_mask=mask)
    assert_outputs_match(exported(images, PROMPTS[1], pixel_mask=mask), ref, ATOL)


def test_detect_through_backend_equals_torch(tiny):
    """The detection path (resize, forward, post-processing) gives the same boxes and phrases on every backend."""
    import shutil

    model, cache = tiny["model"], tiny["root"] / "cache"
    cached = backends.cached_export_path(cache, tiny["info"].weights_hash)
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny["info"].path, cached)  # the fixture's file, where the cache looks: no second export
    exported = backends.open_model(model, "onnxruntime", cache_dir=cache)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (96, 120, 3), dtype=np.uint8)
    mine = exported.detect(frame, PROMPTS[1], box_threshold=0.05, text_threshold=0.05, short_side=128,
                           max_side=160)
    ref = model.detect(frame, PROMPTS[1], box_threshold=0.05, text_threshold=0.05, short_side=128, max_side=160)
    assert len(ref) > 0
    assert mine.phrases == ref.phrases
    np.testing.assert_allclose(mine.boxes_xyxy, ref.boxes_xyxy, atol=1e-3)
    np.testing.assert_allclose(mine.scores, ref.scores, atol=1e-4)


def test_streams_of_two_sizes_share_one_cached_export(tmp_path):
    """The daemon's detector (streamer.inference.GdinoDetector, as `groundwatch run` builds it) on the onnxruntime
    backend with an empty cache: cameras of two resolutions (so two model input sizes) use one exported file,
    written once; a second detector (a restarted daemon) reuses it. (The cache used to be keyed by the input size:
    every new camera resolution exported the graph again, a minute or more each.)"""
    from streamer.inference import GdinoDetector

    cache = tmp_path / "cache"
    common = dict(weights="tiny", box_threshold=0.05, text_threshold=0.05, short_side=96, max_side=160)
    detector = GdinoDetector(backend="onnxruntime", cache_dir=str(cache), **common)
    reference = GdinoDetector(backend="torch", **common)
    rng = np.random.default_rng(5)
    frames = {(120, 160): rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),  # 96x128 into the model
              (200, 120): rng.integers(0, 256, (200, 120, 3), dtype=np.uint8)}  # 160x96
    encoding, ref_encoding = detector.encode(PROMPTS[1]), reference.encode(PROMPTS[1])
    for frame in frames.values():
        [mine], [ref] = detector.detect([frame], encoding), reference.detect([frame], ref_encoding)
        assert len(ref.phrases) > 0
        assert mine.phrases == ref.phrases
        np.testing.assert_allclose(mine.boxes_xyxy, ref.boxes_xyxy, atol=1e-3)
    [path] = list(cache.rglob("*.onnx"))
    assert path == backends.cached_export_path(cache, export.weights_hash(detector.model.model))
    stamp = path.stat().st_mtime_ns
    again = GdinoDetector(backend="onnxruntime", cache_dir=str(cache), **common)
    [mine] = again.detect([frames[(200, 120)]], again.encode(PROMPTS[1]))
    assert mine.phrases == ref.phrases
    assert list(cache.rglob("*.onnx")) == [path] and path.stat().st_mtime_ns == stamp, "exported again"


def test_export_cli_writes_both_graphs(tiny, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    image_path, text_path = tmp_path / "model.onnx", tmp_path / "text.onnx"
    status = export_main([str(tiny["weights"]), "--format", "onnx", "-o", str(image_path), "--size", "96x128",
                          "--text", str(text_path)])
    assert status == 0, capsys.readouterr().err
    metadata = export.read_metadata(image_path)
    assert metadata[export.METADATA_HASH] == export.weights_hash(tiny["model"])
    assert metadata["dynamic_axes"] == "batch,height,width,tokens,queries" and "height" not in metadata
    session = ort.InferenceSession(str(image_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(export.IMAGE_INPUTS)
    assert session.get_inputs()[2].shape == ["batch", "tokens", tiny["model"].config.hidden_dim]
    # The text graph gives encode_text's features.
    model = tiny["model"]
    text = model.encode_text(PROMPTS[2])
    text_session = ort.InferenceSession(str(text_path), providers=["CPUExecutionProvider"])
    [features] = text_session.run(None, {"input_ids": text.input_ids.numpy(),
                                         "attention_mask": text.attention_mask.numpy(),
                                         "position_ids": text.position_ids.numpy()})
    np.testing.assert_allclose(features, text.features.detach().numpy(), atol=1e-4)


def test_detect_cli_with_onnxruntime(tiny, tmp_path, capsys):
    import cv2

    image = np.random.default_rng(3).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "frame.png"), image)
    for backend in ("torch", "onnxruntime"):
        status = detect_main([str(tmp_path / "frame.png"), "-p", PROMPTS[1], "-w", str(tiny["weights"]),
                              "--backend", backend, "-o", str(tmp_path / backend), "--box-threshold", "0.05"])
        assert status == 0, capsys.readouterr().err
    import json

    torch_json = json.loads((tmp_path / "torch" / "frame_detections.json").read_text())["detections"]
    onnx_json = json.loads((tmp_path / "onnxruntime" / "frame_detections.json").read_text())["detections"]
    assert [d["phrase"] for d in torch_json] == [d["phrase"] for d in onnx_json]


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_export_of_weights_that_do_not_load(tmp_path, capsys):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint at all")
    assert export_main([str(broken), "-o", str(tmp_path / "model.onnx")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "groundwatch export: error:" in err and "broken.pth" in err
    assert not (tmp_path / "model.onnx").exists()


def test_an_export_over_its_own_weights_is_refused(tiny, tmp_path, capsys):
    """`groundwatch export weights -o weights/model.safetensors` (or onto a .pth given as the weights) wrote the ONNX
    graph over the checkpoint it had just loaded, and `--text` naming the same file as `-o` overwrote the image
    graph with the text graph. All are refused before anything is written."""
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(tiny["weights"], weights)
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    for argv in ([str(weights), "-o", str(weights / "model.safetensors")],
                 [str(weights), "-o", str(weights / "groundwatch.json")],
                 [str(weights), "-o", str(tmp_path / "m.onnx"), "--text", str(weights / "model.safetensors")],
                 [str(weights), "-o", str(tmp_path / "m.onnx"), "--text", str(tmp_path / "m.onnx")]):
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "would overwrite" in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in weights.iterdir()} == before
    assert not (tmp_path / "m.onnx").exists()
    # An export kept beside its weights may be exported again (the first version of the check refused it).
    for _ in range(2):
        assert export_main([str(weights), "-o", str(weights / "model.onnx"), "--size", "64x64"]) == 0, \
            capsys.readouterr().err


def test_exported_file_from_other_weights_is_refused(tiny, tmp_path, capsys):
    """A file exported from other weights than the config names would run and give wrong answers: refused."""
    torch.manual_seed(7)
    other = GroundingDino(configs.tiny(pretrained_text=None)).eval()
    with pytest.raises(backends.ExportMismatchError, match="exported from other weights"):
        backends.open_model(other, "onnxruntime", onnx_path=tiny["info"].path)
    # ... and through the CLI, one line, exit 1.
    import cv2

    cv2.imwrite(str(tmp_path / "frame.png"), np.zeros((40, 50, 3), np.uint8))
    other_weights = ck.save(other.state_dict(), other.config, tmp_path / "other")
    status = detect_main([str(tmp_path / "frame.png"), "-p", "a .", "-w", str(other_weights), "--backend",
                          "onnxruntime", "--onnx", str(tiny["info"].path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and "exported from other weights" in err and "Traceback" not in err


@pytest.mark.parametrize("size", [(24, 160), (128, 20), (4100, 64)])
def test_frame_size_the_graph_does_not_take_is_refused_in_words(tiny, size):
    """Sides under 32 or over 4096 pixels (after the model's resize) are refused before the runtime runs, naming
    the size and the limits; the backend keeps serving other sizes."""
    exported = backends.open_model(tiny["model"], "onnxruntime", onnx_path=tiny["info"].path)
    height, width = size
    with pytest.raises(backends.BackendError, match=rf"{height}x{width} is too (small|large).*pixels"):
        exported(torch.zeros(1, 3, height, width), PROMPTS[0])
    images = torch.randn(1, 3, 64, 96)
    assert_outputs_match(exported(images, PROMPTS[0]), run_torch(tiny["model"], images, PROMPTS[0]), ATOL)


def test_file_from_before_dynamic_sizes_is_run_at_its_size_only(tiny, tmp_path):
    """A file exported before height and width were dynamic carries its one size in its metadata ("height",
    "width"): the backend refuses another size in words instead of letting the runtime fail inside."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(tiny["info"].path))
    proto.metadata_props.add(key="height", value="128")
    proto.metadata_props.add(key="width", value="160")
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    exported = backends.open_model(tiny["model"], "onnxruntime", onnx_path=old)
    with pytest.raises(backends.ExportMismatchError, match=r"128x160 inputs only.*got 96x128.*export it again"):
        exported(torch.randn(1, 3, 96, 128), PROMPTS[0])
    images = torch.randn(1, 3, 128, 160)
    assert_outputs_match(exported(images, PROMPTS[0]), run_torch(tiny["model"], images, PROMPTS[0]), ATOL)


def test_image_graph_declares_dynamic_height_and_width(tiny):
    """The graph's inputs and outputs name their dynamic axes, and a plain ONNX Runtime session (no groundwatch
    code) runs the file at a size it was not traced at. Regression: with the axes merely declared dynamic, the
    traced file ran at the traced size only; ONNX Runtime stopped at the first deformable attention's Split,
    "Split size 320 exceeds the remaining size of the selected axis, 256"."""
    ort = pytest.importorskip("onnxruntime")
    model, info = tiny["model"], tiny["info"]
    assert info.traced_size == (128, 160)
    session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs() + session.get_outputs()}
    assert shapes["pixel_values"] == ["batch", 3, "height", "width"]
    assert shapes["pixel_mask"] == ["batch", "height", "width"]
    assert shapes["logits"] == ["batch", "queries", "tokens"] and shapes["boxes"] == ["batch", "queries", 4]
    text = model.encode_text(PROMPTS[0])
    images = torch.randn(1, 3, 96, 128)
    feeds = export.image_inputs(images, torch.ones(1, 96, 128, dtype=torch.bool), text)
    logits, boxes = session.run(None, feeds)
    ref = run_torch(model, images, PROMPTS[0])
    np.testing.assert_allclose(boxes, ref.boxes.numpy(), atol=ATOL)


def test_file_that_is_not_an_export_is_refused(tiny, tmp_path):
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"\x00garbage")
    with pytest.raises(export.ExportError, match="not an ONNX file"):
        backends.open_model(tiny["model"], "onnxruntime", onnx_path=fake)


@pytest.mark.parametrize("backend,extra", [("onnxruntime", "groundwatch[onnx]"), ("openvino", "groundwatch[openvino]")])
def test_backend_not_installed_names_the_extra(tiny, monkeypatch, backend, extra):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as if the package were not installed
    with pytest.raises(backends.BackendNotInstalled, match=extra.replace("[", r"\[").replace("]", r"\]")):
        backends.open_model(tiny["model"], backend)


def test_old_opset_is_refused(tiny, tmp_path):
    with pytest.raises(export.ExportError, match="GridSample"):
        export.to_onnx(tiny["model"], tmp_path / "old.onnx", height=64, width=64, opset=13)


def test_fast_bfloat16_probe_and_auto_dtype(monkeypatch):
    monkeypatch.setenv("GROUNDWATCH_FAST_BF16", "1")
    assert backends.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setenv("GROUNDWATCH_FAST_BF16", "0")
    assert backends.resolve_dtype("auto", "cpu") == "float32"
    assert backends.resolve_dtype("float32", "cpu") == "float32"
    monkeypatch.delenv("GROUNDWATCH_FAST_BF16")
    flags = backends._cpuinfo_flags()
    if flags:  # Linux: the probe agrees with the kernel's flags
        assert backends.cpu_has_fast_bfloat16() == bool({"amx_bf16", "avx512_bf16"} & flags)


@pytest.mark.parametrize("flags,runtimes,expected", [
    ({"avx512f", "amx_tile", "amx_bf16"}, {"openvino", "onnxruntime"}, ("torch", "bfloat16")),
    ({"avx512f", "avx512_bf16"}, set(), ("torch", "bfloat16")),
    ({"avx512f", "avx2"}, {"openvino", "onnxruntime"}, ("torch", "float32")),
    ({"avx2"}, {"onnxruntime"}, ("torch", "float32")),
    ({"avx2"}, set(), ("torch", "float32")),
])
def test_auto_backend_and_dtype_follow_the_cpu(monkeypatch, flags, runtimes, expected):
    """backend = dtype = "auto" on the CPU: mixed bfloat16 torch where the CPU has AMX or AVX-512 BF16, else the
    torch float32, which was faster than ONNX Runtime and OpenVINO in float32 on a quiet machine, even where they are
    installed (docs/benchmarks.md has the figures)."""
    monkeypatch.delenv("GROUNDWATCH_FAST_BF16", raising=False)
    monkeypatch.setattr(backends, "_cpuinfo_flags", lambda: set(flags))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "amx_tile" in flags, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "avx512_bf16" in flags, raising=False)
    monkeypatch.setattr(backends, "installed", lambda backend: backend in runtimes)
    assert backends.resolve("auto", "auto", "cpu") == expected
    # A float32 request keeps float32 parity: the fastest float32 backend measured, torch.
    float32_choice = "torch"
    assert backends.resolve("auto", "float32", "cpu") == (float32_choice, "float32")
    assert backends.resolve_backend("auto", "cpu") == float32_choice
    # An explicit backend keeps its dtype rule; a GPU is always torch.
    assert backends.resolve("onnxruntime", "auto", "cpu") == ("onnxruntime", "float32")
    fast_bf16 = bool({"amx_bf16", "avx512_bf16"} & flags)
    assert backends.resolve("torch", "auto", "cpu") == ("torch", "bfloat16" if fast_bf16 else "float32")
    assert backends.resolve("auto", "auto", "cuda") == ("torch", "float32")


# ----------------------------------------------------------------------------------------------------------------
# Full size: random Swin-T OGC at 480x640 and the default model at its scale (slow)


@pytest.fixture(scope="module")
def swint(tmp_path_factory):
    model = random_model(configs.swint_ogc())
    info = export.to_onnx(model, tmp_path_factory.mktemp("swint") / "image.onnx")  # traced at TRACE_SIZE
    yield model, info
    del model


@pytest.mark.slow
@pytest.mark.timeout(1800)  # exporting Swin-T takes minutes on a loaded 2-core machine (the default limit is 600 s)
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_swint_ogc_exported_matches_torch(swint, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    model, info = swint
    exported = backends.open_model(model, backend, onnx_path=info.path)
    atol = ATOL if backend == "onnxruntime" else OPENVINO_ATOL
    torch.manual_seed(4)
    # One file at three sizes (none the traced one), batch 1 and 2, prompts of 4 to 27 tokens.
    for (height, width), batch, prompt in (((480, 640), 1, PROMPTS[1]), ((480, 640), 2, PROMPTS[0]),
                                           ((320, 320), 2, PROMPTS[2]), ((256, 384), 1, PROMPTS[1])):
        images = torch.randn(batch, 3, height, width)
        assert_selection_tolerant_match(exported(images, prompt), run_torch(model, images, prompt), atol)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_default_model_exported_matches_torch(tmp_path_factory, backend):
    if backend == "openvino":
        pytest.importorskip("openvino")
    from gdino.shapes import render_scene

    model = gdino.load("default")
    info = export.to_onnx(model, tmp_path_factory.mktemp("default") / "image.onnx")  # traced at TRACE_SIZE
    exported = backends.open_model(model, backend, onnx_path=info.path)
    atol = ATOL if backend == "onnxruntime" else OPENVINO_ATOL
    from gdino import processing

    short = model.config.input_short_side
    # Landscape and portrait frames at the model's scale: 192x256 and 256x192 through one file.
    for frame_size in ((240, 320), (320, 240)):
        frames = [render_scene(10**12 + 60 + k, frame_size, num_objects=(1, 3))[0] for k in range(2)]
        images, _, _ = processing.preprocess(frames, short_side=short, max_side=256)
        assert images.shape[-2:] == (frame_size[0] * short // 240, frame_size[1] * short // 240)
        for batch, prompt in ((1, "green star . black cross ."),
                              (2, "purple square . black ring . red circle . blue triangle .")):
            assert_outputs_match(exported(images[:batch], prompt), run_torch(model, images[:batch], prompt), atol)


def test_a_failed_export_leaves_the_previous_file_whole(tiny, tmp_path, monkeypatch):
    """The graph was written in place: an export that failed or was interrupted after the trace (here, while its
    metadata was written) left a file without the weights' hash where a working export had been (found by an
    audit). Both graphs are written under a temporary name and renamed when whole."""
    path, text_path = tmp_path / "model.onnx", tmp_path / "text.onnx"
    export.to_onnx(tiny["model"], path, height=64, width=64)
    export.text_to_onnx(tiny["model"], text_path)
    before, text_before = path.read_bytes(), text_path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_write_metadata", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.to_onnx(tiny["model"], path, height=64, width=64)
    with pytest.raises(RuntimeError, match="disk full"):
        export.text_to_onnx(tiny["model"], text_path)
    assert path.read_bytes() == before and text_path.read_bytes() == text_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "text.onnx"]
