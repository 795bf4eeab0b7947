"""The stages as Ray actors: a decoder per stream, detector actors that batch frames across their streams.

Both wrap the single-machine building blocks instead of copying them: `DecoderActor` runs a
`streamer.decoder.Decoder` in a thread, writing into a `FrameMailbox` of its own node, and hands the freshest (live)
or next (file) frames out through Ray's object store; `DetectorActor` runs an `InferenceWorker` (detector, one
tracker per stream, alerts, the event builders) on frames it is handed. Neither talks to the hub: the events they
make are returned to the driver (`streamer.cluster.runner`), which forwards them, so every event leaves the daemon
through the one hub and a call either delivers all its events or none (a detector lost mid-call delivers nothing,
and its frames are handed to a survivor: no frame of a file is lost or repeated).

Ray pickles what crosses between actors; the cluster is one trusted network (docs/cluster.md). Nothing here
reads a socket of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.config import LiveConfig, ModelConfig, StreamConfig
from streamer.frames import Frame, FrameMailbox
from tracker.config import TrackerConfig

log = logging.getLogger("groundwatch.cluster")

# Columns each stage owns in the supervisor's StreamStats (see streamer.stats); the driver copies them there.
DECODER_COUNTERS = ("frames_decoded", "decode_errors", "reconnects")
DECODER_GAUGES = ("state", "decoder_events_dropped", "frames_dropped", "last_frame_wall")
WORKER_COUNTERS = ("frames_processed", "detections", "track_events", "prompt_changes")
WORKER_GAUGES = ("inference_ms", "latency_ms", "worker_events_dropped", "worker_finished", "last_track_id", "state")


def placement() -> dict:
    """Where the calling actor runs: Ray node id, host name, address, pid."""
    import ray

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "host": socket.gethostname(),
            "address": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "actor_id": context.get_actor_id()}


class LocalStats:
    """`StreamStats`'s methods over plain dicts, inside an actor: what a stage counts between two calls is
    handed back (`drain`) and added to the supervisor's shared counters by the driver."""

    def __init__(self, stream_ids=()) -> None:
        self.values: dict[str, dict[str, float]] = {s: {} for s in stream_ids}
        self.deltas: dict[str, dict[str, float]] = {s: {} for s in stream_ids}

    @property
    def stream_ids(self) -> list[str]:
        return list(self.values)

    @property
    def row_of(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.values)}

    def forget(self, stream: str) -> None:
        self.values.pop(stream, None)
        self.deltas.pop(stream, None)

    def get(self, stream: str, column: str) -> float:
        return self.values.get(stream, {}).get(column, 0.0)

    def set(self, stream: str, column: str, value: float) -> None:
        self.values.setdefault(stream, {})[column] = float(value)

    def add(self, stream: str, column: str, amount: float = 1.0) -> None:
        row = self.values.setdefault(stream, {})
        row[column] = row.get(column, 0.0) + amount
        delta = self.deltas.setdefault(stream, {})
        delta[column] = delta.get(column, 0.0) + amount

    def drain(self, counters, gauges) -> dict[str, dict]:
        """{stream: {"add": {column: delta}, "set": {column: value}}} since the last drain."""
        out = {}
        for stream, row in self.values.items():
            added = {c: v for c, v in self.deltas.get(stream, {}).items() if c in counters and v}
            latest = {c: row[c] for c in gauges if c in row}
            out[stream] = {"add": added, "set": latest}
            self.deltas[stream] = {}
        return out


class EventBuffer:
    """The `EventSender` methods, collecting events for the next reply instead of pushing them to the hub."""

    def __init__(self, limit: int = 100_000) -> None:
        self.events: list[dict] = []
        self.limit, self.dropped = limit, 0

    def send(self, event: dict) -> bool:
        if len(self.events) >= self.limit:
            self.dropped += 1
            return False
        self.events.append(event)
        return True

    def send_frames(self, frames) -> bool:  # previews: not carried across the cluster
        return True

    def drain(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        pass


class DecoderActor:
    """One stream's decoder (`ray.remote(num_cpus=..., resources=stream.resources)` by the driver).

    `start(first_frame)` starts decoding in a thread (called again after Ray restarts the actor: a file goes on
    from the first frame not yet processed). `take` returns the frames decoded since, as object-store refs.
    """

    def __init__(self, stream: StreamConfig, live: LiveConfig, video_directory: str | None, slots: int) -> None:
        self.stream, self.live, self.video_directory = stream, live, video_directory
        self.stats = LocalStats([stream.id])
        self.sender = EventBuffer()
        self.stop = threading.Event()
        self.mailbox = FrameMailbox.create(f"{stream.id}-ray-{uuid.uuid4().hex[:8]}", slots, stream.max_width,
                                           stream.max_height, threading.Lock())
        self.thread: threading.Thread | None = None
        self.decoder = None
        # The last `take`'s frames: Ray reads their pixels straight from the mailbox slots into the object store
        # as that call returns, so the slots are freed at the next call (actor calls run one after another).
        self.handed: list[Frame] = []

    def _release_handed(self) -> None:
        for frame in self.handed:
            self.mailbox.release(frame)
        self.handed = []

    def where(self) -> dict:
        return placement()

    def start(self, first_frame: int = 0) -> dict:
        from streamer.decoder import Decoder

        if self.thread is not None:  # decode again from `first_frame` (frames handed out were lost)
            self.stop.set()
            self.thread.join(10)
            self.stop = threading.Event()
            self.sender.drain()  # its "offline, shutdown" is not what happened to the stream
            self._release_handed()
            self.mailbox.reset()
        live = self.live
        self.decoder = Decoder(
            stream_id=self.stream.id, url=self.stream.url, live=self.stream.is_live, fps=self.stream.fps,
            max_width=self.stream.max_width, max_height=self.stream.max_height, mailbox=self.mailbox,
            stats=self.stats, sender=self.sender, stop=self.stop, open_timeout=live.open_timeout_seconds,
            read_timeout=live.read_timeout_seconds, reconnect_initial=live.reconnect_initial_seconds,
            reconnect_max=live.reconnect_max_seconds,
            video_directory=Path(self.video_directory) if self.video_directory else None,
            segment_seconds=live.segment_seconds, loop=self.stream.loop, realtime=self.stream.realtime,
            first_frame=first_frame)
        self.thread = threading.Thread(target=self.decoder.run, name=f"decoder-{self.stream.id}", daemon=True)
        self.thread.start()
        return placement()

    def take(self, limit: int, wait_seconds: float = 0.05) -> tuple[dict, list]:
        """Up to `limit` frames (live: only the newest), waiting at most `wait_seconds` for the first.

        Called with `num_returns=2`: (what the driver reads: each frame's index, times and its `position` in the
        pixels, the events, the counters, the end; what only the detector reads: the frames' pixels, a list of
        (H, W, 3) uint8 RGB arrays). Ray stores the pixels as one object of the node's object store per call, owned
        by the driver (the caller), which hands its ref on without reading it; the detector reads it zero-copy.
        One object per call instead of one `ray.put` per frame: fewer objects to create, count and free, and no
        refs owned here that the driver and the detector would have to borrow (each borrow is a round of messages
        with this actor). Ray copies the pixels from the mailbox slots into the store once, as the call returns;
        the slots are freed at the next call."""
        self._release_handed()  # the previous call's pixels are in the store by now
        deadline = time.monotonic() + wait_seconds
        live = self.stream.is_live
        frames: list[Frame] = []
        while True:
            frames = self.mailbox.take(live, limit=limit)
            if frames or time.monotonic() >= deadline or self.mailbox.finished:
                break
            time.sleep(0.002)
        self.handed = frames
        out = []
        for position, frame in enumerate(frames):
            out.append({"frame_index": frame.frame_index, "seq": frame.seq, "pts": frame.pts, "ts": frame.ts,
                        "decoded_at": frame.decoded_at, "position": position, "size": frame.pixels.shape[1::-1]})
        self.stats.set(self.stream.id, "frames_dropped", self.mailbox.dropped)
        finished = self.mailbox.finished and not self.mailbox.pending()
        return ({"frames": out, "events": self.sender.drain(),
                 "stats": self.stats.drain(DECODER_COUNTERS, DECODER_GAUGES).get(self.stream.id, {}),
                 "finished": finished, "end_reason": self.mailbox.end_reason if finished else None},
                [frame.pixels for frame in frames])  # (H, W, 3) uint8 RGB views of the slots, each

    def close(self) -> dict:
        """Stop decoding; the events of the stop (offline, shutdown) are returned."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        events = self.sender.drain()
        self._release_handed()
        self.mailbox.close()
        self.mailbox.unlink()
        return {"events": events}

    def __del__(self) -> None:  # a mailbox left by an actor killed at exit is removed by the next daemon too
        try:
            self.mailbox.unlink()
        except Exception:
            pass


class _HandedFrames:
    """The mailbox side an `InferenceWorker` sees for a stream whose frames arrive through the object store:
    nothing to free, and the end of the stream is told by the driver (`DetectorActor.finish`)."""

    def __init__(self) -> None:
        self.finished, self.end_reason, self.dropped = False, "unknown", 0

    def release(self, frame: Frame) -> None:
        pass

    def take(self, live: bool, limit: int = 1) -> list:
        return []

    def pending(self) -> int:
        return 0


@dataclass
class Handover:
    """A stream's tracking state moved between two live detector actors (a rebalance): its tracks go on."""

    tracker: Any
    id_base: int
    extra: dict = field(default_factory=dict)
    alerts: Any = None


class DetectorActor:
    """A detector (one per GPU, or per CPU slot), batching the frames of the streams assigned to it, with one
    cached text encoding per prompt and one tracker per stream (`InferenceWorker`, as on one machine)."""

    def __init__(self, model: ModelConfig, tracker: TrackerConfig, batch_size: int,
                 oom_recover_seconds: float = 60.0) -> None:
        import tracker as tracker_package

        from streamer.inference import InferenceWorker, build_detector, build_tracker
        from streamer.watchdog import with_injected_faults

        detector = with_injected_faults(build_detector(model))
        tracker_package.warm_up()
        self.stats = LocalStats()
        self.sender = EventBuffer()
        self.worker = InferenceWorker(detector=detector, streams=[], mailboxes={}, stats=self.stats,
                                      sender=self.sender, tracker_factory=lambda: build_tracker(tracker),
                                      batch_size=batch_size, oom_recover_seconds=oom_recover_seconds)
        self.calls = 0

    def where(self) -> dict:
        return {**placement(), "streams": sorted(self.worker.streams), "calls": self.calls}

    def _reply(self, **fields) -> dict:
        return {"events": self.sender.drain(), "stats": self.stats.drain(WORKER_COUNTERS, WORKER_GAUGES), **fields}

    def adopt(self, stream: StreamConfig, id_base: int, state_code: float, alert_args: dict | None = None,
              handover: Handover | None = None) -> dict:
        """Serve `stream` from now on (its current prompt in `stream.prompt`). Track ids go on from `id_base`;
        with a `handover` the stream's tracker comes along and its tracks go on."""
        from streamer.alerts import build_stream_alerts
        from streamer.inference import StreamState

        state = StreamState(stream.id, stream.is_live, _HandedFrames(), stream.prompt,
                            handover.tracker if handover else self.worker.tracker_factory())
        state.id_base = handover.id_base if handover else id_base
        if handover:
            state.extra.update(handover.extra)
        self.stats.set(stream.id, "state", state_code)
        self.stats.set(stream.id, "last_track_id", id_base)
        self.worker.streams[stream.id] = state
        if handover is not None and handover.alerts is not None:
            self.worker.alerts[stream.id] = handover.alerts
        elif alert_args is not None:
            self.worker.alerts[stream.id] = build_stream_alerts(**alert_args)
        try:
            self.worker.encoding_for(stream.prompt)
            state.prompt_error = None
        except Exception as exc:
            self.worker._prompt_failed(state, str(exc) if isinstance(exc, ValueError)
                                       else f"{type(exc).__name__}: {exc}")
        return self._reply(**placement())

    def release(self, stream_id: str, hand_over: bool = True) -> dict:
        """Stop serving a stream (a rebalance): its tracking state is returned for the next actor."""
        import pickle

        state = self.worker.streams.pop(stream_id, None)
        alerts = self.worker.alerts.pop(stream_id, None)
        handover = None
        if state is not None and hand_over:
            handover = Handover(state.tracker, state.id_base, dict(state.extra), alerts)
            try:
                pickle.dumps(handover)
            except Exception:  # something of the state does not travel: its tracks end here instead
                handover = None
        if state is not None and handover is None:
            self.worker._emit_track_events(state, state.tracker.finish(), ts=None, reason="rebalanced")
        reply = self._reply(handover=handover, stream=stream_id)
        self.stats.forget(stream_id)
        return reply

    def process(self, items: list[dict], state_codes: dict[str, float] | None = None) -> dict:
        """Detect and track on frames of the streams this actor serves. `items`: {"stream", "frame_index",
        "seq", "pts", "ts", "decoded_at", "pixels" (the ref of a decoder's `take` pixels: a list of (H, W, 3) uint8
        RGB), "position" (the frame's place in that list)}, each stream's in order. Frames whose pixels are gone
        (their decoder's node died) are returned in `lost`."""
        import ray

        self.calls += 1
        for stream_id, code in (state_codes or {}).items():
            if stream_id in self.worker.streams:
                self.stats.set(stream_id, "state", code)
        batch, lost, unserved = [], [], []
        fetched: dict[Any, list | None] = {}  # a take's pixels ref -> its frames' pixels (None: gone)
        for item in items:
            state = self.worker.streams.get(item["stream"])
            if state is None:  # not served here (any more): the driver hands the frame to the stream's actor
                unserved.append((item["stream"], item["frame_index"]))
                continue
            ref = item["pixels"]
            if ref not in fetched:  # the frames of one take are one object: read once
                try:
                    fetched[ref] = ray.get(ref, timeout=30)  # zero-copy views into the object store
                except (ray.exceptions.ObjectLostError, ray.exceptions.GetTimeoutError,
                        ray.exceptions.OwnerDiedError):
                    fetched[ref] = None
            if fetched[ref] is None:
                lost.append((item["stream"], item["frame_index"]))
                continue
            if state.prompt_error is not None:
                continue  # nothing to look for: the frame is skipped, the stream goes on (as on one machine)
            pixels = fetched[ref][item["position"]]  # (H, W, 3) uint8 RGB
            batch.append((state, Frame(-1, item["seq"], item["frame_index"], item["pts"], item["ts"],
                                       item["decoded_at"], pixels)))
        if batch:
            self.worker.process(batch)
        for state in self.worker.streams.values():
            self.worker._tick_alerts(state)
        return self._reply(lost=lost, unserved=unserved)

    def finish(self, stream_id: str, end_reason: str) -> dict:
        """The stream's decoder finished and every frame was processed: end its tracks, as on one machine."""
        state = self.worker.streams.get(stream_id)
        if state is not None and not state.finished:
            state.mailbox.finished, state.mailbox.end_reason = True, end_reason
            self.worker.finish_streams()
        return self._reply()

    def shutdown_streams(self, stream_ids: list[str]) -> dict:
        """The daemon stops: end the open tracks of the streams this actor serves (`reason: shutdown`)."""
        for state in [self.worker.streams[s] for s in stream_ids if s in self.worker.streams]:
            if not state.finished:
                self.worker._emit_track_events(state, state.tracker.finish(), ts=None, reason="shutdown")
                self.worker._tick_alerts(state, finished=True)
        return self._reply()

    def command(self, command: str, args: dict) -> dict:
        """set_prompt / set_zones / set_rules for the streams this actor serves (the answer, and the events)."""
        try:
            if command == "set_prompt":
                answer = {"ok": True, **self.worker.set_prompt(args["stream"], args["prompt"])}
            elif command in ("set_zones", "set_rules"):
                if command == "set_zones" and args["stream"] not in self.worker.alerts:
                    answer = {"ok": True}
                else:
                    answer = {"ok": True, **self.worker.set_alerting(command, args)}
            else:
                answer = {"ok": False, "error": f"unknown worker command {command!r}"}
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            answer = {"ok": False, "error": f"cannot use the prompt: {reason}" if command == "set_prompt"
                      else reason}
        return self._reply(answer=answer)

