"""ONNX export with the text encoding as inputs: the per-frame graph runs while the prompt is encoded once.

Two graphs, as the daemon runs the model (``docs/export.md`` lists their inputs and outputs with shapes):

- the **image graph** (``to_onnx``): Swin, the feature enhancer with its image<->text fusion, language-guided query
  selection and the decoder. Inputs: ``pixel_values`` (B, 3, H, W) float32 normalised, ``pixel_mask`` (B, H, W)
  bool, and what ``GroundingDino.encode_text`` produces for each image's prompt: ``text_features`` (B, T, hidden),
  ``token_mask`` (B, T) bool, ``text_attention_mask`` (B, T, T) bool (sub-sentence mask), ``position_ids``
  (B, T) int64. Outputs: ``logits`` (B, Q, T) raw (masked tokens -inf) and ``boxes`` (B, Q, 4) cxcywh in [0, 1].
  Batch, height, width, tokens (and queries, ``min(num_queries, S)``) are dynamic axes: every size the model
  derives from the input (the Swin windows' pads and shift masks, the levels' sizes and start indices, the
  deformable attention's per-level split, the reference points and query-selection anchors, the masks and sine
  position maps) is computed in the graph from the runtime shape, so one file runs at every frame size from
  ``MIN_SIDE`` to ``MAX_SIDE`` pixels a side (the torch path's padding is in the graph too).
- the **text graph** (``text_to_onnx``): BERT + ``feat_map``; ``input_ids``, ``attention_mask`` (B, T, T) bool,
  ``position_ids`` -> ``text_features``. The tokenizer (and the sub-sentence mask it implies) stays in Python.

Multi-scale deformable attention exports as standard ONNX ``GridSample`` (opset >= 16), one per level: the plain
PyTorch reference (``gw_kernels.reference``) is what gets traced. Every file carries the SHA-256 of the weights it was
exported from (``weights_hash``) in its metadata, so a file from other weights is refused, not run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .text import TextEncoding

IMAGE_INPUTS = ("pixel_values", "pixel_mask", "text_features", "token_mask", "text_attention_mask", "position_ids")
IMAGE_OUTPUTS = ("logits", "boxes")
TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")
TEXT_OUTPUTS = ("text_features",)
DEFAULT_OPSET = 17  # GridSample needs 16; 17 adds LayerNormalization
MIN_OPSET = 16
METADATA_HASH = "groundwatch_weights_sha256"
# The prompt traced at export; any prompt of up to config.max_text_len tokens runs on the exported file.
_TRACE_PROMPT = "a red car . person . dog with a leash ."
# The frame size traced at export when none is given; any size from MIN_SIDE to MAX_SIDE runs on the file. The pads
# are computed in the graph whatever the size; this one needs every one of them (not a multiple of the patch, of
# the window at the first stage, of 2 at the merges), so no step that a zero pad skips goes untraced.
TRACE_SIZE = (198, 262)
MIN_SIDE, MAX_SIDE = 32, 4096
DYNAMIC_AXES = "batch,height,width,tokens,queries"


class ExportError(RuntimeError):
    """The model cannot be exported as asked (bad size, bad opset, ONNX tooling missing)."""


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    weights_hash: str
    opset: int
    traced_size: tuple[int, int]  # the size traced; the file runs at any size (check_input_size)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the model's weights (names, shapes and float32 values, in name order): the key of the export
    cache and the check that an exported file belongs to the weights it is run with. Independent of the dtype
    and device the model was loaded in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.float()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class _ImageGraph(nn.Module):
    """The traced module: images + text-encoding tensors -> (logits, boxes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask, text_features, token_mask, text_attention_mask, position_ids):
        # The forward pass reads no token ids (only their shape): position_ids stands in for them.
        text = TextEncoding(captions=[""] * pixel_values.shape[0], input_ids=position_ids, token_mask=token_mask,
                            position_ids=position_ids, attention_mask=text_attention_mask, features=text_features)
        out = self.model(pixel_values, text, pixel_mask=pixel_mask)
        return out.logits, out.boxes


class _TextGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert, self.feat_map = model.bert, model.feat_map

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask[:, None],
                           token_type_ids=torch.zeros_like(input_ids), position_ids=position_ids).last_hidden_state
        return self.feat_map(hidden)


def _float32_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode whose deformable attention is the GridSample reference."""
    from .model import MSDeformAttn

    exported = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    for module in exported.modules():
        if isinstance(module, MSDeformAttn):
            module.backend = "reference"  # gw_kernels.ms_deform_attn's GridSample path, the one that traces to ONNX
    return exported


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the 'onnx' package: pip install 'groundwatch[onnx]'") from None
    return onnx


@contextlib.contextmanager
def _whole(path: Path):
    """A temporary name beside ``path`` (same suffix) to write to; renamed to ``path`` when the block ends
    without an error, removed when it fails: an interrupted export leaves the previous file as it was."""
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _write_metadata(path: Path, entries: dict[str, str]) -> None:
    onnx = _require_onnx()
    proto = onnx.load(str(path))
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata an exported file carries (``groundwatch_weights_sha256``, ``dynamic_axes``, ...)."""
    onnx = _require_onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: not an ONNX file ({type(exc).__name__}: {exc})") from None
    return {entry.key: entry.value for entry in proto.metadata_props}


def check_input_size(height: int, width: int) -> None:
    """Raise ``ExportError`` for a frame size the image graph does not take (sides from ``MIN_SIDE`` to
    ``MAX_SIDE`` pixels, after the model's resize): said before running, not as a failure inside a runtime."""
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ExportError(f"input size {height}x{width} is too small: both sides must be at least {MIN_SIDE} pixels "
                          "(after the model's resize)")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ExportError(f"input size {height}x{width} is too large: both sides must be at most {MAX_SIDE} pixels")


def to_onnx(model: nn.Module, path: str | os.PathLike, *, height: int | None = None, width: int | None = None,
            opset: int = DEFAULT_OPSET, weights_sha256: str | None = None) -> ExportInfo:
    """Export the image graph of ``model`` (a ``GroundingDino``) to ``path``. Batch, height, width and tokens are
    dynamic: the file runs at every frame size ``check_input_size`` takes. ``height`` x ``width`` is only the size
    traced (default ``TRACE_SIZE``). Returns what was written."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} has no GridSample: use opset {MIN_OPSET} or later")
    height, width = (height or TRACE_SIZE[0]), (width or TRACE_SIZE[1])
    check_input_size(height, width)
    _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = weights_sha256 or weights_hash(model)
    exported = _float32_copy(model)
    text = exported.encode_text(_TRACE_PROMPT).expand(2)
    # Batch 2 so no broadcast is specialised to one image; a padded strip so the masked (general) path is traced:
    # on unpadded frames it computes the same numbers as the unmasked fast path.
    pixel_values = torch.randn(2, 3, height, width)
    pixel_mask = torch.ones(2, height, width, dtype=torch.bool)
    pixel_mask[1, :, width - max(1, width // 8):] = False
    inputs = (pixel_values, pixel_mask, text.features.detach().contiguous(), text.token_mask.contiguous(),
              text.attention_mask.contiguous(), text.position_ids.contiguous())
    dynamic_axes = {
        "pixel_values": {0: "batch", 2: "height", 3: "width"}, "pixel_mask": {0: "batch", 1: "height", 2: "width"},
        "text_features": {0: "batch", 1: "tokens"}, "token_mask": {0: "batch", 1: "tokens"},
        "text_attention_mask": {0: "batch", 1: "tokens", 2: "tokens"}, "position_ids": {0: "batch", 1: "tokens"},
        "logits": {0: "batch", 1: "queries", 2: "tokens"}, "boxes": {0: "batch", 1: "queries"},
    }
    with _whole(path) as partial:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values it records as constants
            torch.onnx.export(_ImageGraph(exported), inputs, str(partial), dynamo=False, opset_version=opset,
                              input_names=list(IMAGE_INPUTS), output_names=list(IMAGE_OUTPUTS),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        # No "height"/"width" keys: files from before the size was dynamic carry them, and run at that size only.
        _write_metadata(partial, {METADATA_HASH: digest, "graph": "image", "dynamic_axes": DYNAMIC_AXES,
                                  "min_side": MIN_SIDE, "max_side": MAX_SIDE, "traced_size": f"{height}x{width}",
                                  "opset": opset, "hidden_dim": exported.config.hidden_dim,
                                  "max_text_len": exported.config.max_text_len,
                                  "num_queries": exported.config.num_queries})
    return ExportInfo(path, digest, opset, (height, width))


def text_to_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 weights_sha256: str | None = None) -> Path:
    """Export the text graph (BERT + ``feat_map``): token ids -> ``text_features``; batch and tokens dynamic."""
    _require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = weights_sha256 or weights_hash(model)
    exported = _float32_copy(model)
    text = exported.encode_text(_TRACE_PROMPT).expand(2)
    inputs = (text.input_ids.contiguous(), text.attention_mask.contiguous(), text.position_ids.contiguous())
    dynamic_axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens", 2: "tokens"},
                    "position_ids": {0: "batch", 1: "tokens"}, "text_features": {0: "batch", 1: "tokens"}}
    with _whole(path) as partial:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_TextGraph(exported), inputs, str(partial), dynamo=False, opset_version=opset,
                              input_names=list(TEXT_INPUTS), output_names=list(TEXT_OUTPUTS),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        _write_metadata(partial, {METADATA_HASH: digest, "graph": "text", "opset": opset})
    return path


def image_inputs(pixel_values: torch.Tensor, pixel_mask: torch.Tensor, text: TextEncoding) -> dict:
    """The image graph's feeds as numpy arrays: one prompt's encoding repeated for every image."""
    batch = pixel_values.shape[0]
    text = text.expand(batch)
    tensors = (pixel_values.float(), pixel_mask.bool(), text.features.float(), text.token_mask,
               text.attention_mask, text.position_ids)
    return {name: tensor.detach().to("cpu").contiguous().numpy() for name, tensor in zip(IMAGE_INPUTS, tensors)}
