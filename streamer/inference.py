"""The inference worker: one process that batches frames across streams, runs the detector, tracks and emits.

The worker knows the model only through the small `Detector` protocol (encode a prompt once; detect on a batch
of frames), so transport, tracking and events can be tested with a deterministic fake; the daemon uses
`GdinoDetector`. One text encoding is cached per prompt; one tracker runs per stream.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from streamer.alerts import build_stream_alerts
from streamer.config import ModelConfig, StreamConfig, prompt_phrases
from streamer.events import COUNTS_KIND, make_event, round_box
from streamer.frames import Frame, FrameMailbox
from streamer.opentracks import OpenTracks
from streamer.process import EXIT_FATAL, EventSender, child_setup
from streamer.prompts import DEFAULT_MAX_PROMPT_TOKENS, check_prompt
from streamer.stats import STATE_CODES, STATE_NAMES, StreamStats
from streamer.watchdog import BatchSizer, DetectorWatchdog, is_out_of_memory, with_injected_faults
from streamer.zones import normalize_phrase
from tracker.config import TrackerConfig

log = logging.getLogger("groundwatch.inference")


class FrameDetections(Protocol):
    boxes_xyxy: np.ndarray  # (N, 4) float32 pixels
    scores: np.ndarray  # (N,)
    phrases: list[str]


class Detector(Protocol):
    def encode(self, prompt: str) -> Any:
        """Encode a prompt once; the result is passed back to `detect`."""

    def detect(self, frames: Sequence[np.ndarray], encoding: Any) -> list[FrameDetections]:
        """One `FrameDetections` per (H, W, 3) uint8 RGB frame."""


class GdinoDetector:
    """Grounding DINO behind the `Detector` protocol: a thin adapter over `gdino.predict`, the one detection path.

    The resize is exposed: the official short side of 800 px is what the published weights expect, while a
    camera service on a CPU may trade accuracy for speed.
    """

    def __init__(self, *, weights: str = "default", device: str = "cpu", dtype: str = "float32",
                 box_threshold: float = 0.35, text_threshold: float = 0.25, threads: int = 0,
                 short_side: int = 800, max_side: int = 1333,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, backend: str = "torch",
                 onnx: str | None = None, cache_dir: str | None = None) -> None:
        # Imported here, not at the top: torch and the model are loaded only in the worker process.
        import torch

        import gdino
        from gdino import backends, predict

        self.threads, self._threads_checked = threads, False
        self._hold_threads(torch)
        # "auto" backend/dtype: the fastest whose parity holds on this CPU (gdino.backends.resolve); the exported
        # graphs are float32, dtype applies to the torch backend.
        backend, dtype = backends.resolve(backend, dtype, device)
        if weights == "tiny":
            # Random weights of the tiny config: plumbing tests and the pipeline benchmark, never for answers.
            from gdino.config import tiny

            torch.manual_seed(0)
            model = gdino.build(tiny()).to(device=device, dtype=getattr(torch, dtype)).eval()
        else:
            model = gdino.load(weights, device=device, dtype=dtype)
        model = backends.open_model(model, backend, device=device, onnx_path=onnx, cache_dir=cache_dir,
                                    threads=threads)
        self.model, self.predict, self._torch = model, predict, torch
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.short_side, self.max_side = short_side, max_side
        self.max_prompt_tokens = max_prompt_tokens

    @classmethod
    def from_config(cls, config: ModelConfig) -> "GdinoDetector":
        return cls(weights=config.weights, device=config.device, dtype=config.dtype,
                   box_threshold=config.box_threshold, text_threshold=config.text_threshold,
                   threads=config.threads, short_side=config.short_side, max_side=config.max_side,
                   max_prompt_tokens=config.max_prompt_tokens, backend=config.backend, onnx=config.onnx,
                   cache_dir=config.cache_dir)

    def release_memory(self) -> None:
        """After an out-of-memory error: give cached GPU blocks back before a smaller batch is tried."""
        if str(self.device).startswith("cuda"):
            self._torch.cuda.empty_cache()

    def encode(self, prompt: str):
        """Tokenised and encoded once per prompt (several passes past the text encoder's window). A prompt
        past `max_prompt_tokens` raises `PromptProblem` before any encoding."""
        check_prompt(prompt, self.max_prompt_tokens, self.model.tokenizer)
        with self._torch.inference_mode():
            return self.predict.encode(self.model, prompt)

    def _hold_threads(self, torch) -> None:
        """Apply `threads` to torch (and so to its OpenMP pool) and to Numba's pool. Starting Numba's threading
        layer (the first call of the CPU attention kernel) resets the process's OpenMP thread count, so this
        runs again whenever torch no longer reads the setting."""
        if not self.threads:
            return
        import numba
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(self.threads)
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        # Every OpenMP and BLAS runtime loaded so far: Numba's OpenMP layer brings its own libgomp, apart
        # from torch's.
        threadpool_limits(limits=self.threads)

    def detect(self, frames: Sequence[np.ndarray], encoding) -> list[FrameDetections]:
        # remove_combined: one phrase per box, from its own sub-sentence: the tracker associates within a
        # phrase, and "red car" must not become "red car white van" when both are near the threshold.
        with self._torch.inference_mode():
            found = self.predict.detect(self.model, frames, encoding, box_threshold=self.box_threshold,
                                        text_threshold=self.text_threshold, remove_combined=True,
                                        short_side=self.short_side, max_side=self.max_side)
        if self.threads and (not self._threads_checked or self._torch.get_num_threads() != self.threads):
            self._threads_checked = True  # the first call has started every thread pool it uses
            self._hold_threads(self._torch)
        return found


def build_detector(model_config: ModelConfig) -> GdinoDetector:
    return GdinoDetector.from_config(model_config)


def build_preview_encoder(settings):
    """Previews only when the web console is on (`settings` is a `PreviewSettings`, or None)."""
    if settings is None:
        return None
    from streamer.web.preview import PreviewEncoder

    return PreviewEncoder(settings)


def build_redactions(settings: dict | None, sender) -> dict:
    """stream id -> `redaction.StreamRedaction` for the streams with `redact` (`settings`: id -> RedactionSettings)."""
    if not settings:
        return {}
    from streamer.redaction import build_stream_redaction

    def on_error(stream_id: str):
        return lambda message: sender.send(make_event(stream_id, "error", message=message,
                                                      error_type="record_failed", fatal=False))

    return {stream_id: build_stream_redaction(item, on_error=on_error(stream_id))
            for stream_id, item in settings.items() if item is not None}


def build_tracker(tracker_config: TrackerConfig):
    import tracker

    return tracker.Tracker(tracker_config)


@dataclass
class StreamState:
    stream_id: str
    live: bool
    mailbox: FrameMailbox
    prompt: str
    tracker: Any
    finished: bool = False
    frames: int = 0
    prompt_error: str | None = None  # the prompt could not be encoded: frames are skipped until a new prompt
    id_base: int = 0  # added to the tracker's ids: unique within the stream for the run (see last_track_id)
    extra: dict = field(default_factory=dict)


class InferenceWorker:
    """Pulls frames from every mailbox, runs the detector in batches, tracks, and sends events."""

    def __init__(self, *, detector: Detector, streams: list[StreamConfig], mailboxes: dict[str, FrameMailbox],
                 stats: StreamStats, sender: EventSender, tracker_factory, batch_size: int = 4,
                 idle_sleep: float = 0.003, oom_recover_seconds: float = 60.0,
                 watchdog: DetectorWatchdog | None = None, previews=None,
                 open_tracks: "OpenTracks | None" = None, alerts: dict | None = None,
                 redactions: dict | None = None) -> None:
        self.detector, self.stats, self.sender = detector, stats, sender
        self.tracker_factory, self.batch_size, self.idle_sleep = tracker_factory, batch_size, idle_sleep
        self.streams = {
            s.id: StreamState(s.id, s.is_live, mailboxes[s.id], s.prompt, tracker_factory())
            for s in streams
        }
        self.open_tracks = open_tracks
        for state in self.streams.values():
            state.id_base = int(stats.get(state.stream_id, "last_track_id"))
        self.encodings: dict[str, Any] = {}
        self.sizer = BatchSizer(batch_size, oom_recover_seconds)  # self.batch_size follows it
        self.skipped_in_a_row = 0  # frames skipped for out of memory since the last success
        self.watchdog = watchdog
        self.alerts = alerts or {}  # stream id -> alerts.StreamAlerts (zones, lines, rules, snapshots, clips)
        self.consecutive_failures = 0
        self.max_consecutive_failures = 10
        self._rotation = 0
        self.previews = previews  # a streamer.web.preview.PreviewEncoder when the web console is on
        # stream id -> redaction.StreamRedaction: these streams' pictures leave the worker only redacted
        self.redactions = redactions or {}
        # Prompt changes are encoded here, off the frame loop: a long prompt never stalls the streams.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-encoder")
        self._encoding_jobs: list[tuple[Future, int, str, str, float, int]] = []
        # Per stream, the number of prompt changes asked for, and of the last one applied: a change finishing after
        # a later one was applied (that one's prompt was already encoded) is superseded, never applied.
        self._prompt_asked: dict[str, int] = {}
        self._prompt_applied: dict[str, int] = {}

    # -- prompts -----------------------------------------------------------------------------------------

    def detector_prompt(self, stream_id: str, prompt: str) -> str:
        """What the detector runs for a stream: with `redact`, the redact phrases ride in the same pass."""
        redaction = self.redactions.get(stream_id)
        if redaction is None:
            return prompt
        from streamer.redaction import detector_prompt

        return detector_prompt(prompt, redaction.settings.prompt)

    def encoding_for(self, prompt: str) -> Any:
        if prompt not in self.encodings:
            self.encodings[prompt] = self.detector.encode(prompt)
        return self.encodings[prompt]

    def end_predecessor_tracks(self) -> None:
        """A restarted worker ends the tracks its predecessor left open (`reason: worker_restarted`): their ids
        are never updated again, and a subscriber must not wait for them."""
        if self.open_tracks is None:
            return
        for state in self.streams.values():
            left = self.open_tracks.take(state.stream_id)
            for track in left:
                ts = track.pop("ts")
                self._send(make_event(state.stream_id, "track", ts=ts if ts else None, event="ended",
                                      reason="worker_restarted", **track))
            if left:
                self.stats.add(state.stream_id, "track_events", len(left))

    def prepare_prompts(self) -> None:
        """Encode every stream's prompt at start. A prompt that cannot be encoded costs its own stream (an
        `error` event, frames skipped until a good prompt is set), never the worker and the other streams."""
        for state in self.streams.values():
            try:
                self.encoding_for(self.detector_prompt(state.stream_id, state.prompt))
                state.prompt_error = None
            except Exception as exc:
                self._prompt_failed(state, f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError)
                                    else str(exc))

    def _prompt_failed(self, state: "StreamState", reason: str) -> None:
        if state.prompt_error == reason:
            return
        state.prompt_error = reason
        log.error("%s: cannot use the prompt %r: %s", state.stream_id, state.prompt[:80], reason)
        self._send(make_event(state.stream_id, "error", message=f"cannot use the prompt: {reason}",
                              error_type="bad_prompt", fatal=False, prompt=state.prompt[:200]))

    def set_prompt(self, stream_id: str, prompt: str) -> dict:
        """Switch a stream's prompt: encode it once; end the tracks of phrases that left the prompt."""
        state = self.streams[stream_id]
        started = time.perf_counter()
        self.encoding_for(self.detector_prompt(stream_id, prompt))
        encode_ms = (time.perf_counter() - started) * 1000
        # Tracks of phrases the new prompt keeps go on; only those of phrases that left it end.
        kept = prompt_phrases(prompt)
        gone = [label for label in state.tracker.labels if normalize_phrase(label) not in kept]
        self._emit_track_events(state, state.tracker.finish(labels=gone), ts=time.time() if state.live else None,
                                reason="prompt_changed")
        previous, state.prompt = state.prompt, prompt
        state.prompt_error = None
        self.stats.add(stream_id, "prompt_changes")
        state_name = STATE_NAMES.get(self.stats.get(stream_id, "state"), "online")
        self._send(make_event(stream_id, "status", state=state_name, reason="prompt_changed", prompt=prompt,
                              previous_prompt=previous))
        unused = {p for p in self.encodings
                  if p not in {self.detector_prompt(s.stream_id, s.prompt) for s in self.streams.values()}}
        for stale in unused:  # forget encodings nobody uses any more: prompts may change all day
            del self.encodings[stale]
        return {"stream": stream_id, "prompt": prompt, "previous_prompt": previous, "encode_ms": round(encode_ms, 2)}

    # -- the loop ----------------------------------------------------------------------------------------

    def _send(self, event: dict) -> None:
        if not self.sender.send(event):
            self.stats.set(event["stream"], "worker_events_dropped", self.sender.dropped)

    def gather(self) -> list[tuple[StreamState, Frame]]:
        """Up to `batch_size` frames, round-robin over streams so a busy file cannot starve a camera."""
        active = [s for s in self.streams.values() if not s.finished]
        if not active:
            return []
        self._rotation = (self._rotation + 1) % len(active)
        order = active[self._rotation:] + active[: self._rotation]
        per_stream = max(1, -(-self.batch_size // len(order)))
        batch: list[tuple[StreamState, Frame]] = []
        for state in order:
            room = min(per_stream, self.batch_size - len(batch))
            if room <= 0:
                break
            for frame in state.mailbox.take(state.live, limit=room):
                if state.prompt_error is not None:
                    state.mailbox.release(frame)  # nothing to look for: the frame is skipped, the file goes on
                    continue
                batch.append((state, frame))
        if len(batch) < self.batch_size:  # leftover room goes to whoever has more frames waiting
            for state in order:
                room = self.batch_size - len(batch)
                if room <= 0 or state.live:
                    continue
                for frame in state.mailbox.take(False, limit=room):
                    if state.prompt_error is not None:
                        state.mailbox.release(frame)
                        continue
                    batch.append((state, frame))
        return batch

    def process(self, batch: list[tuple[StreamState, Frame]]) -> None:
        groups: dict[str, list[tuple[StreamState, Frame]]] = {}
        for state, frame in batch:
            groups.setdefault(self.detector_prompt(state.stream_id, state.prompt), []).append((state, frame))
        for prompt, items in groups.items():
            try:
                encoding = self.encoding_for(prompt)
            except Exception as exc:  # the prompt, not the detector: only these streams lose these frames
                for state, frame in items:
                    state.mailbox.release(frame)
                for state in {state.stream_id: state for state, _ in items}.values():
                    self._prompt_failed(state, str(exc))
                continue
            started = time.perf_counter()
            try:
                results = self._detect(items, encoding)
                self.consecutive_failures = 0
                # What may leave the worker of each frame: a redacted stream's redacted copy, or None.
                results, pictures = self._redact(items, results)
                # Encoded before the slots are released: after `release` a decoder may overwrite the pixels.
                previews = [self._encode_preview(state, frame, picture)
                            for (state, frame), picture in zip(items, pictures)]
            except Exception as exc:
                # One bad batch costs its frames, not the worker; a detector that keeps failing (out of
                # memory on every call) is restarted by the supervisor instead of spinning here.
                for state, frame in items:
                    state.mailbox.release(frame)
                self.consecutive_failures += 1
                log.exception("detector failed on a batch of %d frames", len(items))
                for stream_id in {state.stream_id for state, _ in items}:
                    self._send(make_event(stream_id, "error", message=f"detector failed: {type(exc).__name__}: "
                                          f"{exc}", error_type="inference_failed", fatal=False))
                if self.consecutive_failures >= self.max_consecutive_failures or is_out_of_memory(exc):
                    # Out of memory gets here only once `_detect` gave up on skipping frames. The frames stay
                    # READING: the next worker gets them again.
                    raise
                for state, frame in items:
                    state.mailbox.release(frame)
                continue
            inference_ms = (time.perf_counter() - started) * 1000 / len(items)
            for (state, frame), result, preview, picture in zip(items, results, previews, pictures):
                # Released only once its events are out: a file frame whose worker dies before that is still
                # READING, and the supervisor hands it to the next worker (FrameMailbox.recover_reading).
                try:
                    if result is not None:  # None: skipped, out of memory even alone
                        self._emit_frame(state, frame, result, inference_ms, picture)
                        if preview is not None:  # after its detections: a viewer has the boxes with the picture
                            self.sender.send_frames(preview)
                        redaction = self.redactions.get(state.stream_id)
                        if redaction is not None and picture is not None:
                            redaction.record(picture, frame.ts)
                finally:
                    state.mailbox.release(frame)

    def _redact(self, items: list[tuple[StreamState, Frame]], results: list) -> tuple[list, list]:
        """Per frame: (the detections to track and publish, the picture that may leave the worker).

        Unredacted streams: the detector's results and the frame's own pixels. Redacted streams: the watch
        prompt's detections and the redacted copy, or None (nothing of the frame leaves) when the redaction
        failed or the frame was never detected on: fail closed."""
        kept, pictures = [], []
        for (state, frame), result in zip(items, results):
            redaction = self.redactions.get(state.stream_id)
            if redaction is None:
                kept.append(result)
                pictures.append(frame.pixels)
                continue
            if result is None:
                kept.append(None)
                pictures.append(None)
                continue
            found = None
            try:
                found, boxes_xyxy, scores = redaction.split(result, state.prompt)
                picture = redaction.apply(frame.pixels, boxes_xyxy, scores, frame.frame_index)
            except Exception as exc:  # the frame is dropped, never let out raw; its events still go out
                log.exception("%s: redaction failed on frame %d", state.stream_id, frame.frame_index)
                redaction.failures += 1
                self.stats.add(state.stream_id, "redaction_failed")
                if redaction.failures in (1, 10, 100) or redaction.failures % 1000 == 0:
                    self._send(make_event(state.stream_id, "error", message=f"redaction failed: {type(exc).__name__}: "
                                          f"{exc}; the frame's pictures were dropped", error_type="redaction_failed",
                                          fatal=False, frame=frame.frame_index, dropped=redaction.failures))
                kept.append(found if found is not None else redaction.nothing())
                pictures.append(None)
                continue
            self.stats.add(state.stream_id, "frames_redacted")
            kept.append(found)
            pictures.append(picture)
        return kept, pictures

    def _encode_preview(self, state: StreamState, frame: Frame, pixels: np.ndarray | None) -> list[bytes] | None:
        if self.previews is None or pixels is None:
            return None
        try:
            return self.previews.maybe_encode(state.stream_id, frame.frame_index, pixels, ts=frame.ts,
                                              pts=frame.pts, decoded_at=frame.decoded_at)
        except Exception:  # a preview is never worth a frame's events
            log.exception("preview encoding failed")
            return None

    def _detect_watched(self, frames: list[np.ndarray], encoding: Any) -> list[FrameDetections]:
        if self.watchdog is not None:
            self.watchdog.begin()
        try:
            return self.detector.detect(frames, encoding)
        finally:
            if self.watchdog is not None:
                self.watchdog.end()

    def _detect(self, items: list[tuple[StreamState, Frame]], encoding: Any) -> list[FrameDetections | None]:
        """Detect on `items` in batches of the current size. Out of memory halves the size and runs the same
        frames again; a frame that does not fit alone is skipped (None) with an `out_of_memory` error event."""
        results: list[FrameDetections | None] = [None] * len(items)
        start = 0
        while start < len(items):
            chunk = items[start:start + self.sizer.size]
            try:
                found = self._detect_watched([frame.pixels for _, frame in chunk], encoding)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                release = getattr(self.detector, "release_memory", None)
                if release is not None:
                    release()
                if len(chunk) > 1:
                    self.batch_size = self.sizer.shrink()
                    log.warning("out of memory on a batch of %d frames: batch size now %d", len(chunk),
                                self.batch_size)
                    continue
                self.sizer.shrink()  # at 1 already: restarts the quiet period
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= self.max_consecutive_failures:
                    raise  # memory never comes back: a fresh worker (a fresh CUDA context) is the next step
                state, frame = chunk[0]
                log.error("out of memory on one frame of %s: frame %d skipped", state.stream_id, frame.frame_index)
                self._send(make_event(state.stream_id, "error", message=f"out of memory even at batch size 1: "
                                      f"frame {frame.frame_index} skipped ({exc})", error_type="out_of_memory",
                                      fatal=False, frame=frame.frame_index))
                start += 1
                continue
            results[start:start + len(chunk)] = found
            start += len(chunk)
            self.skipped_in_a_row = 0
        self.batch_size = self.sizer.maybe_grow()
        return results

    def _emit_frame(self, state: StreamState, frame: Frame, result: FrameDetections, inference_ms: float,
                    picture: np.ndarray | None = None) -> None:
        """`picture`: what snapshots may be made of (the redacted copy on a redacted stream; None: nothing)."""
        if picture is None and state.stream_id not in self.redactions:
            picture = frame.pixels
        boxes_xyxy = np.asarray(result.boxes_xyxy, dtype=np.float32).reshape(-1, 4)  # (N, 4) pixels
        scores = np.asarray(result.scores, dtype=np.float32).reshape(-1)
        phrases = list(result.phrases)
        update = state.tracker.update(boxes_xyxy, scores, phrases, frame.frame_index)
        track_of_detection = np.full(len(phrases), -1, dtype=np.int64)
        matched = update.detection_indices >= 0
        track_of_detection[update.detection_indices[matched]] = update.ids[matched] + state.id_base
        if len(update):
            top = state.id_base + int(update.ids.max())
            if top > self.stats.get(state.stream_id, "last_track_id"):
                self.stats.set(state.stream_id, "last_track_id", top)
        if self.open_tracks is not None:
            self.open_tracks.write(state.stream_id, frame.frame_index, frame.ts, update.ids + state.id_base,
                                   update.boxes_xyxy, update.scores, update.labels, update.ages, update.hits)
        height, width = frame.pixels.shape[:2]
        detections = [
            {
                "box": round_box(boxes_xyxy[k]),
                "score": round(float(scores[k]), 4),
                "phrase": phrases[k],
                "track_id": int(track_of_detection[k]) if track_of_detection[k] >= 0 else None,
            }
            for k in range(len(phrases))
            if np.isfinite(boxes_xyxy[k]).all() and np.isfinite(scores[k])
        ]
        latency_ms = (time.time() - frame.decoded_at) * 1000
        self._send(
            make_event(state.stream_id, "detections", ts=frame.ts, frame=frame.frame_index,
                       pts=round(frame.pts, 6), width=width, height=height, prompt=state.prompt,
                       detections=detections, inference_ms=round(inference_ms, 2), latency_ms=round(latency_ms, 2))
        )
        track_fields = None
        alerts = self.alerts.get(state.stream_id)
        if alerts is not None:
            alert_events, track_fields = alerts.on_frame(update, picture, frame.ts, id_base=state.id_base,
                                                         frame_size=(width, height))
            for kind, fields in alert_events:
                self._send(make_event(state.stream_id, kind, ts=frame.ts, frame=frame.frame_index, **fields))
        self._emit_track_events(state, update, ts=frame.ts, frame=frame, track_fields=track_fields)
        if alerts is not None:
            self._send_counts(state.stream_id, alerts)
        state.frames += 1
        self.stats.add(state.stream_id, "frames_processed")
        self.stats.add(state.stream_id, "detections", len(detections))
        self.stats.set(state.stream_id, "inference_ms", inference_ms)
        self.stats.set(state.stream_id, "latency_ms", latency_ms)

    def _emit_track_events(self, state: StreamState, update, ts: float | None, frame: Frame | None = None,
                           reason: str | None = None, track_fields: dict | None = None) -> None:
        frame_index = frame.frame_index if frame is not None else int(update.frame_index)
        ts = ts if ts is not None else (frame.ts if frame is not None else state.extra.get("last_ts", 0.0))
        if frame is not None:
            state.extra["last_ts"] = frame.ts
        count = 0
        row_of_id = {int(track_id): row for row, track_id in enumerate(update.ids.tolist())}
        for kind, ids in (("started", update.started), ("updated", update.updated), ("lost", update.lost)):
            for track_id in ids.tolist():
                row = row_of_id.get(int(track_id))
                if row is None:
                    continue
                self._send(
                    make_event(state.stream_id, "track", ts=ts, frame=frame_index, event=kind,
                               track_id=int(track_id) + state.id_base, box=round_box(update.boxes_xyxy[row]),
                               score=round(float(update.scores[row]), 4), phrase=update.labels[row],
                               age=int(update.ages[row]), hits=int(update.hits[row]),
                               **(track_fields.get(int(track_id) + state.id_base, {}) if track_fields else {}))
                )
                count += 1
        if reason and self.open_tracks is not None and state.tracker.active_count == 0:
            self.open_tracks.clear(state.stream_id)  # the tracker finished: nothing of it is open any more
        alerts = self.alerts.get(state.stream_id)
        for track in update.ended_tracks:
            fields = {"reason": reason} if reason else {}
            if alerts is not None:
                zone_events, extra = alerts.on_track_end(track.id + state.id_base, track.label, ts)
                for kind, zone_fields in zone_events:
                    self._send(make_event(state.stream_id, kind, ts=ts, frame=frame_index, **zone_fields))
                fields.update(extra)
            self._send(
                make_event(state.stream_id, "track", ts=ts, frame=frame_index, event="ended",
                           track_id=track.id + state.id_base,
                           box=round_box(track.box_xyxy), score=round(track.score, 4), phrase=track.label,
                           age=track.age, hits=track.hits, **fields)
            )
            count += 1
        if count:
            self.stats.add(state.stream_id, "track_events", count)

    def finish_streams(self) -> None:
        """A stream whose decoder finished and whose frames are all processed: end its tracks, mark it done.

        The decoder sets `finished` after its last `put`, so finished-and-nothing-pending is final.
        """
        for state in self.streams.values():
            if state.finished or not state.mailbox.finished or state.mailbox.pending():
                continue
            state.finished = True
            # A file stopped by the shutdown is not at its end: say so, as for live streams.
            reason = "shutdown" if state.mailbox.end_reason == "shutdown" else "end_of_stream"
            self._emit_track_events(state, state.tracker.finish(), ts=None, reason=reason)
            if state.stream_id in self.redactions:
                self.redactions[state.stream_id].close()  # its clips are cut from the redacted recording
            self._tick_alerts(state, finished=True)  # pending clips of a file are cut before it goes offline
            if state.mailbox.end_reason == "end_of_file":
                self._send(make_event(state.stream_id, "status", state="offline", reason="end_of_file",
                                      source="file", frames=state.frames))
                self.stats.set(state.stream_id, "state", STATE_CODES["offline"])
            self.stats.set(state.stream_id, "worker_finished", 1)

    def step(self) -> int:
        """One round: gather, process, finish streams. Returns how many frames were processed."""
        batch = self.gather()
        if batch:
            self.process(batch)
        # Every round, not only idle ones: a file's end must not wait for a busy camera to pause.
        self.finish_streams()
        for state in self.streams.values():
            if not state.finished:
                self._tick_alerts(state)
        return len(batch)

    def _tick_alerts(self, state: StreamState, finished: bool = False) -> None:
        alerts = self.alerts.get(state.stream_id)
        if alerts is None or not alerts.pending:
            return
        if state.stream_id in self.redactions:
            self.redactions[state.stream_id].drain()  # clips are cut from the redacted recording: on disk first
        for kind, fields in alerts.tick(state.extra.get("last_ts"), finished=finished):
            self._send(make_event(state.stream_id, kind, ts=state.extra.get("last_ts"), **fields))

    def _send_counts(self, stream_id: str, alerts) -> None:
        """Zone and line counts for the hub's heartbeat, when they change (an internal kind, not published)."""
        counts = alerts.counts()
        if counts is not None:
            self._send(make_event(stream_id, COUNTS_KIND, zones=counts[0], lines=counts[1]))

    def run(self, stop, control: "queue.Queue | None" = None, replies: "queue.Queue | None" = None) -> None:
        while not stop.is_set():
            if control is not None:
                self._serve_control(control, replies)
            if not self.step():
                time.sleep(self.idle_sleep)
        # Drain: frames already decoded from files are processed, so a shutdown never cuts a file short
        # mid-mailbox; decoders are stopped first, so this is bounded by the mailbox size.
        while self.step():
            pass
        for redaction in self.redactions.values():
            redaction.close()  # the redacted recording's last packets, before the last clips are cut from it
        for state in self.streams.values():
            if not state.finished:
                self._emit_track_events(state, state.tracker.finish(), ts=None, reason="shutdown")
                self._tick_alerts(state, finished=True)  # clips of what was recorded so far
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def set_alerting(self, command: str, args: dict) -> dict:
        """Zones and lines of one stream (`set_zones`), or every rule (`set_rules`): effective on the next frame."""
        changed = [args["stream"]] if command == "set_zones" else list(self.alerts)
        for stream_id in changed:
            if command == "set_zones":
                self.alerts[stream_id].set_places(args["zones"], args["lines"])
            else:
                self.alerts[stream_id].set_rules(args["rules"])
            # In the event log, the frames after this event are the ones the change applies to.
            state_name = STATE_NAMES.get(self.stats.get(stream_id, "state"), "online")
            self._send(make_event(stream_id, "status", ts=self.streams[stream_id].extra.get("last_ts"),
                                  state=state_name, reason=command.replace("set_", "") + "_changed"))
        if command == "set_zones":
            return {"stream": args["stream"], "zones": len(args["zones"]), "lines": len(args["lines"])}
        return {"rules": len(args["rules"])}

    def _serve_control(self, control, replies) -> None:
        self._finish_encodings(replies)
        while True:
            try:
                request = control.get_nowait()
            except queue.Empty:
                return
            except (OSError, EOFError, ValueError):  # the supervisor's end of the queue is gone
                return
            try:
                request_id, command, args = request
                if command == "set_prompt":
                    stream_id, prompt = args["stream"], args["prompt"]
                    if stream_id not in self.streams:
                        raise KeyError(f"no stream {stream_id!r}")
                    number = self._prompt_asked[stream_id] = self._prompt_asked.get(stream_id, 0) + 1
                    if self.detector_prompt(stream_id, prompt) in self.encodings:
                        reply = self._apply_prompt(stream_id, prompt, number)
                    else:
                        job = self._encoder.submit(self.detector.encode, self.detector_prompt(stream_id, prompt))
                        self._encoding_jobs.append((job, request_id, stream_id, prompt, time.perf_counter(), number))
                        continue
                elif command in ("set_zones", "set_rules"):
                    reply = {"ok": True, **self.set_alerting(command, args)}
                else:
                    reply = {"ok": False, "error": f"unknown worker command {command!r}"}
            except Exception as exc:  # a bad request must not kill the worker
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                request_id = request[0] if isinstance(request, tuple) and request else None
            replies.put((request_id, reply))

    def _finish_encodings(self, replies) -> None:
        """Switch the streams whose new prompt the encoder thread has finished; answer their requests."""
        waiting = []
        for job in self._encoding_jobs:
            future, request_id, stream_id, prompt, started, number = job
            if not future.done():
                waiting.append(job)
                continue
            try:
                encoding = future.result()
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                replies.put((request_id, {"ok": False, "error": f"cannot use the prompt: {reason}"}))
                continue
            self.encodings[self.detector_prompt(stream_id, prompt)] = encoding
            reply = self._apply_prompt(stream_id, prompt, number)
            reply["encode_ms"] = round((time.perf_counter() - started) * 1000, 2)
            replies.put((request_id, reply))
        self._encoding_jobs = waiting

    def _apply_prompt(self, stream_id: str, prompt: str, number: int) -> dict:
        """The reply to prompt change `number` of a stream, applied unless a later change already was."""
        if number < self._prompt_applied.get(stream_id, 0):
            return {"ok": False, "error": f"superseded: a later prompt change of stream {stream_id!r} is in force "
                                          f"({self.streams[stream_id].prompt!r})"}
        self._prompt_applied[stream_id] = number
        return {"ok": True, **self.set_prompt(stream_id, prompt)}


def worker_main(*, streams: list[StreamConfig], mailbox_specs: dict[str, dict], stats_spec: dict,
                events_endpoint: str, model: ModelConfig, tracker: TrackerConfig, batch_size: int, stop,
                control, replies, ready, parent_pid: int, oom_recover_seconds: float = 60.0,
                detect_stamp=None, preview=None,
                open_tracks_spec: dict | None = None, alerts: dict | None = None,
                redactions: dict | None = None) -> None:
    """Entry point of the inference worker process (spawned by the supervisor). `streams` carry their current
    prompts (a restarted worker starts with the prompts set since start-up)."""
    child_setup("worker", parent_pid)
    sender = EventSender(events_endpoint)
    stats = StreamStats.attach(stats_spec)
    mailboxes = {stream_id: FrameMailbox.attach(spec) for stream_id, spec in mailbox_specs.items()}
    started = time.perf_counter()
    try:
        detector = with_injected_faults(build_detector(model))
    except Exception as exc:
        log.error("cannot load the model: %s", exc)
        for stream in streams:
            sender.send(make_event(stream.id, "error", message=f"cannot load the model: {exc}",
                                   error_type="model_load_failed", fatal=True))
        sender.close()
        sys.exit(EXIT_FATAL)
    import tracker as tracker_package

    tracker_package.warm_up()
    open_tracks = OpenTracks.attach(open_tracks_spec) if open_tracks_spec else None
    worker = InferenceWorker(detector=detector, streams=streams, mailboxes=mailboxes, stats=stats, sender=sender,
                             tracker_factory=lambda: build_tracker(tracker), batch_size=batch_size,
                             oom_recover_seconds=oom_recover_seconds,
                             watchdog=DetectorWatchdog(detect_stamp) if detect_stamp is not None else None,
                             previews=build_preview_encoder(preview), open_tracks=open_tracks,
                             alerts={s: build_stream_alerts(**a) for s, a in (alerts or {}).items()},
                             redactions=build_redactions(redactions, sender))
    worker.end_predecessor_tracks()
    worker.prepare_prompts()
    log.info("model ready in %.1f s", time.perf_counter() - started)
    ready.set()
    worker.run(stop, control, replies)
    sender.close()
