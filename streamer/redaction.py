"""Live redaction: what a stream's `redact` prompt describes is burnt into every picture the daemon lets out.

The inference worker is the only process that holds a redacted stream's raw frames and lets pictures out of them.
For such a stream it appends the redact phrases to the stream's prompt (`detector_prompt`), so one forward pass
finds both; `StreamRedaction.split` parts the detections again: the watch prompt's go on to the tracker and the
events, the redact phrases' become redaction boxes (published only when the watch prompt has the phrase too).
Boxes follow their objects through short detector misses (`RedactionBoxes`: the project's tracker, causal, each
missed frame grows the carried box), are padded, and `streamer.editing.masks.redact` burns them in. The redacted
picture then feeds everything that leaves the process: previews, snapshots, and the recording, which the worker
re-encodes with libx264 (`RedactedSegmentWriter`; the decoder's packet copy is off for such a stream). Clips are
cut from that recording.

Fail closed: a frame is let out only after the detector has run on it and its redaction succeeded. A frame whose
detection or redaction failed is dropped (counted), never passed on raw; frames from before the model is ready
are never written at all, since nothing but the worker writes pictures of a redacted stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from streamer.editing.masks import MODES, redact
from streamer.zones import normalize_phrase

log = logging.getLogger("groundwatch.redaction")

CARRY_GROWTH = 0.1  # a carried box grows by this fraction of its size per missed frame: the object may have turned


@dataclass(frozen=True)
class RedactionSettings:
    """One stream's redaction, from its `[[streams]]` entry (`build_redaction_settings`)."""

    phrases: tuple[str, ...]  # normalised redact phrases
    prompt: str  # the redact prompt as written
    mode: str = "blur"
    padding: float = 0.2
    carry_frames: int = 5
    video_directory: str | None = None  # where the redacted recording goes (record_video), else None
    segment_seconds: float = 60.0


def redact_phrases(redact_prompt: str) -> tuple[str, ...]:
    """'Face . licence plate .' -> ('face', 'licence plate')"""
    return tuple(dict.fromkeys(p for p in (normalize_phrase(x) for x in redact_prompt.split(".")) if p))


def detector_prompt(prompt: str, redact_prompt: str | None) -> str:
    """The prompt the detector runs for a stream: its own phrases, then the redact phrases it lacks."""
    if not redact_prompt:
        return prompt
    watched = {normalize_phrase(p) for p in prompt.split(".")}
    extra = [p for p in redact_phrases(redact_prompt) if p not in watched]
    if not extra:
        return prompt
    base = prompt.rstrip()
    if not base.endswith("."):
        base += " ."
    return base + " " + " ".join(f"{p} ." for p in extra)


def build_redaction_settings(stream, video_directory: str | None, segment_seconds: float) -> RedactionSettings | None:
    """The one place a stream's redaction keys are read; None when the stream has no `redact`."""
    if not stream.redact:
        return None
    return RedactionSettings(phrases=redact_phrases(stream.redact), prompt=stream.redact, mode=stream.redact_mode,
                             padding=stream.redact_padding, carry_frames=stream.redact_carry_frames,
                             video_directory=video_directory, segment_seconds=segment_seconds)


@dataclass
class _Found:
    """Detections handed on to the tracker and the events (the `FrameDetections` protocol)."""

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    phrases: list


class RedactionBoxes:
    """Redaction boxes that follow their objects: this frame's detections, plus the predicted boxes of objects the
    detector missed on up to `carry_frames` frames (live has no look-ahead, so only the past can fill a miss).
    Uses the project's tracker with every detection confirmed at once and one class for all redact phrases."""

    def __init__(self, carry_frames: int) -> None:
        import tracker
        from tracker.config import TrackerConfig

        self.carry_frames = carry_frames
        self.tracker = tracker.Tracker(TrackerConfig(
            min_hits=1, max_age=max(1, carry_frames), high_score=0.0, low_score=0.0, new_track_score=0.0,
            match_iou=0.05, tentative_match_iou=0.05, class_agnostic=True, max_predict_frames=max(1, carry_frames)))

    def update(self, boxes_xyxy: np.ndarray, scores: np.ndarray, frame_index: int) -> np.ndarray:
        """(N, 4) detections xyxy pixels -> (M, 4) boxes to redact on this frame (M >= N)."""
        boxes_xyxy = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
        if self.carry_frames <= 0:
            return boxes_xyxy
        update = self.tracker.update(boxes_xyxy, np.asarray(scores, np.float32).reshape(-1),
                                     ["redact"] * len(boxes_xyxy), frame_index)
        unseen = np.asarray(update.frames_unseen)
        carried = (unseen >= 1) & (unseen <= self.carry_frames)
        if not carried.any():
            return boxes_xyxy
        boxes = np.asarray(update.boxes_xyxy, np.float64)[carried]
        grow = (CARRY_GROWTH * unseen[carried])[:, None] * (boxes[:, 2:] - boxes[:, :2])  # (C, 2)
        grown = np.concatenate([boxes[:, :2] - grow, boxes[:, 2:] + grow], axis=1)
        return np.concatenate([boxes_xyxy, grown.astype(np.float32)])


class RedactedSegmentWriter:
    """The recording of a redacted stream: redacted frames encoded with libx264 into MPEG-TS segments.

    The layout is the packet-copying `decoder.SegmentWriter`'s: `<directory>/<ms>.ts`, named after the time of
    the segment's first frame (wall clock for a live stream, media time for a file), a new segment once
    `segment_seconds` have passed, each starting on a keyframe; timestamps start at zero in each segment. Frames
    come at the detector's pace, so the frame rate is variable (timestamps from each frame's time); a keyframe
    every `keyframe_seconds` keeps clips short. Packets are flushed as written, so a clip can be cut from the
    segment being written. A disk error costs the segment, never the frames' events.
    """

    TIME_BASE = Fraction(1, 90_000)  # MPEG-TS's own clock

    def __init__(self, directory: str | Path, segment_seconds: float, *, keyframe_seconds: float = 1.0,
                 crf: int = 23, on_error=None) -> None:
        self.directory, self.segment_seconds = Path(directory), segment_seconds
        self.keyframe_seconds, self.crf = keyframe_seconds, crf
        self.on_error = on_error
        self.output = self.stream = None
        self.started = self.last_keyframe = 0.0
        self.last_pts = -1
        self.size: tuple[int, int] | None = None
        self.failures = 0
        self.frames_written = 0
        self._retry_at: float | None = None

    def _open(self, ts: float, width: int, height: int) -> None:
        path = self.directory / f"{int(round(ts * 1000))}.ts"
        self.directory.mkdir(parents=True, exist_ok=True)
        output = av.open(str(path), "w", format="mpegts", options={"flush_packets": "1"})
        try:
            stream = output.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = self.TIME_BASE
            stream.codec_context.time_base = self.TIME_BASE
            stream.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": str(self.crf)}
        except Exception:
            output.close()
            raise
        self.output, self.stream, self.size = output, stream, (width, height)
        self.started, self.last_keyframe, self.last_pts = ts, ts, -1

    def write(self, pixels_rgb: np.ndarray, ts: float) -> bool:
        """Encode one redacted (H, W, 3) uint8 RGB frame taken at `ts` seconds. Returns whether it was written."""
        height, width = (pixels_rgb.shape[0] // 2) * 2, (pixels_rgb.shape[1] // 2) * 2  # yuv420p: even sides
        if self._retry_at is not None and ts < self._retry_at:
            return False
        try:
            if self.output is None or ts - self.started >= self.segment_seconds or self.size != (width, height):
                self.close()
                self._open(ts, width, height)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels_rgb[:height, :width]), format="rgb24")
            pts = max(int(round((ts - self.started) / self.TIME_BASE)), self.last_pts + 1)
            frame.pts, frame.time_base = pts, self.TIME_BASE
            self.last_pts = pts
            if pts == 0 or ts - self.last_keyframe >= self.keyframe_seconds:
                frame.pict_type = av.video.frame.PictureType.I
                self.last_keyframe = ts
            for packet in self.stream.encode(frame):
                self.output.mux(packet)
        except (av.FFmpegError, OSError, ValueError) as exc:
            self._failed(f"cannot write redacted video in {self.directory}: {exc}", ts)
            return False
        self._retry_at = None
        self.frames_written += 1
        return True

    def _failed(self, message: str, ts: float) -> None:
        self.failures += 1
        log.warning("%s", message)
        self._drop()
        self._retry_at = ts + min(self.segment_seconds, 5.0)  # a full disk is not asked again every frame
        if self.on_error is not None and (self.failures in (1, 10, 100) or self.failures % 1000 == 0):
            self.on_error(message)

    def _drop(self) -> None:
        if self.output is not None:
            try:
                self.output.close()
            except (av.FFmpegError, OSError, ValueError):
                pass
        self.output = self.stream = None

    def close(self) -> None:
        """Flush the encoder's last packets and close the segment."""
        if self.output is None:
            return
        try:
            for packet in self.stream.encode(None):
                self.output.mux(packet)
        except (av.FFmpegError, OSError, ValueError) as exc:
            log.warning("closing redacted segment: %s", exc)
        self._drop()


class BackgroundRecorder:
    """Runs a `RedactedSegmentWriter` on its own thread, so the encoder (libx264 releases the GIL while it works)
    overlaps the detector instead of adding to each frame. The queue is bounded: when the encoder falls behind,
    frames are dropped from the recording and counted (`dropped`), never waited for."""

    def __init__(self, writer: RedactedSegmentWriter, queue_size: int = 16) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        # The writer's error messages, handed to the worker's thread (its event socket is not thread-safe).
        self.errors: queue.SimpleQueue = queue.SimpleQueue()
        writer.on_error = self.errors.put
        self._thread = threading.Thread(target=self._run, name="redacted-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                self.writer.close()
                self.queue.task_done()
                return
            try:
                self.writer.write(*item)
            except Exception:  # the recording, never the worker
                log.exception("redacted recording failed")
            finally:
                self.queue.task_done()

    def write(self, pixels_rgb: np.ndarray, ts: float) -> None:
        """`pixels_rgb` must be the caller's own array (the redacted copy), not a shared-memory slot."""
        try:
            self.queue.put_nowait((pixels_rgb, ts))
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                self.errors.put(f"the redacted recording's encoder falls behind: {self.dropped} frames not recorded")

    def drain(self, timeout: float = 2.0) -> None:
        """Wait (at most `timeout`) until every queued frame is on disk: a clip is about to be cut."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)

    def take_errors(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.errors.get_nowait())
            except queue.Empty:
                return messages

    def close(self, timeout: float = 30.0) -> None:
        """Write what waits, flush the encoder and close the segment."""
        if not self._thread.is_alive():
            return
        self.queue.put(None)
        self._thread.join(timeout)


class StreamRedaction:
    """One redacted stream in the worker: splits the detections, carries boxes, burns them in, records."""

    def __init__(self, settings: RedactionSettings, on_error=None) -> None:
        if settings.mode not in MODES:
            raise ValueError(f"unknown redaction mode {settings.mode!r}")
        self.settings = settings
        self.phrases = set(settings.phrases)
        self.boxes = RedactionBoxes(settings.carry_frames)
        self.recorder = None
        self.on_error = on_error
        if settings.video_directory is not None:
            self.recorder = BackgroundRecorder(RedactedSegmentWriter(settings.video_directory,
                                                                     settings.segment_seconds))
        self._watched: tuple[str, set[str]] = ("", set())
        self.frames_redacted = 0
        self.regions = 0  # boxes burnt in, over the run
        self.failures = 0  # frames dropped because their redaction failed

    def _watch_phrases(self, prompt: str) -> set[str]:
        if self._watched[0] != prompt:
            self._watched = (prompt, {normalize_phrase(p) for p in prompt.split(".") if normalize_phrase(p)})
        return self._watched[1]

    def split(self, result, prompt: str) -> tuple[_Found, np.ndarray, np.ndarray]:
        """(the detections of the watch prompt, redaction boxes (R, 4) xyxy pixels, their scores (R,)).

        A detection is matched to its phrase by the prompt sub-sentence it came from (`labels` into `label_names`)
        when the detector says, else by its phrase text. One whose phrase is neither watched nor redacted (a
        phrase cut short by the text threshold) is redacted AND published: unsure means redact.
        """
        boxes_xyxy = np.asarray(result.boxes_xyxy, np.float32).reshape(-1, 4)  # (N, 4) pixels
        scores = np.asarray(result.scores, np.float32).reshape(-1)
        phrases = list(result.phrases)
        labels, names = getattr(result, "labels", None), getattr(result, "label_names", None)
        watched = self._watch_phrases(prompt)
        publish = np.zeros(len(phrases), bool)
        hide = np.zeros(len(phrases), bool)
        for k, phrase in enumerate(phrases):
            name = phrase
            if labels is not None and names and 0 <= int(labels[k]) < len(names):
                name = names[int(labels[k])]
            name = normalize_phrase(name)
            publish[k] = name in watched or name not in self.phrases
            hide[k] = name in self.phrases or name not in watched
        found = _Found(boxes_xyxy[publish], scores[publish], [p for p, keep in zip(phrases, publish) if keep])
        return found, boxes_xyxy[hide], scores[hide]

    @staticmethod
    def nothing() -> _Found:
        return _Found(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), [])

    def apply(self, pixels: np.ndarray, boxes_xyxy: np.ndarray, scores: np.ndarray, frame_index: int) -> np.ndarray:
        """The redacted copy of a frame (raises when it cannot be made: the caller drops the frame)."""
        boxes = self.boxes.update(boxes_xyxy, scores, frame_index)
        finite = np.isfinite(boxes).all(axis=1)
        if not finite.all():
            # A box that is not a box cannot be burnt in; the whole frame is hidden instead of guessing.
            raise ValueError(f"{int((~finite).sum())} redaction box(es) are not finite")
        out = redact(pixels, boxes, self.settings.mode, self.settings.padding)
        self.frames_redacted += 1
        self.regions += len(boxes)
        return out

    def record(self, pixels: np.ndarray, ts: float) -> None:
        """Queue a redacted frame for the recording; report (on the caller's thread) what the recorder failed."""
        if self.recorder is None:
            return
        self.recorder.write(pixels, ts)
        for message in self.recorder.take_errors():
            if self.on_error is not None:
                self.on_error(message)

    def drain(self) -> None:
        """Before a clip is cut from the recording: the frames queued for it are written."""
        if self.recorder is not None:
            self.recorder.drain()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()


def build_stream_redaction(settings: RedactionSettings, on_error=None) -> StreamRedaction:
    return StreamRedaction(settings, on_error=on_error)
