"""`groundwatch replay`: draw a recording's events over its video: boxes, phrases, scores, track ids, trails.

Frames and events are lined up by the decoder's frame index for files (exact: the daemon numbers frames in
decode order, as we do here), and by time for live recordings, whose events carry wall-clock `ts` and whose
segments are named after the wall-clock time of their first packet (see `SegmentWriter`).

An event log is a user's file: lines that are not events (torn, NUL-filled, another program's JSON) are skipped
and counted, never a traceback. A log that does not belong to the video (another frame shape, frames the video
does not have) is refused with a message unless forced; a log of a frame size the daemon scaled down is scaled
back up. An event's boxes are drawn on its own frame and held until the next sampled frame (a stream capped by
`fps` has events on every k-th frame only), never beyond: frames the log does not cover are drawn bare.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import statistics
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from streamer.recording import parse_event_line


class ReplayError(ValueError):
    """The inputs cannot be replayed as asked; the message says why and what to do."""


@dataclass
class ReplaySummary:
    frames: int
    frames_with_events: int
    boxes_drawn: int
    output: str
    bad_lines: int = 0
    warnings: list[str] = field(default_factory=list)


# Pixel coordinates beyond this are no frame's: a box there is a bad line (cv2 draws int32 coordinates only).
MAX_BOX_COORDINATE = 1e6
# Frame indices and track ids beyond this are no recording's (and overflow a float in the arithmetic on them).
MAX_INDEX = 2**53
# Boxes scaled up from a log of a far smaller frame size can still pass int32: drawn clipped to this.
MAX_DRAWN_COORDINATE = 1 << 24


def _is_number(value) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int no float holds: 10**400
        return False


def _is_index(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INDEX


def _valid_detection_event(event: dict) -> bool:
    frame, detections = event.get("frame"), event.get("detections")
    if not _is_index(frame) or not isinstance(detections, list):
        return False
    if not _is_number(event.get("ts", 0)):
        return False
    for key in ("width", "height"):  # the frame size the boxes are in; absent from logs that predate it
        if event.get(key) is not None and not _is_index(event[key], low=1):
            return False
    for detection in detections:
        if not isinstance(detection, dict):
            return False
        box = detection.get("box")
        if not isinstance(box, list) or len(box) != 4 or \
                not all(_is_number(v) and abs(v) <= MAX_BOX_COORDINATE for v in box):
            return False
        track_id = detection.get("track_id")
        if track_id is not None and not _is_index(track_id, low=-MAX_INDEX):
            return False
        if not _is_number(detection.get("score", 0)) or not isinstance(detection.get("phrase", ""), str):
            return False
    return True


def load_log(path: str | Path) -> tuple[list[dict], int]:
    """The events of a log in order and how many lines were skipped as not being events. A torn last line (the
    daemon was killed mid-write) is not counted: every log of a killed daemon may have one."""
    events, bad = [], 0
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break
            if not line.strip():
                continue
            event = parse_event_line(line)  # None: not JSON, not UTF-8 (a NUL-filled block), nested too deep
            if event is None or (event.get("kind") == "detections" and not _valid_detection_event(event)):
                bad += 1
                continue
            events.append(event)
    return events, bad


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _scaled(detections: list[dict], sx: float, sy: float) -> list[dict]:
    if sx == 1.0 and sy == 1.0:
        return detections
    return [dict(d, box=[d["box"][0] * sx, d["box"][1] * sy, d["box"][2] * sx, d["box"][3] * sy]) for d in detections]


def color_for(key) -> tuple[int, int, int]:
    """A stable, saturated RGB colour per track id (or phrase)."""
    number = key if isinstance(key, int) else zlib.crc32(str(key).encode())  # stable across runs, unlike hash()
    hue = (number * 0.618033988749895) % 1.0
    hsv = np.uint8([[[int(hue * 179), 220, 255]]])
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].tolist()
    return int(r), int(g), int(b)


def _segment_start(video: Path) -> float | None:
    match = re.fullmatch(r"(\d{12,14})", video.stem)
    return int(match.group(1)) / 1000 if match else None


def _pixel(value: float) -> int:
    """A coordinate cv2 can draw (int32): one far outside the frame is clipped, where it still lies outside it."""
    return int(round(min(max(value, -MAX_DRAWN_COORDINATE), MAX_DRAWN_COORDINATE)))


def draw_overlay(image: np.ndarray, detections: list[dict], trails: dict[int, deque]) -> int:
    """Draw boxes, labels and trails in place on an (H, W, 3) uint8 RGB image. Returns boxes drawn."""
    for track_id, points in trails.items():
        if len(points) >= 2:
            polyline = np.array([(_pixel(x), _pixel(y)) for x, y in points], np.int32).reshape(-1, 1, 2)
            cv2.polylines(image, [polyline], False, color_for(track_id), 1, cv2.LINE_AA)
    for detection in detections:
        x1, y1, x2, y2 = (_pixel(v) for v in detection["box"])
        track_id = detection.get("track_id")
        color = color_for(track_id if track_id is not None else detection.get("phrase", ""))
        cv2.rectangle(image, (x1, y1), (x2, y2), color, 1 if track_id is None else 2)
        label = f"{detection.get('phrase', '')} {detection.get('score', 0):.2f}"
        if track_id is not None:
            label = f"#{track_id} {label}"
        scale = 0.35 if image.shape[0] < 400 else 0.5
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + 2, y1 - 2)
        cv2.rectangle(image, (x1, ty - th - 2), (x1 + tw + 2, ty + 1), color, -1)
        cv2.putText(image, label, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return len(detections)


def replay(video: str | Path, events: str | Path, output: str | Path, *, trail_length: int = 20,
           progress: bool = True, codec: str | None = None, force: bool = False) -> ReplaySummary:
    """Draw `events` (a stream's event log) over `video` into `output`. Raises `ReplayError` when the output
    would overwrite an input, or (unless `force`) when the log does not belong to the video."""
    video, events, output = Path(video), Path(events), Path(output)
    for source_path in (video, events):
        if output.resolve() == source_path.resolve() or _same_file(output, source_path):
            raise ReplayError(f"the output {output} would overwrite the input {source_path}; choose another -o")
    log, bad_lines = load_log(events)
    if not log and bad_lines:  # a video or any other file given as the log: not a video without boxes
        raise ReplayError(f"{events} holds no events ({bad_lines} lines, none an event): give a stream's "
                          "events-*.jsonl")
    detection_events = [e for e in log if e.get("kind") == "detections"]
    live = any(e.get("kind") == "status" and e.get("source") == "live" for e in log)
    segment_start = _segment_start(video)
    by_time = live and segment_start is not None
    by_frame = {e["frame"]: e for e in detection_events}
    times = sorted((float(e.get("ts", 0.0)), i) for i, e in enumerate(detection_events))
    time_keys = [t for t, _ in times]
    warnings: list[str] = []
    if bad_lines:
        warnings.append(f"{bad_lines} bad line{'s' if bad_lines != 1 else ''} skipped in {events.name}")

    source, in_stream = _open_video(video)
    try:
        rate = in_stream.average_rate or 25
        video_width, video_height = in_stream.codec_context.width, in_stream.codec_context.height
        scales = _check_sizes(detection_events, video_width, video_height, force, warnings)
        total = in_stream.frames or None
        if not by_time and total and by_frame and max(by_frame) >= total:
            message = (f"the log has events up to frame {max(by_frame)} but {video.name} has {total} frames: "
                       "it belongs to another video")
            if not force:
                raise ReplayError(message + " (--force draws it anyway)")
            warnings.append(message)
    except BaseException:
        source.close()
        raise
    # Hold an event's boxes until the next sampled frame: the usual gap between events, never longer.
    hold_frames = int(statistics.median(b - a for a, b in zip(sorted(by_frame), sorted(by_frame)[1:]))) \
        if len(by_frame) > 1 else 1
    hold_seconds = statistics.median(b - a for a, b in zip(time_keys, time_keys[1:])) if len(times) > 1 \
        else 1.0 / float(rate)
    half_frame = 0.5 / float(rate)

    output.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name (same suffix: the container format follows it) and renamed when whole: an
    # interrupted replay leaves the previous file at `output` as it was, not a shorter one that looks complete.
    partial = output.with_name(f".{output.stem}.partial-{os.getpid()}{output.suffix}")
    sink = av.open(str(partial), "w")
    finished = False
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    out_stream = None
    trails: dict[int, deque] = {}
    current_key: int | None = None
    current_event: dict | None = None
    frames = frames_with_events = frames_bare = boxes = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc=f"replay {video.name}")
    try:
        for frame in _decoded(source, in_stream, video):
            index = frames
            frames += 1
            key = None  # which event this frame shows: a frame index (files) or a position in time order (live)
            if by_time and frame.time is not None:
                wall = segment_start + frame.time
                k = bisect.bisect_right(time_keys, wall + half_frame) - 1
                if k >= 0 and wall - time_keys[k] < hold_seconds + half_frame:
                    key = k
                    frames_with_events += abs(wall - time_keys[k]) <= half_frame
            elif index in by_frame:
                key = index
                frames_with_events += 1
            elif current_key is not None and index - current_key < hold_frames:
                key = current_key
            if key is None:
                current_key = current_event = None
                frames_bare += 1
            elif key != current_key:
                current_key = key
                current_event = detection_events[times[key][1]] if by_time else by_frame[key]
                _advance_trails(trails, current_event["detections"], trail_length)
            event = current_event
            image = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            if event is not None:
                sx, sy = scales.get((event.get("width"), event.get("height")), (1.0, 1.0))
                boxes += draw_overlay(image, _scaled(event["detections"], sx, sy),
                                      {t: deque((int(x * sx), int(y * sy)) for x, y in p) for t, p in trails.items()})
            if out_stream is None:
                out_stream = sink.add_stream(codec, rate=rate)
                out_stream.width, out_stream.height = image.shape[1] // 2 * 2, image.shape[0] // 2 * 2
                out_stream.pix_fmt = "yuv420p"
            out_frame = av.VideoFrame.from_ndarray(image[: out_stream.height, : out_stream.width], format="rgb24")
            for packet in out_stream.encode(out_frame):
                sink.mux(packet)
            if bar is not None:
                bar.update(1)
        if out_stream is None:  # nothing to write: the muxer would not even create the file
            raise ReplayError(f"{video} has no frame that can be decoded (is it cut short?)")
        for packet in out_stream.encode(None):
            sink.mux(packet)
        finished = True
    finally:
        if bar is not None:
            bar.close()
        closed = False
        try:
            sink.close()
            closed = True
        finally:
            source.close()
            if finished and closed:
                os.replace(partial, output)
            else:
                partial.unlink(missing_ok=True)
    if frames_bare:
        warnings.append(f"{frames_bare} of {frames} frames have no events (drawn without boxes)")
    if not by_time and by_frame and max(by_frame) >= frames and not total:
        warnings.append(f"the log has events up to frame {max(by_frame)} but {video.name} has {frames} frames")
    return ReplaySummary(frames, frames_with_events, boxes, str(output), bad_lines, warnings)


def _open_video(video: Path) -> tuple[av.container.InputContainer, av.VideoStream]:
    """The video and its first video stream, or `ReplayError` when it has none that can be decoded."""
    try:
        source = av.open(str(video))
    except av.FFmpegError as exc:  # 0 bytes, cut short before its index, not a media file at all
        raise ReplayError(f"cannot read {video} as a video ({exc.strerror or exc})") from None
    try:
        if not source.streams.video:
            raise ReplayError(f"{video} has no video stream (audio only, or cut short?)")
        in_stream = source.streams.video[0]
        if in_stream.codec_context is None:  # a file cut inside its index: a stream whose codec is unknown
            raise ReplayError(f"cannot decode the video of {video} (unknown codec: the file may be cut short)")
        in_stream.thread_type = "AUTO"
    except BaseException:
        source.close()
        raise
    return source, in_stream


def _decoded(source: av.container.InputContainer, in_stream: av.VideoStream, video: Path):
    """The stream's frames; a decoding error (a file cut short mid-stream) is a `ReplayError`, not a traceback."""
    frames = source.decode(in_stream)
    decoded = 0
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            return
        except av.FFmpegError as exc:
            raise ReplayError(f"cannot decode {video} after frame {decoded} ({exc.strerror or exc})") from None
        decoded += 1
        yield frame


def _advance_trails(trails: dict[int, deque], detections: list[dict], trail_length: int) -> None:
    """One new event: extend the trails of the tracks it has, fade out those it lacks (log pixels)."""
    for detection in detections:
        track_id = detection.get("track_id")
        if track_id is None:
            continue
        x1, y1, x2, y2 = detection["box"]
        trails.setdefault(track_id, deque(maxlen=trail_length)).append((int((x1 + x2) / 2), int((y1 + y2) / 2)))
    seen = {d.get("track_id") for d in detections}
    for track_id in [t for t in trails if t not in seen]:
        trail = trails[track_id]
        trail.popleft() if trail else None  # trails of unseen tracks fade out
        if not trail:
            del trails[track_id]


def _check_sizes(detection_events: list[dict], video_width: int, video_height: int, force: bool,
                 warnings: list[str]) -> dict[tuple, tuple[float, float]]:
    """Scale factors per frame size found in the log. The daemon scales frames larger than a stream's
    `max_width`/`max_height` down (aspect kept), so a smaller log of the same shape is scaled back up; a log of
    another shape belongs to another video."""
    sizes = {(e.get("width"), e.get("height")) for e in detection_events
             if isinstance(e.get("width"), int) and isinstance(e.get("height"), int) and e["width"] > 0
             and e["height"] > 0}
    scales = {}
    for width, height in sorted(sizes):
        if (width, height) == (video_width, video_height):
            continue
        sx, sy = video_width / width, video_height / height
        if abs(sx / sy - 1.0) > 0.02:
            message = f"the log's frames are {width}x{height} but the video's are {video_width}x{video_height}: " \
                      "another shape, so another video"
            if not force:
                raise ReplayError(message + " (--force draws it anyway, stretched)")
        else:
            message = f"the log's frames are {width}x{height} and the video's {video_width}x{video_height}: " \
                      f"boxes scaled by {sx:.3g}"
        warnings.append(message)
        scales[(width, height)] = (sx, sy)
    return scales
