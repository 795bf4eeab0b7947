"""Where the image graph runs: PyTorch, ONNX Runtime or OpenVINO, and the dtype on the CPU.

``open_model(model, backend)`` returns something that is called like a ``GroundingDino``
(``out = m(pixel_values, text, pixel_mask=...)`` -> ``logits``, ``boxes``) and carries what the detection path
reads from the model (``config``, ``tokenizer``, ``encode_text``, ``feat_map``), so ``gdino.predict`` and the
daemon use every backend alike. The text encoder always runs in PyTorch, once per prompt; the exported graph
runs per frame (``gdino.export``).

Exported files live in a cache folder keyed by the weights' SHA-256 (``gdino.export.weights_hash``), one file for
every input size (height and width are dynamic axes of the graph), written on first use: ``$GROUNDWATCH_CACHE`` or
``~/.cache/groundwatch``, then ``onnx/<hash[:16]>/image_opset<N>.onnx``. A file given by path must carry the hash of the weights it is
run with (``ExportMismatchError`` otherwise).

Fast bfloat16 on the CPU (``cpu_has_fast_bfloat16``): AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``), as
PyTorch's own CPU probe reports them (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``, which
also check the OS enabled the AMX tiles), or else the flags in ``/proc/cpuinfo``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from . import export

log = logging.getLogger("gdino.backends")

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
EXTRAS = {"onnxruntime": ("onnxruntime", "groundwatch[onnx]"), "openvino": ("openvino", "groundwatch[openvino]")}


class BackendError(RuntimeError):
    """A backend that cannot run here (not installed, wrong device) or an exported file that does not fit."""


class BackendNotInstalled(BackendError):
    pass


class ExportMismatchError(BackendError):
    """An exported file from other weights than the ones it is asked to run (or, for a file exported before height
    and width were dynamic, a frame of another size than it was exported for)."""


# ----------------------------------------------------------------------------------------------------------------
# CPU features and automatic choices


def cpu_has_fast_bfloat16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AMX or AVX-512 BF16); ``GROUNDWATCH_FAST_BF16=0/1``
    overrides the probe."""
    forced = os.environ.get("GROUNDWATCH_FAST_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    probe = getattr(torch, "cpu", None)
    try:
        if probe._is_amx_tile_supported() or probe._is_avx512_bf16_supported():
            return True
    except AttributeError:  # an older or newer torch without the private probes: read the flags
        pass
    return bool({"amx_bf16", "avx512_bf16"} & _cpuinfo_flags())


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"``: bfloat16 on a CPU with fast bfloat16, float32 on other CPUs; float32 on a GPU (use
    ``float16``/``bfloat16`` there explicitly)."""
    if dtype != "auto":
        return dtype
    if torch.device(device).type == "cpu" and cpu_has_fast_bfloat16():
        return "bfloat16"
    return "float32"


def resolve_backend(backend: str, device: str) -> str:
    """``"auto"`` for float32: on the CPU the first installed of ``AUTO_FLOAT32_ORDER`` (see ``resolve``, which also
    picks bfloat16 where the CPU has it); on a GPU torch."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return resolve(backend, "float32", device)[0]
    if backend != "torch" and torch.device(device).type != "cpu":
        raise BackendError(f"backend {backend!r} runs on the CPU here; use device = 'cpu' or backend = 'torch'")
    return backend


def installed(backend: str) -> bool:
    """Whether the runtime of an exported backend (and the ``onnx`` package that exports for it) can be imported."""
    import importlib.util

    return importlib.util.find_spec(EXTRAS[backend][0]) is not None and importlib.util.find_spec("onnx") is not None


# backend = "auto" on the CPU in float32: the first of these that is installed. Measured on a quiet machine
# (docs/benchmarks.md, "export: CPU backends", 2026-11-27 23:50 UTC) groundwatch's float32 torch path beat both exported
# runtimes (ONNX Runtime 0.67x / 0.77x, OpenVINO 0.90x / 0.83x on Swin-T 480x640 / the default model 320x320), so
# torch comes first; the exported backends stay an explicit choice (an iGPU, a TensorRT hand-off, no PyTorch).
AUTO_FLOAT32_ORDER = ("torch",)


def resolve(backend: str, dtype: str, device: str) -> tuple[str, str]:
    """The (backend, dtype) to run for a config's ``backend`` and ``dtype``, either of which may be ``"auto"``.

    On a GPU: torch; ``dtype="auto"`` is float32 there. On the CPU, ``backend="auto"``:

    - with fast bfloat16 (``cpu_has_fast_bfloat16``: AMX or AVX-512 BF16) and ``dtype`` ``"auto"`` or
      ``"bfloat16"``: torch in mixed bfloat16 (``gdino.model.precision``; judged on detections,
      tests/test_bfloat16.py);
    - otherwise float32 on the first installed of ``AUTO_FLOAT32_ORDER`` (torch: the fastest float32 path measured,
      ahead of ONNX Runtime and OpenVINO; see the order's comment).

    An explicit backend keeps ``resolve_dtype``'s rule for torch; the exported backends run float32 graphs.
    Speeds behind the order: docs/export.md.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        if not on_cpu:
            return "torch", resolve_dtype(dtype, device)
        if dtype in ("auto", "bfloat16") and (dtype == "bfloat16" or cpu_has_fast_bfloat16()):
            return "torch", "bfloat16"
        if dtype not in ("auto", "float32"):
            return "torch", dtype
        return next(b for b in AUTO_FLOAT32_ORDER if b == "torch" or installed(b)), "float32"
    backend = resolve_backend(backend, device)
    return backend, (resolve_dtype(dtype, device) if backend == "torch" else "float32")


def require(backend: str):
    """Import the runtime package of ``backend`` or raise ``BackendNotInstalled`` naming the extra."""
    module, extra = EXTRAS[backend]
    try:
        return __import__(module)
    except ImportError:
        raise BackendNotInstalled(f"backend {backend!r} needs the {module!r} package, which is not installed: "
                                  f"pip install '{extra}'") from None


def cache_root() -> Path:
    return Path(os.environ.get("GROUNDWATCH_CACHE") or Path.home() / ".cache" / "groundwatch")


def cached_export_path(cache_dir: Path, digest: str, opset: int = export.DEFAULT_OPSET) -> Path:
    """Where the cache keeps the image graph of the weights with SHA-256 ``digest``: one file, any frame size."""
    return Path(cache_dir) / "onnx" / digest[:16] / f"image_opset{opset}.onnx"


def check_exported(path: Path, digest: str, what: str = "the weights") -> dict:
    """The file's metadata, after checking it was exported from the weights with SHA-256 ``digest``."""
    metadata = export.read_metadata(path)
    found = metadata.get(export.METADATA_HASH)
    if found is None:
        raise ExportMismatchError(f"{path} carries no {export.METADATA_HASH}: it was not exported by groundwatch "
                                  "export; export it again from the weights")
    if found != digest:
        raise ExportMismatchError(f"{path} was exported from other weights (sha256 {found[:16]}...) than "
                                  f"{what} (sha256 {digest[:16]}...): export it again with "
                                  "'groundwatch export WEIGHTS --format onnx'")
    if metadata.get("graph", "image") != "image":
        raise ExportMismatchError(f"{path} is the {metadata.get('graph')} graph; the backend runs the image graph")
    return metadata


# ----------------------------------------------------------------------------------------------------------------
# Runners: one exported file, numpy in, numpy out


class _OnnxRuntimeRunner:
    def __init__(self, path: Path, threads: int):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # No busy-waiting between runs: the text encoder, the tracker and the daemon's other processes share the
        # cores, and spinning threads would take them (measured: they slowed PyTorch alternating with it 5x).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
        logits, boxes = self.session.run(list(export.IMAGE_OUTPUTS), feeds)
        return logits, boxes


class _OpenVinoRunner:
    """OpenVINO reads the ONNX file itself. Inference precision is float32 unless asked otherwise: on a CPU with
    AMX OpenVINO would otherwise pick bfloat16 on its own."""

    def __init__(self, path: Path, threads: int, precision: str = "f32"):
        openvino = require("openvino")
        core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(name) for name in export.IMAGE_OUTPUTS]

    def __call__(self, feeds: dict) -> tuple[np.ndarray, np.ndarray]:
        results = self.request.infer(feeds)
        return results[self.outputs[0]].copy(), results[self.outputs[1]].copy()


# ----------------------------------------------------------------------------------------------------------------
# The model-like wrapper


class ExportedGroundingDino:
    """A ``GroundingDino`` whose image graph runs in ONNX Runtime or OpenVINO; the text encoder stays in PyTorch.

    ``model`` must be float32 on the CPU. ``onnx_path``: a file to run (its hash must match the weights); without
    it, the file comes from (and is written to) ``cache_dir``: one file for every input size.
    """

    def __init__(self, model, backend: str, *, onnx_path: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, threads: int = 0, precision: str = "f32",
                 weights_sha256: str | None = None):
        if backend not in EXTRAS:
            raise BackendError(f"ExportedGroundingDino runs 'onnxruntime' or 'openvino', not {backend!r}")
        require(backend)  # fail now, with the extra's name, not at the first frame
        require_onnx = export._require_onnx
        require_onnx()
        self.model, self.backend, self.threads, self.precision = model.float().eval(), backend, threads, precision
        self.weights_sha256 = weights_sha256 or export.weights_hash(model)
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root()
        self.onnx_path = Path(onnx_path) if onnx_path else None
        self._runner_instance = None
        self._lock = threading.Lock()
        # A file exported before height and width were dynamic axes declares its one size in its metadata.
        self.fixed_size: tuple[int, int] | None = None
        if self.onnx_path is not None:
            if not self.onnx_path.is_file():
                raise BackendError(f"exported file not found: {self.onnx_path}")
            metadata = check_exported(self.onnx_path, self.weights_sha256)
            if "height" in metadata and "width" in metadata:
                self.fixed_size = (int(metadata["height"]), int(metadata["width"]))

    # What the detection path reads from a model.
    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def feat_map(self):
        return self.model.feat_map

    def encode_text(self, captions):
        return self.model.encode_text(captions)

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        return self

    def _check_size(self, height: int, width: int) -> None:
        """A frame size the graph does not take is refused here, in words, not inside the runtime."""
        if self.fixed_size is not None and (height, width) != self.fixed_size:
            raise ExportMismatchError(
                f"{self.onnx_path} was exported for {self.fixed_size[0]}x{self.fixed_size[1]} inputs only (an "
                f"export from before height and width were dynamic), got {height}x{width}: export it again "
                "with 'groundwatch export' for a file that runs at every size")
        try:
            export.check_input_size(height, width)
        except export.ExportError as exc:
            raise BackendError(f"the {self.backend} backend cannot run this frame: {exc}") from None

    def _runner(self):
        runner = self._runner_instance
        if runner is not None:
            return runner
        with self._lock:
            if self._runner_instance is not None:
                return self._runner_instance
            if self.onnx_path is not None:
                path = self.onnx_path
            else:
                path = cached_export_path(self.cache_dir, self.weights_sha256)
                if path.is_file():
                    check_exported(path, self.weights_sha256, what="the weights it is cached under")
                else:
                    log.info("exporting the image graph to %s (once for these weights, every frame size)", path)
                    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
                    export.to_onnx(self.model, partial, weights_sha256=self.weights_sha256)
                    os.replace(partial, path)  # another process exporting the same file loses nothing
            self._runner_instance = (_OnnxRuntimeRunner(path, self.threads) if self.backend == "onnxruntime"
                                     else _OpenVinoRunner(path, self.threads, self.precision))
            return self._runner_instance

    def __call__(self, images: torch.Tensor, text, pixel_mask: torch.Tensor | None = None):
        """images (B, 3, H, W) normalised float; text a ``TextEncoding``, a str or a list with one str ->
        ``GroundingDinoOutput`` with ``logits`` (B, Q, T) and ``boxes`` (B, Q, 4) cxcywh in [0, 1]."""
        from .model import GroundingDinoOutput

        batch, _, height, width = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.bool)
        if isinstance(text, (list, tuple)) and len(text) == 1:
            text = text[0]
        if isinstance(text, str):
            text = self.model.encode_text(text)
        if not hasattr(text, "features"):
            raise TypeError(f"text must be a str or a TextEncoding, got {type(text).__name__}")
        self._check_size(int(height), int(width))
        logits, boxes = self._runner()(export.image_inputs(images, pixel_mask, text))
        return GroundingDinoOutput(logits=torch.from_numpy(logits), boxes=torch.from_numpy(boxes),
                                   text=text.expand(batch))

    def detect(self, images, prompt, box_threshold: float = 0.35, text_threshold: float = 0.25,
               remove_combined: bool = False, short_side: int | None = None, max_side: int | None = None):
        """As ``GroundingDino.detect``: through ``gdino.predict``, the one detection path."""
        from . import predict

        single = not isinstance(images, (list, tuple))
        found = predict.detect(self, [images] if single else list(images), predict.encode(self, prompt),
                               box_threshold=box_threshold, text_threshold=text_threshold,
                               remove_combined=remove_combined, short_side=short_side, max_side=max_side)
        return found[0] if single else found

    def refer(self, images, expression: str, min_score: float = 0.0):
        from . import predict

        single = not isinstance(images, (list, tuple))
        found = predict.refer(self, [images] if single else list(images), expression, min_score=min_score)
        return found[0] if single else found


def open_model(model, backend: str = "torch", *, device: str = "cpu", onnx_path=None, cache_dir=None,
               threads: int = 0, precision: str = "f32", weights_sha256: str | None = None):
    """``model`` (a loaded ``GroundingDino``) on ``backend``: the model itself for ``torch``, an
    ``ExportedGroundingDino`` otherwise."""
    backend = resolve_backend(backend, device)
    if backend == "torch":
        if onnx_path:
            raise BackendError("an exported file (onnx) is only used by the onnxruntime and openvino backends")
        return model
    return ExportedGroundingDino(model, backend, onnx_path=onnx_path, cache_dir=cache_dir, threads=threads,
                                 precision=precision, weights_sha256=weights_sha256)
