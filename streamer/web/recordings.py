"""Recordings for the console: what can be replayed, its video, and its events read from the event log.

The event log is the single source of truth for what was detected; the page draws it over the video itself.
- A file stream: one recording per run of the daemon (`events-<run>.jsonl`); the video is the source file, and
  events line up by media time (`pts`). A redacted file's is never the source (raw pixels) but the run's own
  redacted recording (`video/<run>/*.ts`, named by media time), copied into one MP4 on the file's clock.
- A live stream with `record_video`: one recording per MPEG-TS segment (named after the wall-clock ms of its
  first packet, see `streamer.decoder.SegmentWriter`). Browsers do not play MPEG-TS, so a segment is remuxed
  (no re-encoding) to MP4 once and cached; its events are those of the stream's logs whose wall-clock `ts` falls
  within the segment, and line up by `ts - start`.

Ids are checked against fixed patterns and paths are built here, never taken from the request.
"""

from __future__ import annotations

import calendar
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from streamer.recording import read_events, read_events_between
from streamer.web.settings import WebSettings, WebStream

RUN_ID = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$", re.ASCII)
SEGMENT_ID = re.compile(r"^segment-(\d{12,14})$", re.ASCII)
REPLAY_KINDS = ("detections", "track", "status")
# A whole run's events are answered in one JSON document: the first this many, so that a run of days (a looped file)
# cannot fill the console's memory (nor the browser's); about 40 MB of JSON.
MAX_REPLAY_EVENTS = 100_000


class NotFound(LookupError):
    """No such stream or recording; the message says which."""


def _run_started(run_id: str) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(run_id[:16], "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None


def _event_logs(settings: WebSettings, stream: WebStream) -> list[Path]:
    if settings.record_directory is None:
        return []
    return sorted((Path(settings.record_directory) / stream.id).glob("events-*.jsonl"))


def _segments(stream: WebStream) -> list[Path]:
    """The stream's segments, oldest first. Only files named as `SegmentWriter` names them: anything else in the
    folder (an operator's `backup.ts`, a tool's temporary file) is not a recording."""
    if stream.video_directory is None:
        return []
    segments = [path for path in Path(stream.video_directory).glob("*.ts")
                if SEGMENT_ID.match(f"segment-{path.stem}")]
    return sorted(segments, key=lambda path: int(path.stem))


def _run_segments(stream: WebStream, run_id: str) -> list[tuple[Path, float]]:
    """A redacted file stream's recording of one run: (segment, media time of its first frame), in order."""
    if stream.live or stream.video_directory is None or not RUN_ID.match(run_id):
        return []
    folder = Path(stream.video_directory) / run_id
    segments = [(path, int(path.stem) / 1000) for path in folder.glob("*.ts")
                if path.stem.isascii() and path.stem.isdigit()]  # "²".isdigit() too, but int() refuses it
    return sorted(segments, key=lambda item: item[1])


def _size(path: Path) -> int | None:
    """The file's size, or None when it went between listing and now (retention deletes old segments and logs)."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def list_recordings(settings: WebSettings) -> dict[str, list[dict]]:
    """Per stream, newest first: {id, kind, started, size, video (bool), note}."""
    result: dict[str, list[dict]] = {}
    for stream in settings.streams:
        items = []
        if stream.live:
            for segment in _segments(stream):
                if (size := _size(segment)) is not None:
                    items.append({"id": f"segment-{segment.stem}", "kind": "segment",
                                  "started": int(segment.stem) / 1000, "size": size, "video": True})
            if not items:
                for path in _event_logs(settings, stream):
                    if (size := _size(path)) is not None:
                        items.append({"id": path.stem.removeprefix("events-"), "kind": "events", "video": False,
                                      "started": _run_started(path.stem.removeprefix("events-")), "size": size,
                                      "note": "events only: record_video is off"})
        else:
            has_file = stream.file is not None and Path(stream.file).is_file()
            for path in _event_logs(settings, stream):
                run_id = path.stem.removeprefix("events-")
                if (size := _size(path)) is not None:
                    items.append({"id": run_id, "kind": "run", "started": _run_started(run_id), "size": size,
                                  "video": has_file or bool(_run_segments(stream, run_id))})
        items.sort(key=lambda item: item["started"] or 0, reverse=True)
        result[stream.id] = items
    return result


def _segment_path(stream: WebStream, recording_id: str) -> Path:
    match = SEGMENT_ID.match(recording_id)
    if match is None or stream.video_directory is None:
        raise NotFound(f"no recording {recording_id!r} of stream {stream.id!r}")
    path = Path(stream.video_directory) / f"{match.group(1)}.ts"
    if not path.is_file():
        raise NotFound(f"no recording {recording_id!r} of stream {stream.id!r}")
    return path


def recording_events(settings: WebSettings, stream: WebStream, recording_id: str) -> dict:
    """{"align": "pts"|"ts", "start": seconds, "events": [...], "truncated"?}: the replayed events in log order
    (a run's first `MAX_REPLAY_EVENTS`)."""
    if RUN_ID.match(recording_id):
        path = Path(settings.record_directory or "/nonexistent") / stream.id / f"events-{recording_id}.jsonl"
        if not path.is_file():
            raise NotFound(f"no recording {recording_id!r} of stream {stream.id!r}")
        events = []
        for event in read_events(path):
            if event.get("kind") in REPLAY_KINDS:
                if len(events) == MAX_REPLAY_EVENTS:  # a run that went on for days (a looped file)
                    return {"align": "ts" if stream.live else "pts", "start": 0.0, "events": events,
                            "truncated": True}
                events.append(event)
        return {"align": "ts" if stream.live else "pts", "start": 0.0, "events": events, "truncated": False}
    segment = _segment_path(stream, recording_id)
    start = int(segment.stem) / 1000
    later = [p for p in _segments(stream) if int(p.stem) > int(segment.stem)]
    end = int(later[0].stem) / 1000 if later else float("inf")
    events = []
    for path in _event_logs(settings, stream):
        events.extend(e for e in read_events_between(path, start - 1.0, end) if e.get("kind") in REPLAY_KINDS)
    events.sort(key=lambda e: e.get("ts", 0))
    return {"align": "ts", "start": start, "events": events}


class VideoCache:
    """Segments remuxed to MP4 (browsers play MP4, not MPEG-TS), once per segment version, in a private temporary
    folder: the newest `max_files` are kept (a copy is as large as its segment, and retention does not see this
    folder), and `close()` removes the folder when the console stops."""

    def __init__(self, max_files: int = 32) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="groundwatch-web-"))
        self.max_files = max(1, max_files)

    def video_for(self, stream: WebStream, recording_id: str) -> Path:
        if RUN_ID.match(recording_id):
            if stream.file is not None and Path(stream.file).is_file():
                return Path(stream.file)
            segments = _run_segments(stream, recording_id)
            if not segments:
                raise NotFound(f"recording {recording_id!r} of stream {stream.id!r} has no video")
            version = [path.stat() for path, _ in segments]
            target = self.directory / (f"{stream.id}-{recording_id}-{sum(v.st_size for v in version)}-"
                                       f"{int(max(v.st_mtime for v in version))}.mp4")
            if target.is_file():
                os.utime(target)
            else:
                remux_run_to_mp4(segments, target)
                self._evict(keep=target)
            return target
        segment = _segment_path(stream, recording_id)
        status = segment.stat()
        target = self.directory / f"{stream.id}-{segment.stem}-{status.st_size}-{int(status.st_mtime)}.mp4"
        if target.is_file():
            os.utime(target)  # recently served: kept longest
        else:
            remux_to_mp4(segment, target)
            self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        """Delete the oldest copies beyond `max_files` (a request still streaming one keeps its open file)."""
        copies = []
        for path in self.directory.glob("*.mp4"):
            try:
                copies.append((path.stat().st_mtime, path.name, path))
            except FileNotFoundError:
                continue
        copies.sort()
        for _, _, path in copies[: max(0, len(copies) - self.max_files)]:
            if path != keep:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def remux_to_mp4(source: Path, target: Path) -> Path:
    """Copy the video packets of an MPEG-TS file into an MP4 (moov first, so the browser can seek at once).
    Written under a temporary name of its own (two requests for one segment may remux it at once) and renamed."""
    import av

    handle, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".part", dir=target.parent)
    os.close(handle)
    partial = Path(name)
    try:
        with av.open(str(source)) as container_in:
            video_in = container_in.streams.video[0]
            with av.open(str(partial), "w", format="mp4", options={"movflags": "+faststart"}) as container_out:
                video_out = container_out.add_stream_from_template(video_in)
                for packet in container_in.demux(video_in):
                    if packet.dts is None or packet.size == 0:
                        continue  # the flush packet, or the torn tail of a segment still being written
                    packet.stream = video_out
                    container_out.mux(packet)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def remux_run_to_mp4(segments: list[tuple[Path, float]], target: Path) -> Path:
    """A redacted file's run: its segments (timestamps from zero in each, named by the media time of their first
    frame) copied, not re-encoded, into one MP4 whose clock is the file's, so the run's events line up by `pts`.
    Written under a temporary name and renamed, like `remux_to_mp4`."""
    import av

    handle, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".part", dir=target.parent)
    os.close(handle)
    partial = Path(name)
    try:
        with av.open(str(partial), "w", format="mp4", options={"movflags": "+faststart"}) as container_out:
            video_out, last_dts = None, None
            for path, began in segments:
                with av.open(str(path)) as container_in:
                    if not container_in.streams.video:
                        continue
                    video_in = container_in.streams.video[0]
                    if video_out is None:
                        video_out = container_out.add_stream_from_template(video_in)
                    time_base = video_in.time_base
                    shift = round(began / time_base) - (video_in.start_time or 0)
                    for packet in container_in.demux(video_in):
                        if packet.dts is None or packet.size == 0:
                            continue  # the flush packet, or the torn tail of a segment still being written
                        dts = packet.dts + shift
                        if last_dts is not None and dts <= last_dts:
                            dts = last_dts + 1  # segments that overlap by rounding
                        packet.pts, packet.dts = max(packet.pts + shift, dts), dts
                        packet.time_base = time_base
                        packet.stream = video_out
                        container_out.mux(packet)
                        last_dts = dts
            if video_out is None:
                raise NotFound(f"no video in {segments[0][0].parent}")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target
