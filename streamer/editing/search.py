"""Search video files or a recordings folder for what words describe: time ranges, best frames, a contact sheet.

    searcher = Searcher(model, cache_dir="~/.cache/groundwatch/search")
    result = searcher.search(["clip.mp4", "recordings/"], "white van")   # -> SearchResult
    write_results(result, "search.json", "search.jpg")

Per file: frames are sampled at `fps` (the first frame at or after each 1/fps step), reduced once to the model's
input scale and detected on (`gdino.predict.detect`, the one detection path); `tracker.Tracker` links the hits of
each phrase into tracks; the tracks of one phrase that overlap or lie within `merge_gap` seconds form a range.
Each range's start and end are then refined at the full frame rate: the frames between the last sample without a
hit and the first with one are decoded (seek to the keyframe before, decode forward) and binary-searched with the
detector, likewise at the end. Times are media seconds from the file's first frame; `end` is the time the last
frame showing the object stops being shown (its time plus one frame), so `end - start` is how long it was seen.

Resumable: what the detector said on each sampled and refined frame is cached per (file, prompt, thresholds,
model, fps), checkpointed while a file is searched, so an interrupted search resumes where it stopped and a
repeated one runs no detector at all. The sampled frames themselves (at the model's scale) are kept per
(file, fps, scale) when they fit `frame_cache_bytes`, so a new prompt on the same files skips decoding.
Recordings folders (`<record.directory>/<stream>/video/<ms>.ts`, see `streamer.decoder.SegmentWriter`) give
wall-clock times as well, from each segment's name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import av
import cv2
import numpy as np

from streamer.media import ForwardClock

CACHE_VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".ts", ".m4v", ".mpg", ".mpeg", ".flv")
# FFmpeg formats with an index of their packets: one file's timestamps never start again part-way.
INDEXED_FORMATS = ("mov", "mp4", "matroska", "webm", "avi")
DEFAULT_BOX_THRESHOLD = 0.35  # the model's and the daemon's default (gdino.predict.detect, [model] box_threshold)
DEFAULT_TEXT_THRESHOLD = 0.25


class SearchError(Exception):
    """A search that cannot run or cannot be written: the message says which file and why."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "groundwatch" / "search"


@dataclass(frozen=True)
class SearchOptions:
    fps: float = 2.0  # sampled frames per second of video
    box_threshold: float = DEFAULT_BOX_THRESHOLD
    text_threshold: float = DEFAULT_TEXT_THRESHOLD
    merge_gap: float = 1.0  # seconds: sightings of one phrase closer than this are one range
    min_hits: int = 2  # sampled frames with a hit a range needs (1 keeps one-sample sightings)
    refine: bool = True  # refine start and end at the full frame rate
    batch_size: int = 4
    top: int | None = None  # keep the K ranges with the best scores

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.fps) and 0 < self.fps <= 120):
            problems.append(f"fps must be in (0, 120], got {self.fps}")
        for name in ("box_threshold", "text_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.merge_gap) and self.merge_gap >= 0):
            problems.append(f"merge_gap must be >= 0 seconds, got {self.merge_gap}")
        if self.min_hits < 1:
            problems.append(f"min_hits must be at least 1, got {self.min_hits}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if self.top is not None and self.top < 1:
            problems.append(f"top must be at least 1, got {self.top}")
        if problems:
            raise SearchError("; ".join(problems))


@dataclass
class Range:
    """One stretch of a file where a phrase of the prompt is seen."""

    file: str
    start: float  # media seconds from the file's first frame
    end: float  # the last frame showing it, plus one frame
    score: float  # best detection score in the range
    phrase: str
    best_time: float  # media seconds of the frame with the best score
    best_box_xyxy: list[float]  # pixels of the original frame
    start_refined: bool = False  # start found at the full frame rate (False: at the sampling rate)
    end_refined: bool = False
    rank: int = 0  # 1 = best score of the whole search
    stream: str | None = None  # recordings: the stream id
    wall_start: float | None = None  # recordings: unix seconds
    wall_end: float | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("start", "end", "best_time", "score"):
            out[key] = round(out[key], 4)
        out["best_box_xyxy"] = [round(v, 1) for v in self.best_box_xyxy]
        if self.wall_start is not None:
            out["wall_start_iso"] = _iso(self.wall_start)
            out["wall_end_iso"] = _iso(self.wall_end)
        else:
            for key in ("stream", "wall_start", "wall_end"):
                out.pop(key)
        return out


@dataclass
class FileReport:
    file: str
    duration: float | None = None
    samples: int = 0
    ranges: int = 0
    status: str = "searched"  # searched | cached (no detector run) | error
    error: str | None = None


@dataclass
class SearchResult:
    prompt: str
    options: SearchOptions
    model: str  # model fingerprint
    ranges: list[Range] = field(default_factory=list)
    files: list[FileReport] = field(default_factory=list)

    @property
    def errors(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "error"]

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "fps": self.options.fps,
            "box_threshold": self.options.box_threshold,
            "text_threshold": self.options.text_threshold,
            "top": self.options.top,
            "model": self.model,
            "ranges": [r.to_dict() for r in self.ranges],
            "files": [asdict(f) for f in self.files],
        }


def _iso(seconds: float) -> str:
    whole, milliseconds = divmod(round(seconds * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{milliseconds:03d}Z"


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Source:
    """A video file to search; `wall_origin` is the wall-clock time of its first frame (recorded segments)."""

    path: Path
    stream: str | None = None
    wall_origin: float | None = None


def collect_sources(paths: Iterable[str | os.PathLike]) -> list[Source]:
    """Files as given; folders walked for video files (a recordings folder's segments get wall-clock times)."""
    sources: list[Source] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise SearchError(f"{path}: no video files in this folder ({', '.join(VIDEO_SUFFIXES)})")
            sources.extend(_source(p) for p in sorted(found, key=_segment_order))
        elif path.is_file():
            sources.append(_source(path))
        else:
            raise SearchError(f"{path}: no such file or folder")
    return sources


def _segment_order(path: Path):
    return (str(path.parent), int(path.stem) if path.stem.isdigit() else -1, path.name)


def _source(path: Path) -> Source:
    # A recorded segment: <directory>/<stream>/video/<unix ms of its first packet>.ts
    if path.suffix.lower() == ".ts" and path.stem.isdigit() and path.parent.name == "video":
        return Source(path, stream=path.parent.parent.name, wall_origin=int(path.stem) / 1000.0)
    return Source(path)


def file_fingerprint(path: Path) -> str:
    """Identity of a file's content without reading all of it: size, mtime and its first and last 64 KiB."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as file:
        digest.update(file.read(1 << 16))
        if stat.st_size > 1 << 17:
            file.seek(-(1 << 16), os.SEEK_END)
            digest.update(file.read(1 << 16))
    return digest.hexdigest()[:32]


def model_fingerprint(model) -> str:
    """Identity of a model's weights: its config and a strided sample and sum of every tensor (cheap, exact
    enough that another checkpoint or a fine-tune gets another cache entry)."""
    import torch

    digest = hashlib.sha256(repr(getattr(model, "config", type(model))).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if flat.numel():
                values = flat[:: max(1, flat.numel() // 64)][:64].double()
                digest.update(values.cpu().numpy().tobytes())
                digest.update(np.float64(flat.double().sum().item()).tobytes())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------------------
# Video access


class VideoFile:
    """PyAV access to one file: sampled frames, frames between two times, the frame at a time.

    Times are media seconds from the stream's start time. Raises SearchError for a file that cannot be decoded.

    A stream format without an index (MPEG-TS, MPEG-PS) can hold files joined with `cat`, whose timestamps start
    again at each join: such a file's packets are scanned once when it is opened. Times then go on one frame after
    the last frame before each join (`jumps_back` counts the joins), and the file is always decoded from the top,
    since a seek by time could land in any of its parts.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise SearchError(f"{path}: no video stream")
                stream = container.streams.video[0]
                self.time_base = stream.time_base
                self.origin = stream.start_time or 0
                rate = stream.average_rate or stream.guessed_rate
                self.frame_duration = float(1 / rate) if rate else 0.04
                if stream.duration is not None:
                    self.duration = float(stream.duration * stream.time_base)
                elif container.duration is not None:
                    self.duration = container.duration / av.time_base
                else:
                    self.duration = None
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
                indexed = any(name in INDEXED_FORMATS for name in container.format.name.split(","))
                first = next(container.decode(stream), None)  # a header alone is not a video
                if first is None:
                    raise SearchError(f"{path}: no decodable frame")
            self.jumps_back = 0
            if not indexed:
                self._scan_timestamps()
        except SearchError:
            raise
        except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
            raise SearchError(f"{path}: cannot decode this video ({exc})") from None

    def _time(self, frame) -> float:
        return float((frame.pts - self.origin) * self.time_base)

    def _scan_timestamps(self) -> None:
        """Count the joins where the timestamps jump back (demuxing only); the duration is then the sum of the
        parts'."""
        decoding = ForwardClock(self.frame_duration)  # on decode times: where they jump back, a new part begins
        parts: list[list[float]] = []  # [first, last] presentation time of each part
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            try:
                for packet in container.demux(stream):
                    stamp = packet.dts if packet.dts is not None else packet.pts
                    if stamp is None or packet.pts is None:
                        continue
                    shown = float((packet.pts - self.origin) * self.time_base)
                    decoding(float(stamp * self.time_base))
                    if not parts or decoding.jumped:
                        parts.append([shown, shown])
                    parts[-1] = [min(parts[-1][0], shown), max(parts[-1][1], shown)]
            except (av.FFmpegError, OSError):
                pass  # damaged further on: the sampling pass reports where decoding fails
        self.jumps_back = max(0, len(parts) - 1)
        if self.jumps_back:
            self.duration = parts[0][0] + sum(last - first + self.frame_duration for first, last in parts)

    def _frames(self, start: float = 0.0) -> Iterator[tuple[float, av.VideoFrame]]:
        """(time, frame) in order from the keyframe at or before `start` (from the top when start <= 0).

        MPEG-TS (recorded segments) seeks by byte position and can land past `start`, even past the last frame:
        then the seek is retried further back (1, 2, 4 ... s), down to decoding from the top, so no frame at or
        after `start` is skipped. A file whose timestamps jump back is decoded from the top, its times going on
        one frame after the last frame before each jump.
        """
        backoff = 0.0
        while True:
            target = start - backoff if not self.jumps_back else 0.0
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                if target > 0:
                    container.seek(int(target / self.time_base) + self.origin, stream=stream, backward=True,
                                   any_frame=False)
                first = True
                clock = ForwardClock(self.frame_duration)  # where the timestamps start again, time goes on
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    when = clock(self._time(frame))
                    if first and target > 0 and when > start + self.frame_duration / 2:
                        break  # overshot: seek again, further back
                    first = False
                    yield when, frame
                if not first or target <= 0:
                    return  # done, or nothing at all from the top
            backoff = max(1.0, backoff * 2)  # overshot, or the seek landed past the last frame

    def sample(self, fps: float, start: float = 0.0) -> Iterator[tuple[float, av.VideoFrame]]:
        """The first frame at or after each step k / fps, for the steps at or after `start`."""
        step = 1.0 / fps
        half = self.frame_duration / 2
        next_time = math.ceil(start * fps - 1e-6) * step
        for when, frame in self._frames(start):
            if when + half < next_time:
                continue
            yield when, frame
            next_time = (math.floor((when + half) * fps + 1e-6) + 1) * step

    def between(self, after: float, before: float) -> list[tuple[float, av.VideoFrame]]:
        """Every frame with `after` < time < `before` (half a frame of slack at both ends)."""
        half = self.frame_duration / 2
        out = []
        for when, frame in self._frames(after):
            if when >= before - half:
                break
            if when > after + half:
                out.append((when, frame))
        return out

    def frame_at(self, when: float) -> np.ndarray | None:
        """The RGB frame shown at `when`: the last frame at or before it (None only for a file without frames)."""
        last = None
        for frame_time, frame in self._frames(when):
            if frame_time > when + self.frame_duration / 2:
                break
            last = frame
        return last.to_ndarray(format="rgb24") if last is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Detection at the model's scale


def model_scale(height: int, width: int, short_side: int, max_side: int) -> float:
    """The factor the model's pre-processing would apply (never above 1: frames are only ever reduced)."""
    return min(1.0, short_side / min(height, width), max_side / max(height, width))


def reduce(frame: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return frame
    height, width = frame.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


Hit = tuple  # (x1, y1, x2, y2, score, phrase): one detection, box in pixels of the original frame


class Detector:
    """`gdino.predict.detect` for one prompt on frames already reduced to the model's scale; counts its frames."""

    def __init__(self, model, prompt: str, box_threshold: float, text_threshold: float) -> None:
        from gdino import predict
        from gdino.text import PromptError

        try:
            self.encoding = predict.encode(model, prompt)
        except PromptError as exc:
            raise SearchError(str(exc)) from None
        self.model, self.predict = model, predict
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.frames_detected = 0

    def __call__(self, frames: Sequence[np.ndarray], scales: Sequence[float]) -> list[list[Hit]]:
        """Hits per frame; `scales[i]` is the factor frame i was reduced by (`reduce`)."""
        found = self.predict.detect(self.model, list(frames), self.encoding, box_threshold=self.box_threshold,
                                    text_threshold=self.text_threshold, remove_combined=True)
        self.frames_detected += len(frames)
        out = []
        for detections, scale in zip(found, scales):
            boxes = np.asarray(detections.boxes_xyxy, np.float64).reshape(-1, 4) / scale  # back to original pixels
            out.append([(*map(float, box), float(score), str(phrase))
                        for box, score, phrase in zip(boxes, detections.scores, detections.phrases)])
        return out


# ---------------------------------------------------------------------------------------------------------------
# Cache: atomic JSON / npy files


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, flushed to disk, then rename: a reader never sees half
    a file, even after a power cut (without the fsync the rename can reach the disk before the data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        handle = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, separators=(",", ":"))))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else None


class _DetectionCache:
    """What the detector said per frame time for one (file, prompt, thresholds, model, fps): sampled frames in
    order (`samples`, with `sampled_to` the time sampling reached, `complete` once the file ended) and refinement
    probes (`probes`, keyed by microseconds)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        data = _read_json(path) if path is not None else None
        data = data or {}
        self.samples: list[list] = data.get("samples", [])  # [time, [hit, ...]]
        self.complete: bool = data.get("complete", False)
        self.probes: dict[str, list] = data.get("probes", {})
        self.meta: dict = data.get("meta", {})
        self.dirty = False

    @property
    def sampled_to(self) -> float:
        return self.samples[-1][0] if self.samples else -1.0

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            _write_json(self.path, {"version": CACHE_VERSION, "meta": self.meta, "complete": self.complete,
                                    "samples": self.samples, "probes": self.probes})
            self.dirty = False
        except OSError:
            pass  # a cache that cannot be written costs time on the next search, never this one's answer


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


# ---------------------------------------------------------------------------------------------------------------
# Ranges from sampled hits


@dataclass
class _Span:
    phrase: str
    first: int  # sample index
    last: int
    hits: int = 0
    best: tuple = (-1.0, 0.0, (0.0, 0.0, 0.0, 0.0))  # (score, time, box)


def group_ranges(times: Sequence[float], hits: Sequence[Sequence[Hit]], fps: float, merge_gap: float,
                 min_hits: int) -> list[_Span]:
    """Sampled hits -> spans of sample indices per phrase, via the tracker.

    The tracker links each phrase's boxes from sample to sample (one track per object; a missed sample or two
    is bridged by the track); tracks of one phrase that overlap or come within `merge_gap` seconds of each other
    form one span. A span needs `min_hits` sampled frames with a hit.
    """
    from tracker import Tracker, TrackerConfig

    # Every detection the search kept is a sighting: the tracker's score stages collapse to the threshold, and
    # association is loose because samples are far apart in time (an object moves a lot in 1/fps seconds).
    config = TrackerConfig(high_score=0.0, low_score=0.0, new_track_score=0.0, match_iou=0.05,
                           low_match_iou=0.05, tentative_match_iou=0.05, recovery_iou=0.05, min_hits=1,
                           max_age=math.floor(merge_gap * fps + 1e-9))
    tracker = Tracker(config)
    tracks: dict[int, _Span] = {}
    for index, frame_hits in enumerate(hits):
        boxes = np.array([h[:4] for h in frame_hits], np.float64).reshape(-1, 4)
        scores = np.array([h[4] for h in frame_hits], np.float64)
        update = tracker.update(boxes, scores, [h[5] for h in frame_hits], index)
        for k in range(len(update.ids)):
            detection = int(update.detection_indices[k])
            if detection < 0:
                continue
            track_id = int(update.ids[k])
            span = tracks.get(track_id)
            if span is None:
                span = tracks[track_id] = _Span(str(update.labels[k]), index, index)
            span.last = index
            span.hits += 1
            hit = frame_hits[detection]
            if hit[4] > span.best[0]:
                span.best = (hit[4], times[index], tuple(hit[:4]))
    spans: list[_Span] = []
    gap_samples = merge_gap * fps
    for track in sorted(tracks.values(), key=lambda s: (s.phrase, s.first)):
        previous = next((s for s in reversed(spans) if s.phrase == track.phrase), None)
        if previous is not None and track.first - previous.last <= gap_samples + 1:
            previous.last = max(previous.last, track.last)
            previous.hits += track.hits  # an upper bound when tracks overlap; only compared with min_hits
            previous.best = max(previous.best, track.best, key=lambda b: b[0])
        else:
            spans.append(_Span(track.phrase, track.first, track.last, track.hits, track.best))
    # Hits on the same sample by two overlapping tracks count once: recount from the samples.
    for span in spans:
        span.hits = sum(any(h[5] == span.phrase for h in hits[i]) for i in range(span.first, span.last + 1))
    return [s for s in spans if s.hits >= min_hits]


# ---------------------------------------------------------------------------------------------------------------
# The search


class Searcher:
    """Searches files with one model; keeps the caches. `frames_detected` counts detector frames (0 on a search
    answered from the cache)."""

    def __init__(self, model, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 frame_cache_bytes: int = 512 << 20, model_id: str | None = None,
                 progress: bool = False) -> None:
        self.model = model
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.use_cache = use_cache
        self.frame_cache_bytes = frame_cache_bytes
        self.model_id = model_id or model_fingerprint(model)
        self.progress = progress
        self.frames_detected = 0
        self.frames_decoded = 0  # frames decoded in the sampling pass (0 when the frame cache had them)

    def _scale_for(self, video: VideoFile) -> float:
        """The reduction of the file's frames (of its first size: part of the cache keys)."""
        config = self.model.config
        return model_scale(video.height, video.width, config.input_short_side, config.input_max_side)

    def _reduced(self, frame: av.VideoFrame) -> tuple[np.ndarray, float]:
        """(H', W', 3) uint8 RGB at the model's scale, and the factor: each frame's own, since a file (recordings
        joined with ffmpeg's concat demuxer) can change size part-way."""
        rgb = frame.to_ndarray(format="rgb24")
        config = self.model.config
        scale = model_scale(rgb.shape[0], rgb.shape[1], config.input_short_side, config.input_max_side)
        return reduce(rgb, scale), scale

    def search(self, paths: Iterable[str | os.PathLike], prompt: str,
               options: SearchOptions = SearchOptions()) -> SearchResult:
        from gdino.text import normalize_caption
        from streamer.prompts import prompt_problem

        problem = prompt_problem(prompt)  # the one prompt check: an empty prompt is refused in the same words
        if problem:
            raise SearchError(problem)
        caption = normalize_caption(prompt)
        detector = Detector(self.model, caption, options.box_threshold, options.text_threshold)
        sources = collect_sources(paths)
        result = SearchResult(caption, options, self.model_id)
        videos: list[tuple[Source, VideoFile | None]] = []
        for source in sources:
            try:
                videos.append((source, VideoFile(source.path)))
            except SearchError as exc:
                result.files.append(FileReport(str(source.path), status="error", error=str(exc)))
                videos.append((source, None))
        if all(video is None for _, video in videos):
            raise SearchError("; ".join(f.error for f in result.errors))
        total = sum(video.duration or 0.0 for _, video in videos if video is not None)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=round(total, 1), unit="s", unit_scale=False, desc="search", dynamic_ncols=True,
                       bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of video "
                                  "[{elapsed}<{remaining}]")
        try:
            for source, video in videos:
                if video is None:
                    continue
                if bar is not None:
                    bar.set_description(f"search {source.path.name}")
                before = detector.frames_detected
                report = FileReport(str(source.path), duration=video.duration)
                try:
                    ranges, report.samples = self._search_file(source, video, detector, options, bar)
                except SearchError as exc:
                    report.status, report.error = "error", str(exc)
                    result.files.append(report)
                    continue
                report.ranges = len(ranges)
                report.status = "searched" if detector.frames_detected > before else "cached"
                result.files.append(report)
                result.ranges.extend(ranges)
        finally:
            if bar is not None:
                bar.close()
            self.frames_detected += detector.frames_detected
        ranked = sorted(result.ranges, key=lambda r: -r.score)
        for rank, item in enumerate(ranked, 1):
            item.rank = rank
        if options.top is not None:
            keep = {id(r) for r in ranked[:options.top]}
            result.ranges = [r for r in result.ranges if id(r) in keep]
        return result

    # -- one file ---------------------------------------------------------------------------------------------

    def _search_file(self, source: Source, video: VideoFile, detector: Detector, options: SearchOptions,
                     bar) -> tuple[list[Range], int]:
        fingerprint = file_fingerprint(source.path)
        scale = self._scale_for(video)
        key = _cache_key(CACHE_VERSION, fingerprint, detector.encoding.prompt, options.box_threshold,
                         options.text_threshold, self.model_id, options.fps, scale)
        cache = _DetectionCache(self.cache_dir / f"{key}.json" if self.use_cache else None)
        cache.meta = {"file": str(source.path), "prompt": detector.encoding.prompt, "fps": options.fps}
        if not cache.complete:
            self._sample(source, video, fingerprint, scale, detector, options, cache, bar)
        elif bar is not None:
            bar.update(round(video.duration or 0.0, 1))
        if not cache.samples:
            return [], 0
        times = [s[0] for s in cache.samples]
        hits = [[tuple(h) for h in s[1]] for s in cache.samples]
        spans = group_ranges(times, hits, options.fps, options.merge_gap, options.min_hits)
        if bar is not None and spans and options.refine:
            bar.set_description(f"refine {source.path.name}")
        ranges = []
        for span in spans:
            start, end = times[span.first], times[span.last] + video.frame_duration
            start_refined = end_refined = False
            if options.refine:
                start, start_refined = self._refine(video, detector, cache, span.phrase, times, span.first,
                                                    edge="start")
                end, end_refined = self._refine(video, detector, cache, span.phrase, times, span.last, edge="end")
            score, best_time, best_box = span.best
            item = Range(str(source.path), start, end, float(score), span.phrase, float(best_time),
                         [float(v) for v in best_box], start_refined, end_refined)
            if source.wall_origin is not None:
                item.stream = source.stream
                item.wall_start, item.wall_end = source.wall_origin + start, source.wall_origin + end
            ranges.append(item)
        cache.save()
        return ranges, len(times)

    def _frame_store(self, fingerprint: str, fps: float, scale: float) -> Path:
        return self.cache_dir / "frames" / f"{_cache_key(CACHE_VERSION, fingerprint, fps, scale)}.npz"

    def _sample(self, source: Source, video: VideoFile, fingerprint: str, scale: float, detector: Detector,
                options: SearchOptions, cache: _DetectionCache, bar) -> None:
        """Detect on the sampled frames not yet in the cache; checkpoint the cache every few seconds.

        The frame cache holds frames of one size reduced by `scale` (np.stack): a file that changes size part-way
        is not kept there.
        """
        store = self._frame_store(fingerprint, options.fps, scale) if self.use_cache else None
        stored = _load_frames(store) if store is not None else None
        resume_from = cache.sampled_to
        if bar is not None and resume_from > 0:
            bar.update(round(resume_from, 1))
        keep_frames = store is not None and stored is None and resume_from < 0
        kept: list[np.ndarray] = []
        kept_times: list[float] = []
        kept_bytes = 0
        if stored is not None:
            stored_times, stored_frames = stored
            frames = ((t, f, scale) for t, f in zip(stored_times, stored_frames) if t > resume_from)
        else:
            frames = ((t, *self._reduced(f))
                      for t, f in video.sample(options.fps, max(0.0, resume_from + 1e-6)) if t > resume_from)
        batch: list[tuple[float, np.ndarray, float]] = []  # (time, frame at the model's scale, its reduction)
        last_checkpoint = time.monotonic()
        reported = max(resume_from, 0.0)

        def run(batch):
            nonlocal last_checkpoint, reported
            found = detector([f for _, f, _ in batch], [s for _, _, s in batch])
            for (when, _, _), frame_hits in zip(batch, found):
                cache.samples.append([when, [list(h) for h in frame_hits]])
            cache.dirty = True
            if bar is not None:
                now_at = min(batch[-1][0], video.duration or batch[-1][0])
                bar.update(round(max(0.0, now_at - reported), 1))
                reported = now_at
            if time.monotonic() - last_checkpoint > 10.0:
                cache.save()
                last_checkpoint = time.monotonic()

        try:
            for when, frame, frame_scale in frames:
                if stored is None:
                    self.frames_decoded += 1
                if keep_frames:
                    kept_bytes += frame.nbytes
                    same_size = frame_scale == scale and (not kept or frame.shape == kept[0].shape)
                    if same_size and kept_bytes <= self.frame_cache_bytes:
                        kept.append(frame)
                        kept_times.append(when)
                    else:
                        keep_frames, kept, kept_times = False, [], []
                batch.append((when, frame, frame_scale))
                if len(batch) >= options.batch_size:
                    run(batch)
                    batch = []
            if batch:
                run(batch)
        except (av.FFmpegError, OSError) as exc:
            cache.save()  # what was detected so far is kept: a rerun resumes after it
            raise SearchError(f"{source.path}: decoding failed at {cache.sampled_to:.1f} s ({exc})") from None
        except BaseException:
            cache.save()  # Ctrl-C: resume from here next time
            raise
        cache.complete = True
        cache.dirty = True
        cache.save()
        if bar is not None and video.duration:
            bar.update(round(max(0.0, video.duration - reported), 1))
        if keep_frames and kept and store is not None:
            try:
                _atomic_write(store, lambda p: _save_frames(p, kept_times, kept))
            except (OSError, ValueError):
                pass  # no frame cache: the next prompt decodes again

    def _probe(self, video: VideoFile, detector: Detector, cache: _DetectionCache, when: float,
               frame: av.VideoFrame) -> list[Hit]:
        key = str(round(when * 1e6))
        if key not in cache.probes:
            reduced, scale = self._reduced(frame)
            cache.probes[key] = [list(h) for h in detector([reduced], [scale])[0]]
            cache.dirty = True
        return [tuple(h) for h in cache.probes[key]]

    def _refine(self, video: VideoFile, detector: Detector, cache: _DetectionCache, phrase: str,
                times: Sequence[float], index: int, edge: str) -> tuple[float, bool]:
        """Binary search of the full-rate frames between sample `index` (a hit) and its neighbour without one.

        Returns (time, refined): for `start`, the first frame with a hit; for `end`, the last one plus a frame.
        Assumes one change between the two samples, which holds when 1/fps is short against how long things stay.
        """
        step = video.frame_duration
        if edge == "start":
            if index == 0 and times[0] <= step / 2:
                return times[0], True  # seen on the very first frame
            after = times[index - 1] if index > 0 else -step
            candidates = video.between(after, times[index])
            if not candidates:
                return times[index], True  # no frame between the two samples: already exact
            low, high = 0, len(candidates)  # candidates[high] would be the sample itself (a hit)
            while low < high:
                middle = (low + high) // 2
                if self._has(video, detector, cache, phrase, *candidates[middle]):
                    high = middle
                else:
                    low = middle + 1
            return (candidates[low][0] if low < len(candidates) else times[index]), True
        before = times[index + 1] if index + 1 < len(times) else math.inf  # the last sample: to the file's end
        candidates = video.between(times[index], before)
        if not candidates:
            return times[index] + step, True
        low, high = -1, len(candidates) - 1  # index -1 stands for the sample itself (a hit)
        while low < high:
            middle = (low + high + 1) // 2
            if self._has(video, detector, cache, phrase, *candidates[middle]):
                low = middle
            else:
                high = middle - 1
        return (candidates[low][0] if low >= 0 else times[index]) + step, True

    def _has(self, video, detector, cache, phrase, when, frame) -> bool:
        return any(h[5] == phrase for h in self._probe(video, detector, cache, when, frame))


def _save_frames(path: Path, times: list[float], frames: list[np.ndarray]) -> None:
    with open(path, "wb") as file:
        np.savez(file, times=np.asarray(times, np.float64), frames=np.stack(frames))  # (N, H, W, 3) uint8


def _load_frames(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(times, frames) from the frame cache; None when there is none. A file that cannot be read as one (empty
    or cut short by a crash or a disk fault: EOFError, BadZipFile, zlib errors...) is a miss and is deleted, so
    the search that follows writes it again."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            times, frames = data["times"], data["frames"]
        if times.ndim != 1 or frames.ndim != 4 or len(times) != len(frames) or frames.dtype != np.uint8:
            raise ValueError(f"unexpected arrays {times.shape} {frames.shape} {frames.dtype}")
        return times, frames
    except Exception:
        try:
            path.unlink()
        except OSError:
            pass
        return None


# ---------------------------------------------------------------------------------------------------------------
# Output


def contact_sheet(result: SearchResult, *, tile_width: int = 320, columns: int = 4) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the best frame of each range, best score first, its box drawn and a caption
    (file, time, score, phrase) under it."""
    ranges = sorted(result.ranges, key=lambda r: r.rank)
    caption_height = 40
    tiles = []
    videos: dict[str, VideoFile] = {}
    for item in ranges:
        try:
            video = videos.get(item.file) or videos.setdefault(item.file, VideoFile(Path(item.file)))
            frame = video.frame_at(item.best_time)
        except SearchError:
            frame = None
        if frame is None:
            frame = np.zeros((tile_width * 9 // 16, tile_width, 3), np.uint8)
            scale = 1.0
        else:
            scale = tile_width / frame.shape[1]
            frame = cv2.resize(frame, (tile_width, max(1, round(frame.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)
            x1, y1, x2, y2 = (round(v * scale) for v in item.best_box_xyxy)
            cv2.rectangle(frame, (x1, y1), (x2, y2), (255, 40, 40), 2)
        tile = np.full((frame.shape[0] + caption_height, tile_width, 3), 255, np.uint8)
        tile[:frame.shape[0]] = frame
        when = _clock(item.best_time)
        lines = [f"#{item.rank} {Path(item.file).name} {when}",
                 f"{item.phrase} {item.score:.2f}  {_clock(item.start)}-{_clock(item.end)}"]
        for row, text in enumerate(lines):
            cv2.putText(tile, text[:48], (4, frame.shape[0] + 15 + 17 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                        (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    if not tiles:
        sheet = np.full((60, tile_width, 3), 255, np.uint8)
        cv2.putText(sheet, f"no match for '{result.prompt[:30]}'", (6, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
        return sheet
    height = max(t.shape[0] for t in tiles)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    sheet = np.full((rows * height, columns * tile_width, 3), 255, np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet[r * height:r * height + tile.shape[0], c * tile_width:(c + 1) * tile_width] = tile
    return sheet


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" if hours else f"{minutes}:{rest:04.1f}"


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, not after hours of searching, when `path` cannot be written (no folder, no permission)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SearchError(f"cannot write {path}: it is a folder")
    if not folder.is_dir():
        raise SearchError(f"cannot write {path}: no folder {folder}")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise SearchError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(handle)
    os.unlink(temporary)
    return path


def write_results(result: SearchResult, json_path: str | os.PathLike, sheet_path: str | os.PathLike | None) -> None:
    """The JSON of ranges and the contact sheet, each written under a temporary name and renamed: a file at
    either path is always whole. Raises SearchError when a path cannot be written."""
    data = result.to_dict()
    data["contact_sheet"] = str(sheet_path) if sheet_path is not None else None
    try:
        if sheet_path is not None:
            sheet_path = Path(sheet_path)
            image = cv2.cvtColor(contact_sheet(result), cv2.COLOR_RGB2BGR)
            extension = sheet_path.suffix.lower() if sheet_path.suffix.lower() in (".png", ".jpg", ".jpeg",
                                                                                    ".webp") else ".png"
            ok, encoded = cv2.imencode(extension, image)
            if not ok:
                raise SearchError(f"cannot encode the contact sheet as {extension}")
            _atomic_write(sheet_path, lambda p: p.write_bytes(encoded.tobytes()))
        _atomic_write(Path(json_path), lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))
    except OSError as exc:
        raise SearchError(f"cannot write the results: {exc.strerror or exc} ({exc.filename or json_path})") from None
