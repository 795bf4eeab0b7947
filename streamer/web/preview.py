"""Preview frames for the web console: encoded once per processed frame in the worker, never per viewer.

On the wire a preview is a three-frame ZeroMQ message on the event PUB socket:

1. topic `<stream>/preview`
2. header: a small UTF-8 JSON object `{"v", "stream", "kind": "preview", "frame", "ts", "pts", "decoded_at",
   "width", "height", "source_width", "source_height"}`; `frame` is the index the stream's `detections` event
   of the same frame carries, so a viewer draws exactly that frame's boxes over it
3. the JPEG bytes (`width` x `height`, short side at most `preview_short_side`, never scaled up)

Previews carry no `seq` and are never written to the event log: they are lossy by design (rate-capped, dropped
for slow viewers), and `seq` stays the gap detector of the events.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import cv2
import numpy as np

PREVIEW_KIND = "preview"


@dataclass(frozen=True)
class PreviewSettings:
    fps: float = 5.0
    short_side: int = 360
    quality: int = 75


def preview_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at most `short_side`, aspect kept, never larger than the source."""
    scale = min(1.0, short_side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(pixels_rgb: np.ndarray, short_side: int, quality: int) -> tuple[bytes, int, int]:
    """(H, W, 3) uint8 RGB -> (JPEG bytes, width, height) of the downscaled preview."""
    height, width = pixels_rgb.shape[:2]
    out_width, out_height = preview_size(width, height, short_side)
    if (out_width, out_height) != (width, height):
        pixels_rgb = cv2.resize(pixels_rgb, (out_width, out_height), interpolation=cv2.INTER_AREA)
    bgr = cv2.cvtColor(pixels_rgb, cv2.COLOR_RGB2BGR)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return jpeg.tobytes(), out_width, out_height


class PreviewEncoder:
    """Rate-capped preview encoding per stream (wall clock, so a file processed faster than real time is capped
    too). `maybe_encode` returns the message frames to send, or None when this frame is not due."""

    def __init__(self, settings: PreviewSettings, clock=time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self.period = 1.0 / settings.fps
        self._next_due: dict[str, float] = {}
        self.encoded = 0

    def maybe_encode(self, stream: str, frame_index: int, pixels_rgb: np.ndarray, *, ts: float, pts: float,
                     decoded_at: float) -> list[bytes] | None:
        now = self.clock()
        due = self._next_due.get(stream)
        if due is not None and now < due:
            return None
        # Due times advance by the period (not from now) so the long-run rate is the cap even with jitter; after
        # a pause the schedule restarts from now instead of bursting to catch up.
        self._next_due[stream] = now + self.period if due is None or now - due > self.period else due + self.period
        jpeg, width, height = encode_jpeg(pixels_rgb, self.settings.short_side, self.settings.quality)
        source_height, source_width = pixels_rgb.shape[:2]
        header = {"v": 1, "stream": stream, "kind": PREVIEW_KIND, "frame": int(frame_index), "ts": float(ts),
                  "pts": round(float(pts), 6), "decoded_at": float(decoded_at), "width": width, "height": height,
                  "source_width": source_width, "source_height": source_height}
        self.encoded += 1
        return [f"{stream}/{PREVIEW_KIND}".encode(), json.dumps(header, separators=(",", ":")).encode(), jpeg]


def is_preview(frames: list[bytes]) -> bool:
    return len(frames) == 3 and frames[0].endswith(b"/" + PREVIEW_KIND.encode())
