"""The decoder process: one per stream. Reads video with PyAV and writes RGB frames into the stream's mailbox.

Files: every frame in order, waiting for the worker (back-pressure). Live sources (RTSP over TCP): the freshest
frame, stale ones dropped and counted; a read timeout so a stalled server cannot hang us; reconnection with
exponential backoff and jitter. PyAV reports a dropped RTSP connection as an ordinary end of stream, so on a
live source the end of the packets is a disconnect, never the end.

Files for demos and soak tests: `loop` starts the file again at its end (frame indices and media times go on
increasing, so a stream's events never repeat a frame); `realtime` paces frames at the file's own frame rate, as
a camera would deliver them. Frames are still never dropped: when the pipeline falls behind, the pacing clock
starts again from the late frame instead of bursting to catch up.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from streamer.events import make_event
from streamer.frames import FrameMailbox
from streamer.media import ForwardClock
from streamer.config import LiveConfig, StreamConfig
from streamer.process import EXIT_DONE, EXIT_FATAL, EventSender, child_setup
from streamer.stats import STATE_CODES, StreamStats

log = logging.getLogger("groundwatch.decoder")

END_OF_FILE, END_ERROR, END_SHUTDOWN = 1, 2, 3  # keys of frames.END_REASONS


def fit_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """The frame size to decode to: the source size, scaled down (aspect kept, even sides) to fit the slot."""
    scale = min(1.0, max_width / width, max_height / height)
    if scale >= 1.0:
        return width, height
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half the delay fixed, half random, so cameras that dropped
    together do not all hammer the server again in the same instant."""
    delay = min(maximum, initial * 2 ** max(attempt - 1, 0))
    return delay / 2 + rng.uniform(0, delay / 2)


def rgb_filler(frame: av.VideoFrame, width: int, height: int):
    """A function writing `frame` as (height, width, 3) uint8 RGB into a destination array.

    The common case (yuv420p at its own size) converts with OpenCV straight into shared memory: twice as fast
    as PyAV's swscale path here, and no intermediate array. Anything else goes through PyAV's reformat.
    """
    if frame.format.name == "yuv420p" and (frame.width, frame.height) == (width, height) and width % 2 == 0 \
            and height % 2 == 0:
        yuv = frame.to_ndarray()  # (H * 3 / 2, W) uint8: Y plane, then U and V
        if yuv.shape == (height * 3 // 2, width):
            return lambda destination: cv2.cvtColor(yuv, cv2.COLOR_YUV2RGB_I420, dst=destination)
    if (frame.width, frame.height) == (width, height):
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)

    def copy(destination: np.ndarray) -> None:
        destination[...] = rgb

    return copy


class SegmentWriter:
    """Copies a live source's packets to MPEG-TS segments without re-encoding.

    MPEG-TS because a segment cut short by a crash still plays. Each segment starts on a keyframe, its
    timestamps start at zero, and its name is the wall-clock time (ms) of its first packet, which is what
    `groundwatch replay` uses to line events (wall-clock `ts`) up with the segment's frames. Every packet reaches
    the file as it is copied, so the segment still being written can be read (alert clips cut from it).
    """

    def __init__(self, directory: Path, segment_seconds: float, on_error=None) -> None:
        self.directory, self.segment_seconds = directory, segment_seconds
        self.on_error = on_error  # called with a message when the disk refuses a segment; frames go on
        self.failures = 0
        self.output = None
        self.out_stream = None
        self.first_pts = 0
        self.started = 0.0

    def write(self, packet: av.Packet, in_stream) -> None:
        if packet.pts is None or packet.size == 0:
            return
        now = time.time()
        if packet.is_keyframe and (self.output is None or now - self.started >= self.segment_seconds):
            self.close()
            path = self.directory / f"{int(now * 1000)}.ts"
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                # Each packet to disk at once: an alert clip may be cut from the segment still being written,
                # and a low-bitrate camera would take minutes to fill FFmpeg's 32 KiB buffer.
                self.output = av.open(str(path), "w", format="mpegts", options={"flush_packets": "1"})
                self.out_stream = self.output.add_stream_from_template(in_stream)
            except (av.FFmpegError, OSError) as exc:  # disk full, read-only: the video is lost, never the events
                self._failed(f"cannot write video segment {path}: {exc}")
                self.output, self.started = None, now  # retried at the first keyframe a segment later
                return
            self.first_pts, self.started = packet.pts, now
        if self.output is None:
            return  # wait for the first keyframe: a segment must be decodable from its start
        packet.pts -= self.first_pts
        if packet.dts is not None:
            packet.dts -= self.first_pts
        packet.stream = self.out_stream
        try:
            self.output.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            self._failed(f"segment write failed: {exc}")
            self.close()

    def _failed(self, message: str) -> None:
        self.failures += 1
        log.warning("%s", message)
        if self.on_error is not None and (self.failures in (1, 10, 100) or self.failures % 1000 == 0):
            self.on_error(message)

    def close(self) -> None:
        if self.output is not None:
            try:
                self.output.close()
            except (av.FFmpegError, OSError):
                pass
            self.output = None


class Decoder:
    def __init__(self, *, stream_id: str, url: str, live: bool, fps: float, max_width: int, max_height: int,
                 mailbox: FrameMailbox, stats: StreamStats, sender: EventSender, stop,
                 open_timeout: float = 5.0, read_timeout: float = 5.0, reconnect_initial: float = 0.5,
                 reconnect_max: float = 30.0, video_directory: Path | None = None,
                 segment_seconds: float = 60.0, loop: bool = False, realtime: bool = False,
                 first_frame: int | None = 0) -> None:
        self.stream_id, self.url, self.live, self.fps = stream_id, url, live, fps
        self.max_width, self.max_height = max_width, max_height
        self.mailbox, self.stats, self.sender, self.stop = mailbox, stats, sender, stop
        self.open_timeout, self.read_timeout = open_timeout, read_timeout
        self.reconnect_initial, self.reconnect_max = reconnect_initial, reconnect_max
        self.video_directory, self.segment_seconds = video_directory, segment_seconds
        self.rng = random.Random(os.getpid())
        self.loop, self.realtime = loop, realtime
        # Files: frames before it are decoded, not delivered (a restarted decoder); None: where the mailbox's
        # previous decoder stopped (`FrameMailbox.reset`).
        self.first_frame = first_frame
        self.passes = 0  # times a looped file was read to its end
        self.discontinuities = 0  # times a file's timestamps jumped back (joined files), media time kept going
        self.state = None
        self.error_events = 0

    # -- events ------------------------------------------------------------------------------------------

    def _status(self, state: str, **fields) -> None:
        if state == self.state and state != "reconnecting":
            return
        self.state = state
        self.stats.set(self.stream_id, "state", STATE_CODES[state])
        self.sender.send(make_event(self.stream_id, "status", state=state, source=self.source_kind, **fields))
        self.stats.set(self.stream_id, "decoder_events_dropped", self.sender.dropped)

    def _error(self, message: str, *, fatal: bool, error_type: str) -> None:
        log.error("%s: %s", self.stream_id, message)
        self.error_events += 1
        self.sender.send(
            make_event(self.stream_id, "error", message=message, error_type=error_type, fatal=fatal,
                       source=self.source_kind)
        )

    @property
    def source_kind(self) -> str:
        return "live" if self.live else "file"

    # -- decoding ----------------------------------------------------------------------------------------

    def _frames(self, container, on_packet=None):
        """Yield (av.VideoFrame, width, height) for the first video stream, the size being what the frame is
        converted to (the source size scaled to fit the mailbox slot, `fit_size`); the conversion to RGB
        happens later, straight into shared memory (`rgb_filler`). Corrupt packets are counted and skipped."""
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: the decoder must outrun inference
        size = None
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except (av.InvalidDataError, av.error.PatchWelcomeError) as exc:
                self.stats.add(self.stream_id, "decode_errors")
                if self.stats.get(self.stream_id, "decode_errors") <= 3:
                    self._error(f"corrupt packet skipped: {exc}", fatal=False, error_type="corrupt_packet")
                frames = ()
            if on_packet is not None:
                on_packet(packet, stream)  # after decoding: muxing rewrites the packet's timestamps and stream
            for frame in frames:
                if size is None or size[2:] != (frame.width, frame.height):
                    size = (*fit_size(frame.width, frame.height, self.max_width, self.max_height),
                            frame.width, frame.height)
                yield frame, size[0], size[1]

    def run(self) -> int:
        resume = self.mailbox.reset()
        if self.first_frame is None:
            self.first_frame = resume
        self.stats.set(self.stream_id, "state", STATE_CODES["starting"])
        try:
            return self._run_live() if self.live else self._run_file()
        finally:
            if self.stop.is_set() and not self.mailbox.finished:
                self.mailbox.finish(END_SHUTDOWN)
                self._status("offline", reason="shutdown")

    def _open_file(self):
        container = av.open(self.url, timeout=(self.open_timeout, self.read_timeout))
        if not container.streams.video:
            container.close()
            raise av.InvalidDataError(0, "no video stream in the file")
        return container

    def _run_file(self) -> int:
        try:
            container = self._open_file()
        except (av.FFmpegError, OSError) as exc:
            self._error(f"cannot open {self.url}: {exc}", fatal=True, error_type="open_failed")
            self._status("offline", reason="error")
            self.mailbox.finish(END_ERROR)
            return EXIT_FATAL
        self._status("online")
        min_gap = 1.0 / self.fps if self.fps > 0 else 0.0
        next_pts = -1e18
        frame_index = 0
        rate = container.streams.video[0].average_rate or Fraction(25)
        frame_seconds = 1.0 / float(rate)
        media = ForwardClock(frame_seconds)  # looped files and timestamp resets go on in time
        clock = None  # (wall, pts) the realtime pacing counts from
        try:
            while True:
                pass_frames, pass_offset = 0, media.offset
                for frame, width, height in self._frames(container):
                    index = frame_index
                    frame_index += 1
                    pass_frames += 1
                    self.stats.add(self.stream_id, "frames_decoded")
                    file_time = frame.time if frame.time is not None else (pass_frames - 1) * frame_seconds
                    last_file_time = media.file_time
                    pts = media(file_time)
                    if media.jumped:
                        # The file's timestamps start again (MPEG-TS files or recorded segments joined with
                        # `cat`): media time went on one frame after the last one; sample from here on a new grid.
                        next_pts = -1e18
                        self._timestamps_reset(last_file_time, file_time, index)
                    if pts < next_pts - 1e-6:
                        continue  # fps cap on media time: deterministic whatever the machine's speed
                    # Keep a steady grid of media times; after a jump (seek, gap in the file) restart it at pts.
                    next_pts = (pts if next_pts < pts - min_gap else next_pts) + min_gap
                    if index < self.first_frame:
                        continue  # delivered before this decoder was restarted (the fps grid is kept)
                    if self.realtime:
                        clock = self._pace(clock, pts)
                        if self.stop.is_set():
                            break
                    if not self.mailbox.put_with(rgb_filler(frame, width, height), height, width, frame_index=index,
                                                 pts=pts, ts=pts, live=False, stop=self.stop):
                        break
                    self.stats.set(self.stream_id, "last_frame_wall", time.time())
                    if self.stop.is_set():
                        break
                if not self.loop or self.stop.is_set() or pass_frames == 0:
                    break
                self.passes += 1
                media.next_pass()
                # A restarted decoder of a looped file goes on from a frame passes ahead: a pass is known now (its
                # frames, its media time), so the whole passes before that frame are counted, not decoded (a
                # file looping for days would take hours to decode up to where its dead decoder stopped).
                skip = (self.first_frame - frame_index) // pass_frames
                if skip > 0:
                    span = media.offset - pass_offset  # media time one pass takes
                    frame_index += skip * pass_frames
                    self.passes += skip
                    media.offset += skip * span
                    next_pts += skip * span
                container.close()
                container = self._open_file()
        except (av.FFmpegError, OSError) as exc:
            self._error(f"decoding stopped at frame {frame_index}: {exc}", fatal=True, error_type="decode_failed")
            self._status("offline", reason="error", frames=frame_index)
            self.mailbox.finish(END_ERROR)
            container.close()
            return EXIT_FATAL
        container.close()
        if self.stop.is_set():
            return EXIT_DONE
        # The worker publishes "offline, end_of_file" once it has processed the last frame: a subscriber
        # that sees it knows every event of the file is out.
        self.mailbox.finish(END_OF_FILE)
        return EXIT_DONE

    def _timestamps_reset(self, before: float, after: float, frame_index: int) -> None:
        """Count a jump back of the file's timestamps; logged once per decoder, not per join."""
        self.discontinuities += 1
        if self.discontinuities == 1:
            log.warning("%s: timestamps jump back from %.3f s to %.3f s at frame %d (files joined?); media time "
                        "goes on from the last frame", self.stream_id, before, after, frame_index)

    def _pace(self, clock: tuple[float, float] | None, pts: float) -> tuple[float, float]:
        """Wait until the frame at media time `pts` is due. Returns the clock to pace the next frame by."""
        now = time.monotonic()
        if clock is None:
            return now, pts
        due = clock[0] + (pts - clock[1])
        if due > now:
            while not self.stop.is_set() and due - time.monotonic() > 0:
                self.stop.wait(due - time.monotonic())
            return clock
        if now - due > 1.0:  # the pipeline fell behind (back-pressure): go on from here, no burst
            return now, pts
        return clock

    def _open_live(self):
        options = {"rtsp_transport": "tcp", "timeout": str(int(self.read_timeout * 1e6))}
        if not self.url.lower().startswith(("rtsp://", "rtsps://")):
            options = {"rw_timeout": str(int(self.read_timeout * 1e6))}
        # PyAV's read timeout applies to each read; on an RTSP stall FFmpeg's first interrupted read still hands
        # back the partial packet it holds, and only the next one fails. Half the setting per read keeps the
        # detection within read_timeout_seconds of the last data.
        return av.open(self.url, options=options, timeout=(self.open_timeout, self.read_timeout / 2))

    def describe_failure(self, exc: Exception) -> str:
        """What went wrong with a live source, in words (FFmpeg's errno text means nothing to an operator)."""
        host = self.url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        code = getattr(exc, "errno", None)
        if isinstance(exc, (av.error.ExitError, TimeoutError)) or code == errno.ETIMEDOUT:
            return f"no data from the source for {self.read_timeout:g} s (stalled or unreachable)"
        if isinstance(exc, ConnectionRefusedError) or code == errno.ECONNREFUSED:
            return f"connection refused (nothing listening at {host})"
        if isinstance(exc, ConnectionResetError) or code in (errno.ECONNRESET, errno.EPIPE):
            return "the connection was reset by the source"
        if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"no route to {host}"
        if isinstance(exc, av.error.InvalidDataError):
            return "the source sent no valid video (not a video stream, or it stopped answering mid-message)"
        if isinstance(exc, av.error.HTTPError):
            return f"the server refused the stream: {getattr(exc, 'strerror', exc)}"
        text = getattr(exc, "strerror", None) or str(exc)
        return f"{text[:1].lower()}{text[1:]}" if text else type(exc).__name__

    def _run_live(self) -> int:
        attempt = 0
        segments = None
        if self.video_directory is not None:
            segments = SegmentWriter(self.video_directory, self.segment_seconds, on_error=lambda message: self._error(
                message, fatal=False, error_type="record_failed"))
        min_gap = 1.0 / self.fps if self.fps > 0 else 0.0
        frame_index = 0
        while not self.stop.is_set():
            reason = None
            try:
                container = self._open_live()
            except (av.FFmpegError, OSError) as exc:
                reason = f"cannot connect: {self.describe_failure(exc)}"
                container = None
            if container is not None:
                last_sent = 0.0
                on_packet = segments.write if segments is not None else None
                try:
                    for frame, width, height in self._frames(container, on_packet):
                        if self.state != "online":
                            self._status("online", attempt=attempt)
                            attempt = 0
                        self.stats.add(self.stream_id, "frames_decoded")
                        if self.stop.is_set():
                            break
                        now = time.time()
                        if min_gap and now - last_sent < min_gap:
                            continue
                        last_sent = now
                        pts = frame.time if frame.time is not None else 0.0
                        self.mailbox.put_with(rgb_filler(frame, width, height), height, width,
                                              frame_index=frame_index, pts=pts, ts=now, live=True)
                        self.stats.set(self.stream_id, "frames_dropped", self.mailbox.dropped)
                        frame_index += 1
                        self.stats.set(self.stream_id, "last_frame_wall", now)
                    reason = "end of stream (the server closed the connection)"
                except (av.FFmpegError, OSError) as exc:
                    reason = f"read failed: {self.describe_failure(exc)}"
                finally:
                    try:
                        container.close()
                    except (av.FFmpegError, OSError):
                        pass
                if segments is not None:
                    segments.close()
            if self.stop.is_set():
                break
            attempt += 1
            if self.state == "online":
                self.stats.add(self.stream_id, "reconnects")
            delay = backoff_delay(attempt, self.reconnect_initial, self.reconnect_max, self.rng)
            log.warning("%s: %s; reconnecting in %.1f s (attempt %d)", self.stream_id, reason, delay, attempt)
            self._status("reconnecting", reason=reason, attempt=attempt, retry_in=round(delay, 3))
            self.stop.wait(delay)
        if segments is not None:
            segments.close()
        return EXIT_DONE


def decoder_main(*, stream: StreamConfig, mailbox_spec: dict, stats_spec: dict, events_endpoint: str,
                 live: LiveConfig, video_directory: str | None, stop, parent_pid: int) -> None:
    """Entry point of the decoder process (spawned by the supervisor; a restarted decoder of a file goes on where
    the dead one stopped, `FrameMailbox.reset`)."""
    child_setup(f"decoder-{stream.id}", parent_pid)
    sender = EventSender(events_endpoint)
    mailbox = FrameMailbox.attach(mailbox_spec)
    stats = StreamStats.attach(stats_spec)
    decoder = Decoder(
        stream_id=stream.id, url=stream.url, live=stream.is_live, fps=stream.fps,
        max_width=stream.max_width, max_height=stream.max_height, mailbox=mailbox, stats=stats,
        sender=sender, stop=stop, open_timeout=live.open_timeout_seconds,
        read_timeout=live.read_timeout_seconds, reconnect_initial=live.reconnect_initial_seconds,
        reconnect_max=live.reconnect_max_seconds,
        video_directory=Path(video_directory) if video_directory else None,
        segment_seconds=live.segment_seconds, loop=stream.loop, realtime=stream.realtime, first_frame=None,
    )
    code = decoder.run()
    sender.close()
    sys.exit(code)
