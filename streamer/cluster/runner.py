"""The Ray driver: the supervisor's child that runs the stages as actors on a Ray cluster (docs/cluster.md).

It takes the inference worker's place in the supervisor (same stop flag, control queues, shared counters and
event socket), so the supervisor, the hub, the control socket, Prometheus, recordings and every client work as
on one machine. Here:

- one `DecoderActor` per stream, placed by the stream's `resources` (Ray puts it on a node that has them);
- `cluster.detectors` `DetectorActor`s (GPUs or CPU slots), spread over the nodes;
- a loop that moves object refs, never pixels: a decoder's `take` returns its frames' pixels as one object in its
  node's object store (owned by the driver, never read by it), the driver hands the ref to the stream's detector
  actor (`assignment.assign`: by load), whose reply carries the events, which the driver forwards to the hub (so
  every event still leaves through the one PUB endpoint);
- faults: Ray restarts dead actors (`max_restarts`, on another node when their own is gone); what Ray does not do
  is coded here: a lost detector's streams move to the survivors at once (their open tracks end with
  `reason: worker_lost`, a `status` event says so, a file's frames it held are handed to the survivor: none lost
  or repeated), a restarted detector gets streams back (`assignment.rebalance`, tracks handed over), a restarted
  decoder of a file goes on from the first frame not yet processed, a stream whose resources no node has is
  `offline` with the reason until a node with them joins.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.cluster.assignment import assign, rebalance, stream_load
from streamer.config import ClusterConfig, LiveConfig, ModelConfig, StreamConfig
from streamer.events import make_event
from streamer.process import EXIT_FATAL, EventSender, child_setup
from streamer.stats import STATE_CODES, STATE_NAMES, StreamStats
from tracker.config import TrackerConfig

log = logging.getLogger("groundwatch.cluster")

MAX_CALLS_IN_FLIGHT = 2  # per detector actor: one running, one waiting, so the actor never idles on the driver
# A decoder's call waits this long for a frame: it answers as soon as one is there, so a longer wait costs no
# latency, only fewer empty round trips (a live camera between two frames).
TAKE_WAIT_SECONDS = 0.2


class ClusterError(RuntimeError):
    """The Ray cluster cannot be used (unreachable, refused); the message says why."""


def address_endpoint(address: str) -> tuple[str, int] | None:
    """host, port of a cluster address ('host:port' or 'ray://host:port'); None for 'auto'."""
    if address == "auto":
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"cluster.address {address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float) -> None:
    """A TCP connection to the cluster's address within `timeout` (the supervisor checks this before it starts
    anything, so a wrong address is a clear error at once, never a hang)."""
    endpoint = address_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({reason}, cluster.connect_timeout_seconds "
                           f"= {timeout:g}); is `ray start --head` running there?") from None


def connect(cluster: ClusterConfig):
    """`ray.init` on the cluster, given up after `connect_timeout_seconds` (Ray retries for minutes)."""
    import ray

    outcome: dict[str, Any] = {}

    def init() -> None:
        try:
            ray.init(address=cluster.address, namespace=cluster.namespace, logging_level="WARNING",
                     log_to_driver=False, configure_logging=False)
            outcome["ok"] = True
        except Exception as exc:  # reported below, whatever Ray raised
            outcome["error"] = exc

    thread = threading.Thread(target=init, name="ray-connect", daemon=True)
    thread.start()
    thread.join(cluster.connect_timeout_seconds)
    if "ok" in outcome:
        return ray
    if "error" in outcome:
        raise ClusterError(f"cannot connect to the Ray cluster at {cluster.address}: {outcome['error']}"
                           f"{_token_hint()}")
    raise ClusterError(f"cannot connect to the Ray cluster at {cluster.address} within "
                       f"{cluster.connect_timeout_seconds:g} s (cluster.connect_timeout_seconds){_token_hint()}")


def _token_hint() -> str:
    """Ray (2.60) sends its cluster token from a driver given an explicit address only when RAY_AUTH_MODE=token
    is set: without it a cluster with token auth refuses the driver ("Missing authorization header" in its GCS
    log) and ray.init waits until the timeout."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; if the cluster uses token auth (on by default in Ray 2.60), run with RAY_AUTH_MODE=token and its "
            "token in RAY_AUTH_TOKEN or ~/.ray/auth_token (docs/cluster.md)")


@dataclass
class StreamSlot:
    config: StreamConfig  # with the current prompt
    resources: dict
    decoder: Any = None
    decoder_state: str = "pending"  # pending, starting, running, lost, offline, finished
    decoder_node: dict = field(default_factory=dict)
    decoder_call: Any = None  # the ref of start/take/where in flight (of a take: what the driver reads)
    take_pixels: Any = None  # the ref of the pixels of the take in flight (handed on, never read here)
    decoder_lost_at: float = 0.0
    queue: deque = field(default_factory=deque)  # frames taken, not yet handed to a detector
    in_flight: int = 0  # frames in detector calls
    completed: int = -1  # highest frame index whose events are out
    end_reason: str | None = None  # set when the decoder finished
    done: bool = False
    actor: str | None = None  # the detector actor serving the stream
    open_tracks: dict = field(default_factory=dict)  # track id -> its last event (to end it when its actor is lost)
    dropped: int = 0  # live frames the driver dropped (stale, or held by a lost detector)
    decoder_dropped: float = 0.0
    size: tuple[int, int] = (0, 0)
    offline_reason: str | None = None
    moving_from: str | None = None  # while handed over between two live actors


@dataclass
class DetectorSlot:
    name: str
    handle: Any
    state: str = "starting"  # starting, ready, lost, dead
    calls: list = field(default_factory=list)  # (ref, kind, items, streams)
    node: dict = field(default_factory=dict)
    probe: Any = None  # where() while starting or restarting
    lost_at: float = 0.0
    created_at: float = field(default_factory=time.monotonic)
    restarts: int = 0


class ClusterDriver:
    def __init__(self, *, ray, streams: list[StreamConfig], cluster: ClusterConfig, model: ModelConfig,
                 tracker: TrackerConfig, live: LiveConfig, batch_size: int, stats, sender,
                 video_directories: dict[str, str | None], alerts: dict[str, dict] | None = None,
                 placement_path: str | None = None, run_name: str = "groundwatch", ready=None) -> None:
        self.ready = ready  # set once a detector actor has loaded the model (the supervisor's worker_ready)
        self.ray, self.cluster, self.model, self.tracker, self.live = ray, cluster, model, tracker, live
        self.batch_size, self.stats, self.sender = batch_size, stats, sender
        self.video_directories, self.alert_args = video_directories, dict(alerts or {})
        self.placement_path, self.run_name = placement_path, run_name
        self.streams = {s.id: StreamSlot(s, dict(s.resources)) for s in streams}
        self.detectors: dict[str, DetectorSlot] = {}
        self.pending_commands: list = []  # (ref, actor, request_id, command, args) awaiting actor answers
        self._last_placement = None
        self._next_housekeeping = 0.0
        self._started_at = time.monotonic()
        self._assigning = False

    # -- actors ----------------------------------------------------------------------------------------------

    def _actor_options(self, name: str, **resources) -> dict:
        return dict(name=f"{self.run_name}-{name}", namespace=self.cluster.namespace,
                    max_restarts=self.cluster.max_restarts, max_task_retries=0, lifetime=None, **resources)

    def detector_count(self) -> int:
        if self.cluster.detectors:
            return self.cluster.detectors
        total = self.ray.cluster_resources()
        if self.cluster.detector_gpus > 0:
            count = int(total.get("GPU", 0) // self.cluster.detector_gpus)
        else:
            spare = total.get("CPU", 0) - self.cluster.decoder_cpus * len(self.streams)
            count = int(spare // self.cluster.detector_cpus)
        return max(1, min(count, len(self.streams)))

    def start(self) -> None:
        from streamer.cluster.actors import DecoderActor, DetectorActor

        self._decoder_class = self.ray.remote(DecoderActor)
        detector_class = self.ray.remote(DetectorActor)
        for index in range(self.detector_count()):
            name = f"detector-{index}"
            options = self._actor_options(name, num_cpus=self.cluster.detector_cpus,
                                          num_gpus=self.cluster.detector_gpus,
                                          resources=dict(self.cluster.detector_resources) or None,
                                          scheduling_strategy="SPREAD")
            handle = detector_class.options(**options).remote(self.model, self.tracker, self.batch_size,
                                                              self.model.oom_recover_seconds)
            slot = DetectorSlot(name, handle)
            slot.probe = handle.where.remote()
            self.detectors[name] = slot
        for stream in self.streams.values():
            self._start_decoder(stream)

    def _feasible(self, resources: dict) -> str | None:
        """Why no alive node can ever run an actor needing `resources` (None: some node can)."""
        if not resources:
            return None
        for node in self.ray.nodes():
            if node.get("Alive") and all(node["Resources"].get(k, 0) >= v for k, v in resources.items()):
                return None
        wanted = ", ".join(f"{k} = {v:g}" for k, v in resources.items())
        return f"no node of the cluster has the resources {{{wanted}}}"

    def _start_decoder(self, stream: StreamSlot) -> None:
        reason = self._feasible({**stream.resources, "CPU": self.cluster.decoder_cpus})
        if reason is not None:
            if stream.offline_reason != reason:
                stream.offline_reason = reason
                log.error("%s: %s; the stream waits for one", stream.config.id, reason)
                self._send(make_event(stream.config.id, "error", message=f"cannot place the decoder: {reason}",
                                      error_type="unplaceable", fatal=False, resources=stream.resources))
                self._send(make_event(stream.config.id, "status", state="offline", reason="unplaceable",
                                      source=self._source(stream), detail=reason))
                self.stats.set(stream.config.id, "state", STATE_CODES["offline"])
            stream.decoder_state = "offline"
            return
        stream.offline_reason = None
        # A file's: a take's worth (up to two batches) held until Ray has stored it, and room to decode ahead.
        slots = 3 if stream.config.is_live else self.batch_size * 2 + 2
        options = self._actor_options(f"decoder-{stream.config.id}", num_cpus=self.cluster.decoder_cpus,
                                      resources=stream.resources or None)
        stream.decoder = self._decoder_class.options(**options).remote(
            stream.config, self.live, self.video_directories.get(stream.config.id), slots)
        stream.decoder_state = "starting"
        stream.decoder_call = stream.decoder.start.remote(stream.completed + 1)

    @staticmethod
    def _source(stream: StreamSlot) -> str:
        return "live" if stream.config.is_live else "file"

    # -- events and counters ---------------------------------------------------------------------------------

    def _send(self, event: dict) -> None:
        if not self.sender.send(event):
            self.stats.set(event["stream"], "worker_events_dropped", self.sender.dropped)

    def _forward(self, events: list[dict]) -> None:
        for event in events:
            stream = self.streams.get(event.get("stream"))
            if stream is not None and event.get("kind") == "track":
                if event.get("event") == "ended":
                    stream.open_tracks.pop(event.get("track_id"), None)
                else:
                    stream.open_tracks[event.get("track_id")] = event
            self._send(event)

    def _apply_stats(self, stream_id: str, figures: dict) -> None:
        if stream_id not in self.streams:
            return
        for column, delta in figures.get("add", {}).items():
            self.stats.add(stream_id, column, delta)
        for column, value in figures.get("set", {}).items():
            if column == "last_track_id" and value <= self.stats.get(stream_id, column):
                continue
            if column == "state":
                continue  # the decoder owns the stream's state
            if column == "frames_dropped":
                self.streams[stream_id].decoder_dropped = value
                value += self.streams[stream_id].dropped
            self.stats.set(stream_id, column, value)

    def _apply_reply(self, reply: dict) -> None:
        self._forward(reply.get("events", []))
        for stream_id, figures in reply.get("stats", {}).items():
            self._apply_stats(stream_id, figures)

    def _drop_live(self, stream: StreamSlot, count: int) -> None:
        if count:
            stream.dropped += count
            self.stats.set(stream.config.id, "frames_dropped", stream.decoder_dropped + stream.dropped)

    # -- the loop --------------------------------------------------------------------------------------------

    def _submit_takes(self) -> None:
        for stream in self.streams.values():
            if stream.decoder_state != "running" or stream.decoder_call is not None:
                continue
            live = stream.config.is_live
            if not live and len(stream.queue) > self.batch_size:
                # Back-pressure: the decoder waits in its own mailbox. A file is asked again only once at most a
                # batch waits here, so each call hands out a batch or more: fewer actor calls per frame (each
                # costs the driver, the decoder and the detector's node more CPU than the frame's bytes do).
                continue
            limit = 1 if live else self.batch_size * 2 - len(stream.queue)
            # Two returns: the frames' indices and times (read here), their pixels (one object, handed on).
            stream.decoder_call, stream.take_pixels = stream.decoder.take.options(num_returns=2).remote(
                limit, TAKE_WAIT_SECONDS)

    def _dispatch(self) -> None:
        serving: dict[str, list[StreamSlot]] = {}
        for stream in self.streams.values():
            if stream.actor in self.detectors and stream.queue:
                serving.setdefault(stream.actor, []).append(stream)
        for name, streams in serving.items():
            detector = self.detectors[name]
            if detector.state != "ready" or len(detector.calls) >= MAX_CALLS_IN_FLIGHT:
                continue
            items = []
            per_stream = max(1, -(-self.batch_size // len(streams)))
            for stream in sorted(streams, key=lambda s: s.queue[0]["decoded_at"]):  # the longest waiting first
                room = min(per_stream, self.batch_size - len(items))
                while room > 0 and stream.queue:
                    items.append(stream.queue.popleft())
                    stream.in_flight += 1
                    room -= 1
            for stream in streams:  # leftover room to whoever has more frames waiting (files)
                while len(items) < self.batch_size and stream.queue:
                    items.append(stream.queue.popleft())
                    stream.in_flight += 1
            codes = {s.config.id: self.stats.get(s.config.id, "state") for s in streams}
            ref = detector.handle.process.remote(items, codes)
            detector.calls.append((ref, "process", items, time.monotonic()))

    def _refs(self) -> dict:
        refs = {}
        for stream in self.streams.values():
            if stream.decoder_call is not None:
                refs[stream.decoder_call] = ("decoder", stream)
        for detector in self.detectors.values():
            if detector.probe is not None:
                refs[detector.probe] = ("probe", detector)
            for call in detector.calls:
                refs[call[0]] = ("call", detector, call)
        for entry in self.pending_commands:
            refs[entry[0]] = ("command", entry)
        return refs

    def step(self, timeout: float = 0.05) -> int:
        """One round: ask decoders for frames, hand frames to detectors, take in what came back."""
        self._submit_takes()
        self._dispatch()
        refs = self._refs()
        if not refs:
            time.sleep(timeout)
            return 0
        # fetch_local=False: the driver reads only small replies; nothing is to be pulled to its node to wait.
        ready, _ = self.ray.wait(list(refs), num_returns=1, timeout=timeout, fetch_local=False)
        if ready:
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0, fetch_local=False)
        for ref in ready:
            entry = refs[ref]
            if entry[0] == "decoder":
                self._on_decoder_reply(entry[1], ref)
            elif entry[0] == "probe":
                self._on_probe(entry[1], ref)
            elif entry[0] == "call":
                self._on_call(entry[1], entry[2], ref)
            else:
                self._on_command(entry[1], ref)
        self._finish_streams()
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + 1.0
            self._housekeeping()
        return len(ready)

    # -- replies ---------------------------------------------------------------------------------------------

    def _on_decoder_reply(self, stream: StreamSlot, ref) -> None:
        ray = self.ray
        pixels, stream.decoder_call, stream.take_pixels = stream.take_pixels, None, None
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._decoder_lost(stream, exc)
            return
        except ray.exceptions.RayError as exc:
            log.error("%s: decoder call failed: %s", stream.config.id, exc)
            return
        if "node_id" in reply:  # start() or where(): the decoder runs
            stream.decoder_node = reply
            if stream.decoder_state in ("starting", "lost"):
                stream.decoder_state = "running"
                log.info("%s: decoder on node %s (%s)", stream.config.id, reply["node_id"][:12], reply["host"])
            return
        if stream.decoder_state == "lost":
            return  # frames of a decoder being restarted: decoded again from the first frame not processed
        self._forward(reply["events"])
        self._apply_stats(stream.config.id, {"add": reply["stats"].get("add", {}),
                                             "set": reply["stats"].get("set", {})})
        state = reply["stats"].get("set", {}).get("state")
        if state is not None:
            self.stats.set(stream.config.id, "state", state)
        frames = reply["frames"]
        for frame in frames:
            frame["stream"], frame["pixels"] = stream.config.id, pixels
            stream.size = frame.pop("size")
        if stream.config.is_live and frames:
            self._drop_live(stream, len(stream.queue))  # only the freshest frame of a live stream waits
            stream.queue.clear()
            stream.queue.append(frames[-1])
        else:
            stream.queue.extend(f for f in frames if f["frame_index"] > stream.completed)
        if reply["finished"]:
            stream.decoder_state = "finished"
            stream.end_reason = reply["end_reason"]

    def _decoder_lost(self, stream: StreamSlot, exc: Exception) -> None:
        """Ray restarts the decoder (where its resources are); here: restart the stream from its first frame
        not yet processed, once the frames it held are accounted for."""
        stream_id = stream.config.id
        if stream.decoder_state == "lost":
            return
        message = f"decoder on node {stream.decoder_node.get('node_id', '?')[:12]} lost ({type(exc).__name__}); " \
                  "Ray restarts it"
        log.error("%s: %s", stream_id, message)
        self._send(make_event(stream_id, "error", message=message, error_type="worker_lost", fatal=False,
                              process="decoder", node=stream.decoder_node.get("node_id")))
        stream.decoder_state, stream.decoder_lost_at = "lost", time.monotonic()
        if stream.config.is_live:
            self._drop_live(stream, len(stream.queue))
        stream.queue.clear()  # their pixels lived in the dead decoder's object store

    def _on_probe(self, detector: DetectorSlot, ref) -> None:
        ray = self.ray
        detector.probe = None
        try:
            detector.node = ray.get(ref)
        except ray.exceptions.ActorDiedError as exc:
            log.error("%s is gone for good: %s", detector.name, exc)
            detector.state = "dead"
            return
        except ray.exceptions.RayError as exc:
            if detector.state == "starting" and "model" in str(exc).lower():
                raise ClusterError(f"{detector.name} cannot load the model: {exc}") from None
            detector.probe = detector.handle.where.remote()  # still restarting: ask again
            return
        was_lost = detector.state == "lost"
        detector.state = "ready"
        if self.ready is not None:
            self.ready.set()
        log.info("%s ready on node %s (%s)", detector.name, detector.node["node_id"][:12], detector.node["host"])
        if was_lost:
            for stream_id in self.streams:
                self._send(make_event(stream_id, "status", state=self._state_name(stream_id),
                                      reason="worker_back", actor=detector.name, node=detector.node["node_id"]))
        if self._started_assigning():
            self._reassign(rebalance_now=was_lost or any(s.actor for s in self.streams.values()))

    STARTUP_GRACE_SECONDS = 20.0

    def _started_assigning(self) -> bool:
        """At start, streams are assigned once every detector actor is up (or after a grace period): assigning
        to the first one up and rebalancing moments later would hand every stream over at once."""
        if not self._assigning:
            self._assigning = all(d.state != "starting" for d in self.detectors.values()) or (
                time.monotonic() - self._started_at > self.STARTUP_GRACE_SECONDS
                and any(d.state == "ready" for d in self.detectors.values()))
        return self._assigning

    def _on_call(self, detector: DetectorSlot, call, ref) -> None:
        ray = self.ray
        if call not in detector.calls:
            return  # the actor was found lost meanwhile: these frames are accounted for (`_detector_lost`)
        detector.calls.remove(call)
        _, kind, items, _ = call
        for item in items:
            self.streams[item["stream"]].in_flight -= 1
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._detector_lost(detector, exc, [items])
            return
        except ray.exceptions.RayError as exc:  # the batch failed in the actor: its frames are skipped
            log.error("%s failed on a batch of %d frames: %s", detector.name, len(items), exc)
            for stream_id in {item["stream"] for item in items}:
                self._send(make_event(stream_id, "error", message=f"detector failed: {str(exc)[:500]}",
                                      error_type="inference_failed", fatal=False))
            self._mark_completed(items, [])
            return
        self._apply_reply(reply)
        if kind == "release":
            self._on_released(reply)
            return
        lost = {tuple(x) for x in reply.get("lost", [])}
        unserved = {tuple(x) for x in reply.get("unserved", [])}
        self._mark_completed(items, lost | unserved)
        self._requeue([[item for item in items if (item["stream"], item["frame_index"]) in unserved]])
        for stream_id, frame_index in sorted(lost):
            stream = self.streams[stream_id]
            if not stream.config.is_live:
                # Its pixels are gone with its decoder's node: decode it again from there.
                self._redecode(stream, frame_index)
            else:
                self._drop_live(stream, 1)

    def _mark_completed(self, items: list[dict], lost) -> None:
        for item in items:
            if (item["stream"], item["frame_index"]) in lost:
                continue
            stream = self.streams[item["stream"]]
            stream.completed = max(stream.completed, item["frame_index"])

    def _redecode(self, stream: StreamSlot, frame_index: int) -> None:
        if stream.decoder_state not in ("lost",):
            stream.decoder_state, stream.decoder_lost_at = "lost", time.monotonic()
            stream.queue.clear()

    def _detector_lost(self, detector: DetectorSlot, exc: Exception, failed_items: list[list[dict]]) -> None:
        """Move the lost actor's streams to the survivors now; Ray restarts the actor (max_restarts)."""
        if detector.state == "lost":
            held = [call[2] for call in detector.calls]
            self._requeue(failed_items + held)
            detector.calls = []
            return
        held = failed_items + [call[2] for call in detector.calls]
        for call in detector.calls:
            for item in call[2]:
                self.streams[item["stream"]].in_flight -= 1
        detector.calls = []
        detector.state, detector.lost_at, detector.restarts = "lost", time.monotonic(), detector.restarts + 1
        node = detector.node.get("node_id", "?")
        log.error("%s on node %s lost (%s: %s)", detector.name, node[:12], type(exc).__name__, str(exc)[:200])
        moved = [s for s in self.streams.values()
                 if s.actor == detector.name or (s.actor or "").startswith("moving:") and s.moving_from == detector.name]
        for stream in moved:
            self._end_open_tracks(stream, "worker_lost")
            stream.actor = None
        self._requeue(held)
        self._reassign()
        for stream in moved:
            target = self.detectors.get(stream.actor) if stream.actor else None
            where = (f"moved to {target.name} on node {target.node.get('node_id', '?')[:12]}" if target
                     else "no detector left: waiting for one")
            message = f"detector actor {detector.name} on node {node[:12]} lost ({type(exc).__name__}); {where}"
            self._send(make_event(stream.config.id, "error", message=message, error_type="worker_lost",
                                  fatal=False, process=detector.name, node=node))
            self._send(make_event(stream.config.id, "status", state=self._state_name(stream.config.id),
                                  reason="worker_lost", actor=detector.name, node=node,
                                  moved_to=target.name if target else None, detail=message))
        detector.probe = detector.handle.where.remote()  # answered once Ray has restarted it

    def _requeue(self, batches: list[list[dict]]) -> None:
        """Frames a lost actor held: a file's go back to the front of its queue, in order; a live stream's are
        stale by now (dropped, counted)."""
        by_stream: dict[str, list[dict]] = {}
        for items in batches:
            for item in items:
                by_stream.setdefault(item["stream"], []).append(item)
        for stream_id, items in by_stream.items():
            stream = self.streams[stream_id]
            if stream.config.is_live:
                self._drop_live(stream, len(items))
                continue
            if stream.decoder_state == "lost":
                continue  # decoded again from the first frame not processed
            for item in sorted(items, key=lambda i: i["frame_index"], reverse=True):
                if item["frame_index"] > stream.completed:
                    stream.queue.appendleft(item)

    def _end_open_tracks(self, stream: StreamSlot, reason: str) -> None:
        """End the tracks of a stream whose tracker was lost with its actor (the ids are never updated again)."""
        for track_id, last in sorted(stream.open_tracks.items()):
            self._send(make_event(stream.config.id, "track", ts=last.get("ts"), frame=last.get("frame"),
                                  event="ended", reason=reason, track_id=track_id, box=last.get("box"),
                                  score=last.get("score"), phrase=last.get("phrase"), age=last.get("age"),
                                  hits=last.get("hits")))
            self.stats.add(stream.config.id, "track_events")
        stream.open_tracks.clear()

    def _state_name(self, stream_id: str) -> str:
        return STATE_NAMES.get(self.stats.get(stream_id, "state"), "starting")

    def _loads(self) -> dict[str, float]:
        loads = {}
        for stream_id, stream in self.streams.items():
            if stream.done or stream.decoder_state == "offline":
                continue  # a stream that cannot run asks nothing of a detector
            width, height = stream.size if stream.size != (0, 0) else (stream.config.max_width,
                                                                        stream.config.max_height)
            loads[stream_id] = stream_load(stream.config.fps, width, height)
        return loads

    def _reassign(self, rebalance_now: bool = False) -> None:
        """Streams without an actor go to the least loaded ready one; with `rebalance_now` (an actor came back)
        streams move from the busiest actors to it, their tracking state handed over."""
        ready = [name for name, d in self.detectors.items() if d.state == "ready"]
        if not ready:
            return
        current = {}
        for stream_id, slot in self.streams.items():
            actor = (slot.actor or "").removeprefix("moving:")  # a stream being handed over counts at its target
            if actor in ready:
                current[stream_id] = actor
        loads = self._loads()
        placed = rebalance(loads, ready, current) if rebalance_now else assign(loads, ready, current)
        for stream_id, actor in placed.items():
            stream = self.streams[stream_id]
            if stream.actor == actor or (stream.actor or "").startswith("moving:"):
                continue
            if stream.actor is None:
                self._adopt(stream, actor, None)
            else:  # a move between two live actors: hand the tracker over
                source = self.detectors[stream.actor]
                # The stream's tracks end here (`reason: rebalanced`) and start again on its new actor.
                ref = source.handle.release.remote(stream_id, False)
                source.calls.append((ref, "release", [], time.monotonic()))
                stream.actor, stream.moving_from = f"moving:{actor}", source.name

    def _adopt(self, stream: StreamSlot, actor: str, handover) -> None:
        detector = self.detectors[actor]
        stream.actor, stream.moving_from = actor, None
        stream_id = stream.config.id
        ref = detector.handle.adopt.remote(stream.config, int(self.stats.get(stream_id, "last_track_id")),
                                           self.stats.get(stream_id, "state"), self.alert_args.get(stream_id),
                                           handover)
        detector.calls.append((ref, "adopt", [], time.monotonic()))
        log.info("%s served by %s on node %s", stream_id, actor, detector.node.get("node_id", "?")[:12])

    def _on_released(self, reply: dict) -> None:
        stream = self.streams.get(reply.get("stream"))
        if stream is None or not (stream.actor or "").startswith("moving:"):
            return
        target = stream.actor.split(":", 1)[1]
        if reply.get("handover") is None:
            stream.open_tracks.clear()  # ended by the old actor (reason: rebalanced)
        if self.detectors[target].state == "ready":
            self._adopt(stream, target, reply.get("handover"))
        else:  # the target was lost meanwhile: the tracker handed over goes nowhere
            self._end_open_tracks(stream, "worker_lost")
            stream.actor = stream.moving_from = None
            self._reassign()

    def _finish_streams(self) -> None:
        for stream in self.streams.values():
            if (stream.done or stream.decoder_state != "finished" or stream.queue or stream.in_flight
                    or stream.actor is None or stream.actor.startswith("moving:")):
                continue
            detector = self.detectors[stream.actor]
            if detector.state != "ready":
                continue
            stream.done = True
            ref = detector.handle.finish.remote(stream.config.id, stream.end_reason or "end_of_file")
            detector.calls.append((ref, "finish", [], time.monotonic()))

    def _on_command(self, entry, ref) -> None:
        self.pending_commands.remove(entry)
        _, detector, request_id, command, args, replies = entry
        try:
            reply = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            replies.put((request_id, {"ok": False, "error": f"the detector actor failed: {str(exc)[:300]}"}))
            return
        self._apply_reply(reply)
        answer = reply["answer"]
        if command == "set_prompt" and answer.get("ok"):
            stream = self.streams[args["stream"]]
            stream.config = stream.config.model_copy(update={"prompt": args["prompt"]})
        replies.put((request_id, answer))

    # -- control ---------------------------------------------------------------------------------------------

    def serve_control(self, control, replies) -> None:
        import queue

        while True:
            try:
                request = control.get_nowait()
            except queue.Empty:
                return
            except (OSError, EOFError, ValueError):
                return
            try:
                request_id, command, args = request
                self._command(request_id, command, args, replies)
            except Exception as exc:  # a bad request must not kill the driver
                replies.put((request[0] if isinstance(request, tuple) and request else None,
                             {"ok": False, "error": f"{type(exc).__name__}: {exc}"}))

    def _command(self, request_id, command: str, args: dict, replies) -> None:
        if command == "set_rules":
            for stream_id, alert_args in self.alert_args.items():
                alert_args["rules"] = args["rules"]
            targets = [d for d in self.detectors.values() if d.state == "ready"]
        elif command in ("set_prompt", "set_zones"):
            stream = self.streams.get(args["stream"])
            if stream is None:
                raise KeyError(f"no stream {args['stream']!r}")
            if command == "set_zones" and args["stream"] in self.alert_args:
                self.alert_args[args["stream"]].update(zones=args["zones"], lines=args["lines"])
            actor = self.detectors.get(stream.actor or "")
            if actor is None or actor.state != "ready":
                if command == "set_prompt":
                    stream.config = stream.config.model_copy(update={"prompt": args["prompt"]})
                replies.put((request_id, {"ok": True, "stream": args["stream"], "deferred": True}))
                return
            targets = [actor]
        else:
            replies.put((request_id, {"ok": False, "error": f"unknown worker command {command!r}"}))
            return
        if not targets:
            replies.put((request_id, {"ok": True}))
            return
        for index, detector in enumerate(targets):
            ref = detector.handle.command.remote(command, args)
            # Only the first answer goes back to the supervisor; set_rules reaches every actor.
            self.pending_commands.append((ref, detector, request_id if index == 0 else None, command, args,
                                          replies if index == 0 else _NoReplies()))

    # -- housekeeping ----------------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self._started_assigning() and any(s.actor is None and not s.done for s in self.streams.values()):
            self._reassign()
        for stream in self.streams.values():
            if stream.decoder_state == "offline":
                self._start_decoder(stream)  # a node with its resources may have joined
            elif stream.decoder_state == "lost" and stream.in_flight == 0 and stream.decoder_call is None:
                # Every frame the old decoder handed out is accounted for: go on from the first not processed.
                stream.decoder_state = "starting"
                stream.decoder_call = stream.decoder.start.remote(stream.completed + 1)
            elif stream.decoder_state == "starting" and stream.decoder_call is None:
                stream.decoder_call = stream.decoder.where.remote()
            if stream.decoder_state in ("lost", "starting") and now - stream.decoder_lost_at > 5.0:
                reason = self._feasible({**stream.resources, "CPU": self.cluster.decoder_cpus})
                if reason is not None and stream.offline_reason != reason:
                    stream.offline_reason = reason  # Ray places it once a node with them is back
                    self._send(make_event(stream.config.id, "status", state="offline", reason="unplaceable",
                                          source=self._source(stream), detail=reason))
                    self.stats.set(stream.config.id, "state", STATE_CODES["offline"])
        limit = self.model.watchdog_seconds
        for detector in self.detectors.values():
            oldest = min((call[3] for call in detector.calls), default=now)
            if limit and detector.state == "ready" and now - oldest > limit:
                # A call that never comes back (a hung GPU, a deadlock): as on one machine, the detector is killed
                # and restarted (by Ray), its streams move meanwhile.
                message = f"a call to {detector.name} has run {now - oldest:.0f} s " \
                          f"(model.watchdog_seconds = {limit:g}); killing the actor"
                log.error(message)
                self.ray.kill(detector.handle, no_restart=False)
                self._detector_lost(detector, TimeoutError(message), [])
        for detector in self.detectors.values():
            if detector.state == "starting" and now - detector.created_at > self.cluster.placement_timeout_seconds \
                    and not getattr(detector, "reported", False):
                detector.reported = True
                # Ray answers nothing until the actor's constructor (the model load) is done: slow, or unplaceable.
                log.error("%s not ready within %g s (cluster.placement_timeout_seconds): still loading the model, "
                          "or no node has %s", detector.name, self.cluster.placement_timeout_seconds,
                          self._detector_needs())
        if not any(d.state == "ready" for d in self.detectors.values()) and self.detectors and all(
                now - d.created_at > self.cluster.placement_timeout_seconds for d in self.detectors.values()):
            for stream_id, stream in self.streams.items():
                if stream.offline_reason is None:
                    stream.offline_reason = f"no detector actor could be placed ({self._detector_needs()})"
                    self._send(make_event(stream_id, "status", state=self._state_name(stream_id),
                                          reason="no_detector", detail=stream.offline_reason))
        self.write_placement()

    def _detector_needs(self) -> str:
        needs = {"CPU": self.cluster.detector_cpus, "GPU": self.cluster.detector_gpus,
                 **self.cluster.detector_resources}
        return ", ".join(f"{k} = {v:g}" for k, v in needs.items() if v)

    def placement(self) -> dict:
        detectors = {name: {"state": d.state, "node": d.node.get("node_id"), "host": d.node.get("host"),
                            "pid": d.node.get("pid"), "restarts": d.restarts,
                            "streams": sorted(s for s, slot in self.streams.items() if slot.actor == name)}
                     for name, d in self.detectors.items()}
        streams = {}
        for stream_id, stream in self.streams.items():
            actor = self.detectors.get(stream.actor or "")
            streams[stream_id] = {
                "decoder": {"state": stream.decoder_state, "node": stream.decoder_node.get("node_id"),
                            "host": stream.decoder_node.get("host"), "pid": stream.decoder_node.get("pid"),
                            "resources": stream.resources, "reason": stream.offline_reason},
                "detector": actor.name if actor else None,
                "detector_node": actor.node.get("node_id") if actor else None,
                "detector_host": actor.node.get("host") if actor else None,
            }
        return {"address": self.cluster.address, "detectors": detectors, "streams": streams,
                "nodes": sum(1 for n in self.ray.nodes() if n.get("Alive"))}

    def write_placement(self) -> None:
        if self.placement_path is None:
            return
        text = json.dumps(self.placement(), sort_keys=True)
        if text == self._last_placement:
            return
        self._last_placement = text
        temporary = f"{self.placement_path}.tmp"
        Path(temporary).write_text(text)
        os.replace(temporary, self.placement_path)

    # -- run and stop ----------------------------------------------------------------------------------------

    def run(self, stop, control=None, replies=None) -> None:
        while not stop.is_set():
            if control is not None:
                self.serve_control(control, replies)
            self.step()
        self.drain()

    def drain(self, timeout: float = 8.0) -> None:
        """Stop: decoders first (their last events), then the frames already taken, then end every open track."""
        ray = self.ray
        closing = {}
        for stream in self.streams.values():
            if stream.decoder is not None and stream.decoder_state in ("running", "finished", "starting"):
                closing[stream.decoder.close.remote()] = stream
        deadline = time.monotonic() + timeout
        ready, _ = ray.wait(list(closing), num_returns=len(closing), timeout=max(0.1, deadline - time.monotonic())) \
            if closing else ([], [])
        for ref in ready:
            try:
                self._forward(ray.get(ref)["events"])
            except ray.exceptions.RayError:
                pass
        for stream in self.streams.values():
            if stream.decoder_state == "running":
                stream.decoder_state = "stopped"
            stream.decoder_call = stream.take_pixels = None
        while time.monotonic() < deadline and self._work_left():
            self.step(0.05)
        self._finish_streams()
        finals = {}
        for detector in self.detectors.values():
            if detector.state == "ready":
                served = [s for s, slot in self.streams.items() if slot.actor == detector.name and not slot.done]
                finals[detector.handle.shutdown_streams.remote(served)] = detector
        for detector in self.detectors.values():
            for call in detector.calls:
                finals[call[0]] = detector
        if finals:
            ready, _ = ray.wait(list(finals), num_returns=len(finals), timeout=max(1.0, deadline - time.monotonic()))
            for ref in ready:
                try:
                    self._apply_reply(ray.get(ref))
                except ray.exceptions.RayError:
                    pass
        for stream in self.streams.values():
            if not stream.done and stream.open_tracks:
                self._end_open_tracks(stream, "shutdown")
        self.write_placement()

    def _work_left(self) -> bool:
        """Frames taken and not yet processed by a ready actor, or calls still out."""
        if any(d.calls for d in self.detectors.values()) or any(s.in_flight for s in self.streams.values()):
            return True
        return any(s.queue and s.actor in self.detectors and self.detectors[s.actor].state == "ready"
                   for s in self.streams.values())

    def close(self) -> None:
        for stream in self.streams.values():
            if stream.decoder is not None:
                self.ray.kill(stream.decoder, no_restart=True)
        for detector in self.detectors.values():
            self.ray.kill(detector.handle, no_restart=True)


class _NoReplies:
    def put(self, item) -> None:
        pass


def cluster_main(*, streams: list[StreamConfig], cluster: ClusterConfig, model: ModelConfig, tracker: TrackerConfig,
                 live: LiveConfig, batch_size: int, stats_spec: dict, events_endpoint: str, stop, control, replies,
                 ready, parent_pid: int, placement_path: str | None, video_directories: dict[str, str | None],
                 alerts: dict | None = None, run_name: str = "groundwatch") -> None:
    """Entry point of the cluster driver process (spawned by the supervisor in the worker's place)."""
    child_setup("cluster", parent_pid)
    sender = EventSender(events_endpoint)
    stats = StreamStats.attach(stats_spec)
    try:
        ray = connect(cluster)
    except ClusterError as exc:
        log.error("%s", exc)
        for stream in streams:
            sender.send(make_event(stream.id, "error", message=str(exc), error_type="cluster_unreachable",
                                   fatal=True))
        sender.flush_and_close()  # the reason must reach the hub before os._exit drops the queue
        os._exit(EXIT_FATAL)  # the thread still inside ray.init must not hold the exit
    driver = ClusterDriver(ray=ray, streams=streams, cluster=cluster, model=model, tracker=tracker, live=live,
                           batch_size=batch_size, stats=stats, sender=sender, video_directories=video_directories,
                           alerts=alerts, placement_path=placement_path, run_name=run_name, ready=ready)
    try:
        driver.start()
        driver.run(stop, control, replies)
    except ClusterError as exc:
        log.error("%s", exc)
        for stream in streams:
            sender.send(make_event(stream.id, "error", message=str(exc), error_type="model_load_failed",
                                   fatal=True))
        driver.close()
        sender.close()
        sys.exit(EXIT_FATAL)
    driver.close()
    ray.shutdown()
    sender.close()
