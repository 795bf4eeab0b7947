"""`groundwatch replay`: draw a recording's events over its video: boxes, phrases, scores, track ids, trails.

Frames and events are lined up by the decoder's frame index for files (exact: the daemon numbers frames in
decode order, as we do here), and by time for live recordings, whose events carry wall-clock `ts` and whose
segments are named after the wall-clock time of their first packet (see `SegmentWriter`).
"""

from __future__ import annotations

import bisect
import re
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np

from streamer.recording import read_events


@dataclass
class ReplaySummary:
    frames: int
    frames_with_events: int
    boxes_drawn: int
    output: str


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


def draw_overlay(image: np.ndarray, detections: list[dict], trails: dict[int, deque]) -> int:
    """Draw boxes, labels and trails in place on an (H, W, 3) uint8 RGB image. Returns boxes drawn."""
    for track_id, points in trails.items():
        if len(points) >= 2:
            cv2.polylines(image, [np.array(points, np.int32).reshape(-1, 1, 2)], False, color_for(track_id), 1,
                          cv2.LINE_AA)
    for detection in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in detection["box"])
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
           progress: bool = True, codec: str | None = None) -> ReplaySummary:
    video, output = Path(video), Path(output)
    detection_events = [e for e in read_events(events) if e.get("kind") == "detections"]
    live = any(e.get("kind") == "status" and e.get("source") == "live" for e in read_events(events))
    by_frame = {e["frame"]: e for e in detection_events}
    times = sorted((e["ts"], i) for i, e in enumerate(detection_events))
    time_keys = [t for t, _ in times]
    segment_start = _segment_start(video)

    output.parent.mkdir(parents=True, exist_ok=True)
    source = av.open(str(video))
    in_stream = source.streams.video[0]
    in_stream.thread_type = "AUTO"
    rate = in_stream.average_rate or 25
    sink = av.open(str(output), "w")
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    out_stream = None
    trails: dict[int, deque] = {}
    current: dict | None = None
    frames = frames_with_events = boxes = 0
    total = in_stream.frames or None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="frame", desc=f"replay {video.name}")
    try:
        for frame in source.decode(in_stream):
            index = frames
            frames += 1
            if live and segment_start is not None and frame.time is not None:
                wall = segment_start + frame.time
                k = bisect.bisect_left(time_keys, wall - 0.5 / float(rate))
                event = detection_events[times[k][1]] if k < len(times) and times[k][0] <= wall + 0.5 / float(
                    rate) else None
            else:
                event = by_frame.get(index)
            if event is not None:
                current = event
                frames_with_events += 1
                for detection in event["detections"]:
                    track_id = detection.get("track_id")
                    if track_id is None:
                        continue
                    x1, y1, x2, y2 = detection["box"]
                    trails.setdefault(track_id, deque(maxlen=trail_length)).append(
                        (int((x1 + x2) / 2), int((y1 + y2) / 2)))
                seen = {d.get("track_id") for d in event["detections"]}
                for track_id in [t for t in trails if t not in seen]:
                    trail = trails[track_id]
                    trail.popleft() if trail else None  # trails of unseen tracks fade out
                    if not trail:
                        del trails[track_id]
            image = frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
            if current is not None:
                boxes += draw_overlay(image, current["detections"], trails)
            if out_stream is None:
                out_stream = sink.add_stream(codec, rate=rate)
                out_stream.width, out_stream.height = image.shape[1] // 2 * 2, image.shape[0] // 2 * 2
                out_stream.pix_fmt = "yuv420p"
            out_frame = av.VideoFrame.from_ndarray(image[: out_stream.height, : out_stream.width], format="rgb24")
            for packet in out_stream.encode(out_frame):
                sink.mux(packet)
            if bar is not None:
                bar.update(1)
        if out_stream is not None:
            for packet in out_stream.encode(None):
                sink.mux(packet)
    finally:
        if bar is not None:
            bar.close()
        sink.close()
        source.close()
    return ReplaySummary(frames, frames_with_events, boxes, str(output))
