"""`groundwatch redact`: blur, pixelate, fill or remove (inpaint) what a prompt describes, in every frame of a video.

Two passes over the file. The first decodes every frame, runs the detector (`gdino.predict.detect`) and feeds the
boxes to the offline planner (`planner.RedactionPlanner`: the tracker's tracks, bridged through the detector's
misses and extended at both ends with look-ahead). The second decodes again, redacts each frame's planned boxes
(`masks.redact`, or a diffusers inpainting pipeline) and encodes it with the input frame's own timestamp, while
the audio packets are copied unchanged. So the output has the input's frame count, timestamps and audio.

The output is written to a temporary name beside it and renamed only once complete: an interrupted or failed
run leaves nothing that looks like a finished redaction.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .masks import MODES, padded_boxes, redact
from .planner import FramePlan, PlannerConfig, RedactionPlanner


class RedactError(ValueError):
    """The redaction cannot be done as asked; the message says why and what to do."""


@dataclass
class RedactSummary:
    frames: int
    frames_redacted: int  # frames with at least one box
    boxes_detected: int
    boxes_interpolated: int  # bridged through the detector's misses, or smoothing a sighting
    boxes_extrapolated: int  # before a track's first / after its last sighting
    audio_streams: int  # copied unchanged
    output: str
    warnings: list[str] = field(default_factory=list)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_target(path: Path, label: str, named: str, example: str) -> None:
    """A file to be written at `path`: not a directory, in a directory that exists and may be written.
    `label` names it in "the <label> is a directory", `named` in "cannot write <named>"."""
    if path.is_dir():
        raise RedactError(f"the {label} {path} is a directory; give a file name such as {path / example}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RedactError(f"cannot write {named}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RedactError(f"cannot write {named}: no permission to write in {parent}")


def check_output(video: Path, output: Path) -> None:
    """Refuse, before any work, an output that would overwrite the input or cannot be written."""
    if output.resolve() == video.resolve() or _same_file(output, video):
        raise RedactError(f"the output {output} would overwrite the input {video}; choose another -o")
    _check_target(output, "output", str(output), "redacted.mp4")
    if output.suffix.lower() not in (".mp4", ".mkv", ".mov", ".m4v"):
        raise RedactError(f"cannot write {output}: use a .mp4, .mkv, .mov or .m4v name (H.264 video)")


def check_report(video: Path, output: Path, report: Path) -> None:
    """Refuse, before any work, a report path that would overwrite the input or the output, or cannot be
    written (any name is fine otherwise: `clip.json` beside `clip.mp4` is the usual one)."""
    for other, what in ((video, "input"), (output, "output")):
        if report.resolve() == other.resolve() or _same_file(report, other):
            raise RedactError(f"the report {report} would overwrite the {what} {other}; choose another --report")
    _check_target(report, "report", f"the report {report}", "redaction.json")


def _open_video(path: Path):
    """An opened PyAV container with a video stream; RedactError when the file cannot be decoded."""
    import av

    if not path.is_file():
        raise RedactError(f"no such file {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise RedactError(f"cannot decode {path}: {exc}") from None
    if not container.streams.video:
        container.close()
        raise RedactError(f"{path} has no video stream")
    return container


def _decoded_frames(container, path: Path):
    """Decoded video frames; a corrupt stream is a RedactError, not a traceback."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        raise RedactError(f"cannot decode {path}: {exc}") from None


def probe(video: str | Path) -> tuple[int, int, int | None]:
    """(width, height, frame count or None) of the first video stream; decodes one frame to prove it can."""
    video = Path(video)
    container = _open_video(video)
    try:
        stream = container.streams.video[0]
        for frame in _decoded_frames(container, video):
            return frame.width, frame.height, (stream.frames or None)
        raise RedactError(f"cannot decode {video}: it has no video frames")
    finally:
        container.close()


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc=desc, file=sys.stderr)


def plan_video(model, video: str | Path, prompt: str, *, config: PlannerConfig = PlannerConfig(),
               text_threshold: float = 0.25, batch_size: int = 4, progress: bool = False,
               detect: Callable | None = None) -> list[FramePlan]:
    """First pass: every frame through the detector and the tracker; one `FramePlan` per frame.

    `detect(frames) -> list of (boxes_xyxy, scores, phrases)` replaces the model (tests, other detectors)."""
    from gdino.text import PromptError

    video = Path(video)
    if detect is None:
        from gdino.predict import detect as gdino_detect, encode

        try:
            encoding = encode(model, prompt)
        except PromptError as exc:
            raise RedactError(str(exc)) from None

        def detect(frames):
            found = gdino_detect(model, frames, encoding, box_threshold=config.track_threshold,
                                 text_threshold=text_threshold, remove_combined=True)
            return [(f.boxes_xyxy, f.scores, f.phrases) for f in found]

    container = _open_video(video)
    planner = None
    index = 0
    bar = _progress(container.streams.video[0].frames or None, f"detect {video.name}", progress)
    try:
        batch: list[np.ndarray] = []

        def flush():
            nonlocal index
            for boxes_xyxy, scores, phrases in detect(batch):
                planner.add(index, boxes_xyxy, scores, phrases)
                index += 1
            if bar is not None:
                bar.update(len(batch))
            batch.clear()

        for frame in _decoded_frames(container, video):
            image = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            if planner is None:
                planner = RedactionPlanner(config, image.shape[1], image.shape[0])
            batch.append(image)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        if bar is not None:
            bar.close()
        container.close()
    if planner is None:
        raise RedactError(f"cannot decode {video}: it has no video frames")
    return planner.plan(index)


def _temporary_name(output: Path) -> Path:
    # Same directory (the rename stays on one file system), same suffix (the muxer picks the container from it).
    return output.with_name(f".{output.stem}.partial-{secrets.token_hex(4)}{output.suffix}")


def write_redacted(video: str | Path, output: str | Path, plans: list[FramePlan], *, mode: str = "blur",
                   padding: float = 0.2, inpainter: Callable | None = None, progress: bool = False,
                   crf: int = 18) -> RedactSummary:
    """Second pass: each frame redacted by its plan, encoded at its own timestamp; audio copied; atomic rename.

    `inpainter(frame, boxes_xyxy_int) -> frame` replaces OpenCV's inpainting for mode "inpaint" (the boxes
    are already padded: (N, 4) int32 xyxy)."""
    import av

    if mode not in MODES:
        raise RedactError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    video, output = Path(video), Path(output)
    check_output(video, output)
    source = _open_video(video)
    temporary = _temporary_name(output)
    frames = redacted = 0
    warnings: list[str] = []
    bar = None
    try:
        in_video = source.streams.video[0]
        in_video.thread_type = "AUTO"
        in_audio = list(source.streams.audio)
        skipped = [s for s in source.streams if s.type not in ("video", "audio") or
                   (s.type == "video" and s.index != in_video.index)]
        if skipped:
            warnings.append(f"{len(skipped)} stream(s) other than the first video and the audio left out "
                            f"({', '.join(sorted({s.type for s in skipped}))})")
        width, height = in_video.codec_context.width, in_video.codec_context.height
        sink = av.open(str(temporary), "w")
        try:
            # Every stream exists before the first packet is muxed (the header is written then).
            out_video = _add_video_stream(sink, width, height, in_video, crf)
            out_audio = {}
            for stream in in_audio:
                try:
                    out_audio[stream.index] = sink.add_stream_from_template(stream)
                except (av.FFmpegError, ValueError) as exc:
                    warnings.append(f"audio stream {stream.index} ({stream.codec_context.name}) cannot be copied "
                                    f"into {output.suffix}: {exc}")
            bar = _progress(in_video.frames or len(plans), f"redact {video.name}", progress)
            time_base = in_video.time_base
            try:
                for packet in source.demux(in_video, *in_audio):
                    if packet.stream.index in out_audio:
                        if packet.dts is None:
                            continue  # the demuxer's end-of-stream marker
                        packet.stream = out_audio[packet.stream.index]
                        sink.mux(packet)
                        continue
                    if packet.stream.index != in_video.index:
                        continue
                    for frame in packet.decode():
                        image = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
                        if image.shape[:2] != (height, width):
                            raise RedactError(f"{video} changes frame size at frame {frames} ({width}x{height} to "
                                              f"{image.shape[1]}x{image.shape[0]}); split it first")
                        if frames >= len(plans):
                            raise RedactError(f"{video} decoded to more frames the second time ({frames + 1}) "
                                              f"than the first ({len(plans)})")
                        boxes = plans[frames].boxes()  # (N, 4) xyxy pixels
                        if len(boxes):
                            redacted += 1
                            if mode == "inpaint" and inpainter is not None:
                                image = inpainter(image, padded_boxes(boxes, padding, image.shape[1], image.shape[0]))
                            else:
                                image = redact(image, boxes, mode, padding)
                        out_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                        out_frame.pts, out_frame.time_base = frame.pts, time_base
                        for out_packet in out_video.encode(out_frame):
                            sink.mux(out_packet)
                        frames += 1
                        if bar is not None:
                            bar.update(1)
            except av.FFmpegError as exc:  # a corrupt packet, or a stream the output container cannot hold
                raise RedactError(f"cannot redact {video} into {output.name}: {exc}") from None
            for out_packet in out_video.encode(None):
                sink.mux(out_packet)
        finally:
            sink.close()
        if frames != len(plans):
            raise RedactError(f"{video} decoded to {frames} frames the second time and {len(plans)} the first")
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
        source.close()
    return RedactSummary(
        frames=frames, frames_redacted=redacted,
        boxes_detected=sum(len(p.detected) for p in plans),
        boxes_interpolated=sum(len(p.interpolated) for p in plans),
        boxes_extrapolated=sum(len(p.extrapolated) for p in plans),
        audio_streams=len(out_audio), output=str(output), warnings=warnings)


def _add_video_stream(sink, width: int, height: int, in_video, crf: int):
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = sink.add_stream(codec, rate=in_video.average_rate or in_video.guessed_rate or 25)
    stream.width, stream.height = width, height
    # 4:2:0 needs even sides; an odd-sized video keeps its size in 4:4:4 rather than losing a row or column.
    even = width % 2 == 0 and height % 2 == 0
    stream.pix_fmt = "yuv420p" if even or codec != "libx264" else "yuv444p"
    stream.time_base = in_video.time_base
    stream.codec_context.time_base = in_video.time_base
    if codec == "libx264":
        stream.options = {"crf": str(crf), "preset": "veryfast"}
    return stream


def redact_video(model, video: str | Path, output: str | Path, prompt: str, *, mode: str = "blur",
                 padding: float = 0.2, config: PlannerConfig = PlannerConfig(), text_threshold: float = 0.25,
                 batch_size: int = 4, inpainter: Callable | None = None, progress: bool = False,
                 detect: Callable | None = None) -> RedactSummary:
    """Redact what `prompt` describes in every frame of `video` into `output` (see the module docstring)."""
    video, output = Path(video), Path(output)
    if not isinstance(prompt, str) or not prompt.strip():
        raise RedactError("the prompt is empty: describe what to redact, e.g. --prompt 'face . licence plate .'")
    if mode not in MODES:
        raise RedactError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if padding < 0:
        raise RedactError(f"padding must be >= 0, got {padding}")
    check_output(video, output)
    probe(video)
    plans = plan_video(model, video, prompt, config=config, text_threshold=text_threshold, batch_size=batch_size,
                       progress=progress, detect=detect)
    return write_redacted(video, output, plans, mode=mode, padding=padding, inpainter=inpainter, progress=progress)


def add_arguments(parser) -> None:
    """The `groundwatch redact` options."""
    defaults = PlannerConfig()
    parser.add_argument("video", help="the video to redact (any file FFmpeg decodes)")
    parser.add_argument("--prompt", "-p", required=True,
                        help="what to redact, phrases separated by ' . ', e.g. 'face . licence plate . screen .'")
    parser.add_argument("-o", "--output", required=True, help="the redacted video (.mp4, .mkv, .mov or .m4v)")
    parser.add_argument("--mode", choices=MODES, default="blur",
                        help="blur (default), pixelate, fill (black) or inpaint (remove: OpenCV Telea, or "
                             "--inpaint-model)")
    parser.add_argument("--padding", type=float, default=0.2,
                        help="grow each box by this fraction of its width and height on each side (default 0.2)")
    parser.add_argument("--box-threshold", type=float, default=defaults.box_threshold,
                        help=f"detections at or above this score are redacted (default {defaults.box_threshold})")
    parser.add_argument("--track-threshold", type=float, default=defaults.track_threshold,
                        help="weaker detections down to this score are redacted when they belong to a redacted "
                             f"track: one with a detection at --box-threshold, or {defaults.confirm_hits} sightings "
                             f"(default {defaults.track_threshold})")
    parser.add_argument("--text-threshold", type=float, default=0.25, help="minimum token score for a phrase")
    parser.add_argument("--extend", type=int, default=defaults.extend_frames,
                        help=f"frames redacted before a track's first and after its last sighting "
                             f"(default {defaults.extend_frames})")
    parser.add_argument("--max-gap", type=int, default=defaults.max_gap,
                        help=f"bridge the detector's misses up to this many frames (default {defaults.max_gap})")
    parser.add_argument("--weights", "-w", default="default", help="model weights ('default' or a path)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="frames per detector call (default 4)")
    parser.add_argument("--inpaint-model", metavar="PATH",
                        help="with --mode inpaint: a local diffusers inpainting pipeline folder "
                             "(pip install 'groundwatch[edit]'); nothing is downloaded")
    parser.add_argument("--inpaint-steps", type=int, default=20, help="diffusion steps (default 20)")
    parser.add_argument("--inpaint-prompt", default="background",
                        help="what the pipeline paints in place of the object (default 'background')")
    parser.add_argument("--report", metavar="FILE.json",
                        help="also write what was redacted on each frame (boxes, and whether seen, bridged or "
                             "extended), for the record")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def write_report(path: Path, plans: list[FramePlan], summary: RedactSummary, settings: dict) -> None:
    import json

    def rows(boxes):
        return [[round(float(v), 1) for v in box] for box in boxes]

    record = {"settings": settings, "summary": {k: v for k, v in vars(summary).items()},
              "frames": [{"frame": i, "detected": rows(p.detected), "interpolated": rows(p.interpolated),
                          "extrapolated": rows(p.extrapolated)} for i, p in enumerate(plans) if len(p.boxes())]}
    temporary = _temporary_name(path)
    try:
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def main(args) -> int:
    """`groundwatch redact`; returns the exit status (2: bad input, nothing written)."""
    prog = "groundwatch redact"
    video, output = Path(args.video), Path(args.output)
    try:
        if not args.prompt.strip():
            raise RedactError("the prompt is empty: describe what to redact, e.g. --prompt 'face . licence plate .'")
        from gdino.text import PromptError, normalize_caption

        try:
            normalize_caption(args.prompt)  # a prompt without words is refused before the model loads
        except PromptError as exc:
            raise RedactError(str(exc)) from None
        if args.padding < 0:
            raise RedactError(f"--padding must be >= 0, got {args.padding}")
        if args.inpaint_model and args.mode != "inpaint":
            raise RedactError("--inpaint-model is for --mode inpaint")
        try:
            config = PlannerConfig(box_threshold=args.box_threshold, track_threshold=args.track_threshold,
                                   extend_frames=args.extend, max_gap=args.max_gap)
        except ValueError as exc:
            raise RedactError(str(exc)) from None
        if args.weights not in ("default", "tiny") and not Path(args.weights).expanduser().exists():
            raise RedactError(f"cannot load the detector: weights not found: {args.weights}")
        check_output(video, output)
        if args.report:
            check_report(video, output, Path(args.report))
        probe(video)  # a file that does not decode is refused before the model loads
        inpainter = None
        if args.inpaint_model:
            from .diffusion import DiffusersInpainter, InpaintModelError

            try:
                inpainter = DiffusersInpainter(args.inpaint_model, device=args.device, steps=args.inpaint_steps,
                                               prompt=args.inpaint_prompt)
            except InpaintModelError as exc:
                raise RedactError(str(exc)) from None
        import gdino
        from gdino.checkpoint.formats import CheckpointError

        try:
            model = gdino.load(args.weights, device=args.device)
        except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
            raise RedactError(f"cannot load the detector {args.weights!r}: {exc}") from None
        plans = plan_video(model, video, args.prompt, config=config, text_threshold=args.text_threshold,
                           batch_size=args.batch_size, progress=not args.quiet)
        summary = write_redacted(video, output, plans, mode=args.mode, padding=args.padding, inpainter=inpainter,
                                 progress=not args.quiet)
        if args.report:
            write_report(Path(args.report), plans, summary,
                         {"video": str(video), "prompt": args.prompt, "mode": args.mode, "padding": args.padding,
                          "weights": str(args.weights), "inpaint_model": args.inpaint_model,
                          "planner": vars(config) if hasattr(config, "__dict__") else {}})
    except RedactError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    for warning in summary.warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    print(f"{prog}: {summary.frames} frames, {summary.frames_redacted} redacted ({summary.boxes_detected} boxes "
          f"seen, {summary.boxes_interpolated} bridged, {summary.boxes_extrapolated} extended), "
          f"{summary.audio_streams} audio stream(s) copied -> {summary.output}")
    return 0
