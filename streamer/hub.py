"""The hub process: the one place events leave the daemon.

Children PUSH `[topic, JSON body]` to the hub's PULL socket. The hub numbers each stream's events (`seq`,
one counter per stream over every kind) by splicing `v` and `seq` into the body, publishes it on the PUB socket
(topic in its own frame) and appends the same bytes to the stream's event log. It also publishes a heartbeat
per stream. Preview frames for the web console (`[<stream>/preview, header, JPEG]`, see streamer/web/preview.py)
pass straight through to PUB: not numbered (no `seq`) and never written to the event log. PUB never blocks: a subscriber that stops reading loses events once its high-water mark is full,
and sees the loss as a gap in `seq`; the pipeline runs on at full speed.

The PUB socket is an XPUB: a new subscriber gets each stream's last status and last error at once (see
`streamer.lastvalue`). Beyond loopback it is a CURVE server (see `streamer.auth`).
"""

from __future__ import annotations

import logging
import time

import zmq

import json

from streamer.auth import serve_curve
from streamer.events import COUNTS_KIND, encode_payload, make_event, splice_header, topic
from streamer.lastvalue import LastValueCache
from streamer.process import child_setup
from streamer.recording import Recorder
from streamer.stats import RateMeter, StreamStats, snapshot

log = logging.getLogger("groundwatch.hub")

# A subscriber reconnects to a (re)bound PUB socket within ZeroMQ's reconnect interval (100 ms) and then sends its
# subscription; what is published before that is lost to it. So a hub publishes nothing (its own heartbeats
# included) until this long after it bound: what children send meanwhile waits in its PULL queue. 0.5 s was too short
# on a busy 2-core machine; and heartbeats used to go out from 0.5 s regardless.
JOIN_SECONDS = 1.5
# What a subscription may cost (anyone who can connect sends them): ZeroMQ keeps each prefix in a trie of one node
# per byte (about 48 bytes per byte) until its sender disconnects, and frees it recursively, so one 1 MiB prefix held
# 48 MiB, and crashed the hub (a stack overflow) when its sender left. A longer subscription than this disconnects
# its sender (a topic is `<stream>/<kind>`: at most 75 bytes). ZeroMQ has no limit on how many a client may hold.
MAX_SUBSCRIPTION_BYTES = 1024
RESEND_INTERVAL_SECONDS = 0.1  # a topic's last value is re-sent at most this often, however many subscribe


class Hub:
    def __init__(self, *, pull_endpoint: str, pub_endpoint: str, high_water_mark: int, heartbeat_seconds: float,
                 stats: StreamStats | None, recorder: Recorder | None, context: zmq.Context | None = None,
                 pull_high_water_mark: int = 100_000, curve_keys: tuple[bytes, bytes] | None = None,
                 join_seconds: float = 0.0) -> None:
        self.context = context or zmq.Context.instance()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, pull_high_water_mark)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(pull_endpoint)
        self.pub = self.context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, high_water_mark)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only a topic's first: each gets the cache
        serve_curve(self.pub, curve_keys)
        self.pub.bind(pub_endpoint)
        self.last_values = LastValueCache()
        self._resend_pending: set[bytes] = set()  # topics whose cached value a subscription asked for
        self._resent_at: dict[bytes, float] = {}
        self.stats, self.recorder = stats, recorder
        self.heartbeat_seconds = heartbeat_seconds
        self.seq: dict[str, int] = {}
        self.zone_counts: dict[str, dict] = {}  # stream -> {"zones": ..., "lines": ...} from the worker
        self.published = 0
        self.previews_published = 0
        self._rates = RateMeter(stats) if stats is not None else None
        self._hold_until = time.monotonic() + join_seconds  # `run` publishes nothing before (see JOIN_SECONDS)
        self._next_heartbeat = self._hold_until + heartbeat_seconds
        self._record_reported: dict[str, float] = {}  # stream -> when its recording failure was last published
        self.started = time.time()

    def publish(self, event: dict) -> None:
        """Number, encode, publish and record one event made here (heartbeats)."""
        self.publish_body(topic(event["stream"], event["kind"]), encode_payload(event))

    def publish_body(self, topic_frame: bytes, body: bytes) -> None:
        """Number, publish and record one internal event (`[topic, JSON body without v/seq]`)."""
        stream = topic_frame[: topic_frame.rfind(b"/")].decode()
        seq = self.seq.get(stream, 0) + 1
        self.seq[stream] = seq
        payload = splice_header(body, seq)
        self.pub.send_multipart((topic_frame, payload), flags=zmq.NOBLOCK)
        self.last_values.see(stream, topic_frame, payload)
        if self.recorder is not None:
            self.recorder.append(stream, payload)
        self.published += 1
        if self.stats is not None and stream in self.stats.row_of:
            self.stats.add(stream, "events_published")

    def drain(self, limit: int = 10_000) -> int:
        """Publish what the children sent, without blocking. Returns how many events."""
        count = 0
        while count < limit:
            try:
                frames = self.pull.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) == 3 and frames[0].endswith(b"/preview"):
                self.pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)  # not an event: no seq, no log
                self.previews_published += 1
                continue
            try:
                if frames[0].endswith(b"/" + COUNTS_KIND.encode()):
                    self._keep_counts(frames[1])
                    continue
                self.publish_body(frames[0], frames[1])
            except (ValueError, IndexError, UnicodeDecodeError) as exc:  # a bug in a child; never stop publishing
                log.error("dropping a malformed internal event: %s", exc)
                continue
            count += 1
        return count

    def serve_subscriptions(self, limit: int = 1000) -> int:
        """Answer new subscriptions with the cached last values they match, each topic at most every
        `RESEND_INTERVAL_SECONDS`. Returns how many (un)subscriptions."""
        count = 0
        while count < limit:
            try:
                message = self.pub.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            count += 1
            if message[:1] == b"\x01":  # not an unsubscription
                self._resend_pending.update(topic_frame for topic_frame, _ in self.last_values.matching(message[1:]))
        self._resend()
        return count

    def _resend(self) -> None:
        """Re-send the cached values asked for, each topic at most every `RESEND_INTERVAL_SECONDS`: ZeroMQ sends a
        re-sent value to every subscriber of its topic, so one client subscribing in a loop would otherwise fill
        every other subscriber's queue with copies."""
        if not self._resend_pending:
            return
        now = time.monotonic()
        for topic_frame, payload in self.last_values.matching(b""):
            if topic_frame not in self._resend_pending or now - self._resent_at.get(topic_frame, -1e9) < \
                    RESEND_INTERVAL_SECONDS:
                continue
            self._resend_pending.discard(topic_frame)
            self._resent_at[topic_frame] = now
            try:
                self.pub.send_multipart((topic_frame, payload), flags=zmq.NOBLOCK)
            except zmq.Again:
                break

    def _keep_counts(self, body: bytes) -> None:
        counts = json.loads(body)
        self.zone_counts[str(counts.get("stream"))] = {"zones": counts.get("zones", {}), "lines": counts.get("lines", {})}

    def heartbeat(self, now: float) -> None:
        if self.stats is None:
            return
        wall = time.time()
        for stream in self.stats.stream_ids:
            figures = snapshot(self.stats, stream, self._rates.rates(stream, now))
            figures.update(self.last_values.state(stream))
            counts = self.zone_counts.get(stream, {})
            self.publish(make_event(stream, "heartbeat", ts=wall, uptime=round(wall - self.started, 3), **figures,
                                    **counts))

    def tick(self) -> None:
        self._resend()  # what waited for its topic's interval
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_seconds
            self.heartbeat(now)
        if self.recorder is not None:
            self.recorder.maybe_flush()
            self._report_recording()

    def _report_recording(self, publish: bool = True) -> None:
        """Recording failures never stop publishing: they are counted in the stats (heartbeats, status) and
        published as `error` events when a log starts failing, and every minute while it keeps failing."""
        if self.stats is None:
            return
        now = time.monotonic()
        for stream in self.stats.stream_ids:
            failures, lost, error = self.recorder.health(stream)
            self.stats.set(stream, "record_errors", failures)
            self.stats.set(stream, "record_lost", lost)
            self.stats.set(stream, "record_failing", 1.0 if error else 0.0)
            reported = self._record_reported.get(stream)
            if not publish:
                continue
            if error and (reported is None or now - reported >= 60.0):
                self._record_reported[stream] = now
                path = self.recorder.logs[stream].path
                log.error("%s: cannot write the event log %s: %s", stream, path, error)
                self.publish(make_event(stream, "error", message=f"cannot write the event log {path}: {error}; "
                                        "publishing goes on, writes are retried", error_type="record_failed",
                                        fatal=False, path=str(path), events_not_recorded=lost))
            elif not error and reported is not None:
                del self._record_reported[stream]
                log.info("%s: the event log is written again", stream)

    def run(self, stop) -> None:
        holding = zmq.Poller()
        holding.register(self.pub, zmq.POLLIN)  # subscriptions only: children's events wait in the PULL queue
        while not stop.is_set() and time.monotonic() < self._hold_until:
            if holding.poll(20):
                self.serve_subscriptions()
        poller = zmq.Poller()
        poller.register(self.pull, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)  # subscriptions
        while not stop.is_set():
            if poller.poll(50):
                self.drain()
                self.serve_subscriptions()
            self.tick()
        # Producers were stopped before us (see Supervisor.shutdown): take what they left in flight.
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.3:
            if poller.poll(50) and self.drain():
                quiet_since = time.monotonic()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self._report_recording(publish=False)  # the last figures, for the supervisor's exit status
        self.pull.close()
        self.pub.close()


def hub_main(*, pull_endpoint: str, pub_endpoint: str, high_water_mark: int, heartbeat_seconds: float,
             stats_spec: dict, record_directory: str | None, flush_seconds: float, run_stamp: str, stop,
             parent_pid: int, curve_secret_key_file: str | None = None) -> None:
    """Entry point of the hub process (spawned by the supervisor)."""
    child_setup("hub", parent_pid)
    curve_keys = None
    if curve_secret_key_file is not None:
        from streamer.auth import load_secret

        curve_keys = load_secret(curve_secret_key_file)
    stats = StreamStats.attach(stats_spec)
    recorder = None
    if record_directory is not None:
        recorder = Recorder(record_directory, stats.stream_ids, flush_seconds, stamp=run_stamp)
    hub = Hub(pull_endpoint=pull_endpoint, pub_endpoint=pub_endpoint, high_water_mark=high_water_mark,
              heartbeat_seconds=heartbeat_seconds, stats=stats, recorder=recorder, curve_keys=curve_keys,
              join_seconds=JOIN_SECONDS)
    for stream in stats.stream_ids:
        stats.set(stream, "hub_started", time.time())  # the supervisor starts the producers once it is set
    try:
        hub.run(stop)
    finally:
        hub.close()
