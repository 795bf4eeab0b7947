"""Grounding DINO for groundwatch: the model, its checkpoints, pre/post-processing, training and evaluation.

``gdino.load(path_or_"default", device=..., dtype=...)`` is the one entry point for weights: an official ``.pth``,
a Hugging Face folder (``config.json`` + ``model.safetensors``), a groundwatch folder, or ``"default"``, the small
model trained on the shapes world that ships inside the package.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, infer_config, load_state, read_checkpoint
from .config import GroundingDinoConfig

DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "default"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

__all__ = ["load", "build", "CheckpointError", "DEFAULT_WEIGHTS"]


def _check_target(device, dtype) -> tuple[torch.device, torch.dtype]:
    if isinstance(dtype, str):
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or float64")
        dtype = named
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}: use float32, bfloat16, float16 or float64")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}: use cpu or cuda")
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is not supported on the CPU: use float32 or bfloat16")
    return device, dtype


def build(config: GroundingDinoConfig):
    """A randomly initialised model (the text encoder from MiniLM when the config asks for it)."""
    from .model import GroundingDino  # the model imports timm (seconds): `import gdino` stays light without it

    return GroundingDino(config)


def load(path: str | os.PathLike = "default", device: str | torch.device = "cpu",
         dtype: torch.dtype | str = torch.float32):
    """Load weights in any supported layout into a ``GroundingDino`` in eval mode.

    Key accounting is strict: a checkpoint with missing, unexpected or misshapen keys raises a
    ``CheckpointError`` that lists them. Nothing is fetched from the network.
    """
    from .model import GroundingDino  # the model imports timm (seconds): `import gdino` stays light without it

    device, dtype = _check_target(device, dtype)
    source = DEFAULT_WEIGHTS if str(path) == "default" else Path(path)
    if str(path) == "default" and not (source / "model.safetensors").is_file():
        raise CheckpointError(f"the default model's weights are missing from the package ({source})")
    state, config, vocab = read_checkpoint(source)
    if config is None:
        config = infer_config(state)
    # A checkpoint normally carries the text encoder. One whose config names a packaged pretrained encoder
    # ("minilm") may leave its frozen weights out (the default model does, to stay small): build them from the
    # package instead. Otherwise do not initialise the text encoder before overwriting it.
    text_from_package = config.text.pretrained is not None and not any(k.startswith("bert.") for k in state)
    if not text_from_package:
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, pretrained=None))
    model = GroundingDino(config)
    load_state(model, state, what=str(source))
    if vocab is not None:
        model.vocab_path = str(vocab)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # bfloat16 matmuls, float32 norms, residual streams, query selection and box refinement
        # (gdino.model.precision): whole-model bfloat16 reorders the query selection's near-tied ranks.
        from .model.precision import to_mixed_bfloat16

        return to_mixed_bfloat16(model.to(device=device)).eval()
    return model.to(device=device, dtype=dtype).eval()
