"""``groundwatch detect``, ``groundwatch convert`` and ``groundwatch export``: the model's command-line tools.

``streamer.cli`` dispatches to :func:`detect_main`, :func:`convert_main` and :func:`export_main` with the arguments after the
subcommand. Both return an exit status: 0 on success, 1 when the weights or a run fail, 2 for bad arguments or
inputs. Errors print one line to stderr, no traceback (set ``GROUNDWATCH_DEBUG=1`` to get the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MAX_IMAGE_PIXELS = 100_000_000  # `detect` refuses larger images from their header: 300 MB each once decoded


class _InputError(Exception):
    """A bad argument or input file: exit status 2."""


def _fail(prog: str, exc: BaseException) -> int:
    if os.environ.get("GROUNDWATCH_DEBUG"):
        raise exc
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, _InputError) else EXIT_FAILED


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed usage and the one-line error (or the help)
        return int(exit_.code or 0)


# --------------------------------------------------------------------------------------------------------------
# detect
# --------------------------------------------------------------------------------------------------------------


def detect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groundwatch detect",
        description="Detect the objects a prompt describes in images; writes an annotated image and a JSON per input.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help=f"image files (anything OpenCV reads), up to {MAX_IMAGE_PIXELS // 1_000_000} megapixels "
                             "each")
    parser.add_argument("--prompt", "-p", required=True, help='what to find, e.g. "red car . person ."')
    parser.add_argument("--weights", "-w", default="default",
                        help="'default' (bundled model), an official .pth, a Hugging Face folder or a groundwatch "
                             "folder")
    parser.add_argument("--box-threshold", type=_threshold, default=0.35,
                        help="keep boxes whose best token probability exceeds this (default 0.35)")
    parser.add_argument("--text-threshold", type=_threshold, default=0.25,
                        help="tokens above this probability form a box's phrase (default 0.25)")
    parser.add_argument("--remove-combined", action="store_true",
                        help="limit each phrase to the sub-sentence of its best token")
    parser.add_argument("--referring", action="store_true",
                        help="referring-expression mode: the single box that best matches the whole prompt")
    parser.add_argument("-o", "--output", default="runs/detect", metavar="OUTDIR",
                        help="where annotated images and JSON files go (default runs/detect)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", default="float32",
                        help="float32, bfloat16, float16 or auto (bfloat16 on a CPU with AMX/AVX-512 BF16; default "
                             "float32)")
    parser.add_argument("--backend", default="torch", choices=("auto", "torch", "onnxruntime", "openvino"),
                        help="where the image graph runs (default torch); onnxruntime/openvino export it on first use "
                             "(extras groundwatch[onnx], groundwatch[openvino])")
    parser.add_argument("--onnx", default=None, metavar="FILE",
                        help="an exported image graph (groundwatch export) for --backend onnxruntime/openvino")
    return parser


def _too_large(path: Path, size: str) -> _InputError:
    return _InputError(f"image too large: {path} has {size}; the limit is {MAX_IMAGE_PIXELS // 1_000_000} "
                       f"megapixels (resize it first)")


def check_image(path: str | os.PathLike) -> tuple[int, int] | None:
    """Read only an image file's header: (height, width), or None when OpenCV reads the format but Pillow cannot
    size it from its header (then :func:`read_image` checks the size once decoded). Raises :class:`_InputError`
    for a missing or unreadable file, one that is not an image, or one over :data:`MAX_IMAGE_PIXELS`."""
    import warnings

    import cv2  # OpenCV, torch and the model load on use: `--help` and bad arguments answer at once
    from PIL import Image, UnidentifiedImageError  # a dependency of torchvision; reads headers without decoding

    path = Path(path)
    if not path.exists():
        raise _InputError(f"image not found: {path}")
    if not path.is_file():
        raise _InputError(f"not a file: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit (89 megapixels) and refuses at twice that: ours is MAX_IMAGE_PIXELS.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:  # parses the header; the pixels stay on disk
                width, height = header.size
    except Image.DecompressionBombError:
        raise _too_large(path, f"more than {2 * Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels") from None
    except UnidentifiedImageError:
        width = height = None
    except (OSError, ValueError) as exc:  # unreadable, or a header Pillow knows to be malformed
        raise _InputError(f"cannot read image {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not cv2.haveImageReader(str(path)):
        raise _InputError(f"cannot decode image {path} (empty, truncated or not an image)")
    if width is None:
        return None
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(path, f"{width}x{height} pixels ({width * height / 1e6:.0f} megapixels)")
    return height, width


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file -> uint8 RGB (H, W, 3), its size checked from the header first (:func:`check_image`);
    raises :class:`_InputError` with the reason."""
    import cv2

    path = Path(path)
    check_image(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise _InputError(f"cannot read image {path}: {exc.strerror or exc}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None  # BGR, 8-bit, alpha dropped
    if image is None:
        raise _InputError(f"cannot decode image {path} (empty, truncated or not an image)")
    height, width = image.shape[:2]
    if height * width > MAX_IMAGE_PIXELS:  # a format whose header Pillow could not size
        raise _too_large(path, f"{width}x{height} pixels ({width * height / 1e6:.0f} megapixels)")
    return np.ascontiguousarray(image[:, :, ::-1])


def _color(label: int) -> tuple[int, int, int]:
    # Well-separated hues, stable per label (BGR).
    palette = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
               (23, 204, 146), (134, 219, 61), (211, 188, 0), (209, 85, 0), (255, 128, 0), (255, 56, 132)]
    return palette[label % len(palette)] if label >= 0 else (200, 200, 200)


def annotate(image_rgb: np.ndarray, detections) -> np.ndarray:
    """Draw boxes and "phrase score" labels; returns a BGR image for cv2.imwrite."""
    import cv2  # imported on use, as in read_image

    canvas = np.ascontiguousarray(image_rgb[:, :, ::-1])
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 400))
    scale = max(0.4, min(height, width) / 1000)
    for box, score, phrase, label in zip(detections.boxes_xyxy, detections.scores, detections.phrases,
                                         detections.labels):
        x1, y1, x2, y2 = (int(round(v)) for v in np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1]))
        color = _color(int(label))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        text = f"{phrase or '?'} {float(score):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = y1 - text_h - baseline - 2 if y1 - text_h - baseline - 2 >= 0 else y1
        cv2.rectangle(canvas, (x1, top), (x1 + text_w + 2, top + text_h + baseline + 2), color, -1)
        cv2.putText(canvas, text, (x1 + 1, top + text_h + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return canvas


def _output_names(paths: list[str], outdir: Path) -> list[tuple[Path, Path]]:
    """(annotated image, JSON) per input; distinct even when two inputs share a file name."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        candidate, n = stem, 1
        while candidate in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate)
        names.append((outdir / f"{candidate}_detections.jpg", outdir / f"{candidate}_detections.json"))
    return names


def detect_main(argv: list[str] | None = None) -> int:
    """``groundwatch detect IMAGE... --prompt "..." [--weights PATH] [-o OUTDIR]``; returns the exit status."""
    prog = "groundwatch detect"
    args = _parse(detect_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        # Check every image's header before loading the model: a typo should not cost a model load. The pixels
        # are decoded one image at a time in the loop below, so memory does not grow with the number of images.
        for path in args.images:
            check_image(path)
        if not args.prompt.strip():
            raise _InputError("the prompt is empty: describe what to find, e.g. --prompt 'person . red car .'")

        # torch and the model's packages load only once the arguments and every image are good.
        import gdino
        from gdino.processing import ImageError
        from gdino.text import PromptError

        from gdino import backends

        try:
            backend, dtype = backends.resolve(args.backend, args.dtype, args.device)
            model = gdino.load(args.weights, device=args.device, dtype=dtype)
        except (ValueError, backends.BackendError) as exc:  # bad device/dtype/backend request
            raise _InputError(str(exc)) from None
        model = backends.open_model(model, backend, device=args.device, onnx_path=args.onnx)
        outdir = Path(args.output)
        outdir.mkdir(parents=True, exist_ok=True)
        for path, (image_out, json_out) in zip(args.images, _output_names(args.images, outdir)):
            image = read_image(path)
            try:
                if args.referring:
                    found = model.refer(image, args.prompt)
                else:
                    found = model.detect(image, args.prompt, box_threshold=args.box_threshold,
                                         text_threshold=args.text_threshold, remove_combined=args.remove_combined)
            except (PromptError, ImageError) as exc:
                raise _InputError(str(exc)) from None
            import cv2  # already loaded by read_image

            if not cv2.imwrite(str(image_out), annotate(image, found)):
                raise OSError(f"cannot write {image_out}")
            record = {
                "image": str(path),
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
                "prompt": args.prompt,
                "weights": str(args.weights),
                "mode": "referring" if args.referring else "detect",
                "box_threshold": args.box_threshold,
                "text_threshold": args.text_threshold,
                "remove_combined": args.remove_combined,
                "label_names": list(found.label_names),
                "detections": found.to_json(),
            }
            json_out.write_text(json.dumps(record, indent=2) + "\n")
            print(f"{path}: {len(found)} detection{'s' if len(found) != 1 else ''} -> {image_out}, {json_out}")
    except Exception as exc:  # one readable line, never a traceback (GROUNDWATCH_DEBUG=1 re-raises)
        return _fail(prog, exc)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HEIGHTxWIDTH: {text!r}") from None
    return height, width


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groundwatch export",
        description="Export Grounding DINO to ONNX: the image graph (per frame) takes the text encoding as inputs; "
                    "--text also writes the text graph. See docs/export.md.",
    )
    parser.add_argument("weights", metavar="WEIGHTS", help="'default', an official .pth, a Hugging Face folder or a "
                                                           "groundwatch folder")
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="onnx (the only format)")
    parser.add_argument("-o", "--output", default="model.onnx", help="the image graph's file (default model.onnx)")
    parser.add_argument("--size", type=_size, default=None, metavar="HxW",
                        help="the frame size traced, e.g. 480x640; the file runs at every size (height and width "
                             "are dynamic axes), so this rarely matters (default 198x262)")
    parser.add_argument("--text", default=None, metavar="FILE", help="also export the text graph (BERT + feat_map)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; at least 16 for GridSample)")
    return parser


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_export_paths(weights: Path, output: Path, text: Path | None) -> None:
    """Refuse, before loading anything, a graph written over the weights it is exported from (their file, or a file
    of their folder other than an earlier export), the two graphs written to one file, or into a missing folder."""
    if text is not None and _same_path(text, output):
        raise _InputError(f"--text {text} would overwrite the image graph -o {output}; give two file names")
    for path, flag in ((output, "-o"), (text, "--text")):
        folder = path.parent if path is not None else None
        if folder is not None and not folder.is_dir():  # found now, not after minutes of tracing
            raise _InputError(f"cannot write {flag} {path}: the folder {folder} does not exist")
    for path, flag in ((output, "-o"), (text, "--text")):
        if path is None or not weights.exists():
            continue
        # In the weights' folder an earlier export (.onnx) may be replaced; the checkpoint's own files may not.
        inside = (weights.is_dir() and path.exists() and path.suffix.lower() != ".onnx"
                  and path.resolve().is_relative_to(weights.resolve()))
        if _same_path(path, weights) or inside:
            raise _InputError(f"{flag} {path} would overwrite the weights {weights}; choose another file")


def export_main(argv: list[str] | None = None) -> int:
    """``groundwatch export WEIGHTS --format onnx -o model.onnx [--size HxW] [--text text.onnx]``."""
    prog = "groundwatch export"
    args = _parse(export_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        _check_export_paths(Path(args.weights), Path(args.output), Path(args.text) if args.text else None)
        import gdino
        from gdino import export

        model = gdino.load(args.weights)
        height, width = args.size or export.TRACE_SIZE
        opset = args.opset or export.DEFAULT_OPSET
        digest = export.weights_hash(model)
        info = export.to_onnx(model, args.output, height=height, width=width, opset=opset, weights_sha256=digest)
        print(f"{args.weights} -> {info.path}: image graph for inputs of any size from {export.MIN_SIDE} to "
              f"{export.MAX_SIDE} pixels a side (traced at {height}x{width}), opset {opset}, "
              f"weights sha256 {digest[:16]}...")
        if args.text:
            path = export.text_to_onnx(model, args.text, opset=opset, weights_sha256=digest)
            print(f"{args.weights} -> {path}: text graph")
    except Exception as exc:
        return _fail(prog, exc)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------------------------


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groundwatch convert",
        description="Convert Grounding DINO weights (official .pth, Hugging Face folder or groundwatch folder) to the "
                    "groundwatch layout: a folder with model.safetensors and groundwatch.json.",
    )
    parser.add_argument("src", metavar="SRC", help="official .pth, Hugging Face folder, or groundwatch folder")
    parser.add_argument("dst", metavar="DST", help="output folder (created; replaced if it is a groundwatch folder)")
    return parser


def convert_main(argv: list[str] | None = None) -> int:
    """``groundwatch convert SRC DST``; returns the exit status."""
    prog = "groundwatch convert"
    args = _parse(convert_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        from gdino.checkpoint import convert  # torch loads only for a real conversion, not for --help

        dst, config = convert(args.src, args.dst)
    except Exception as exc:
        return _fail(prog, exc)
    backbone, text = config.backbone, config.text
    print(f"{args.src} -> {dst}: Swin embed {backbone.embed_dim} depths {list(backbone.depths)}, "
          f"text {text.hidden_size}x{text.num_layers}, hidden {config.hidden_dim}, "
          f"{config.encoder_layers}+{config.decoder_layers} layers, {config.num_queries} queries")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(detect_main())
