"""Small PyAV helpers: writing videos (the bundled demo video, test files, benchmark inputs), counting their
frames, and the clock that keeps a file's media time going forward across joined parts and loop passes."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: float = 10.0, codec: str = "libx264",
                gop: int | None = None, options: dict | None = None) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames to `path` (container from the suffix). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec == "libx264" and "libx264" not in av.codecs_available:
        codec = "mpeg4"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = dict(options)
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def count_frames(path: str | Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


class ForwardClock:
    """A file's presentation times in, media times out that never jump back.

    Files joined with `cat` (MPEG-TS segments, recordings) start their timestamps again at each join: where a
    time falls more than 1.5 frames before the previous one, media time goes on one frame after the previous frame
    instead. `next_pass()` does the same for a looped file read again from the top. Used by the decoder and by
    search, so a frame has the same media time in both.

        clock = ForwardClock(1 / 25)
        media_time = clock(frame.time)     # clock.jumped: this frame started a new part
    """

    def __init__(self, frame_seconds: float) -> None:
        self.frame_seconds = frame_seconds
        self.offset = 0.0  # media time of the current part's file time 0
        self.last: float | None = None  # media time of the previous frame
        self.file_time: float | None = None  # file time of the previous frame
        self.jumped = False  # the frame just timed jumped back in file time (a new part began)

    def __call__(self, file_time: float) -> float:
        previous = self.file_time
        self.jumped = previous is not None and file_time < previous - 1.5 * self.frame_seconds
        if self.jumped:
            self.offset = self.last + self.frame_seconds - file_time
        self.file_time = file_time
        self.last = self.offset + file_time
        return self.last

    def next_pass(self) -> None:
        """The file is read again from its top: its file time 0 is one frame after the last media time given (a
        pass of a file starting at 0 follows the last pass by one frame, as `streamer.clips.file_pass_seconds`
        counts passes)."""
        if self.last is not None:
            self.offset = self.last + self.frame_seconds
        self.file_time = None
