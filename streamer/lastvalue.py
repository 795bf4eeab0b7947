"""State for late subscribers: the last `status` and the last `error` of every stream (a last-value cache).

A subscriber that connects after a stream failed used to learn only the next heartbeat's `offline`: not why.
The hub publishes on an XPUB socket with XPUB_VERBOSE, so it sees every subscription, including a second one
with a prefix somebody already has (the ZeroMQ guide's "Last Value Caching"). On each subscription it re-sends the
cached events whose topic the prefix matches. ZeroMQ delivers them to every subscriber of those topics, not only
the new one, so a re-sent event is marked `"cached": true` and keeps its original `seq`: a subscriber that
already saw it can drop it, and gap counting skips it.

The cache also gives heartbeats and `status` replies their `reason` (of the stream's last status) and
`last_error`.
"""

from __future__ import annotations

import json

import zmq

from streamer.auth import client_curve, connectable
from streamer.events import replaces_status

CACHED_KINDS = (b"status", b"error")


def mark_cached(payload: bytes) -> bytes:
    """`{...}` -> `{...,"cached":true}` without parsing: the bytes that went out, with the flag appended."""
    return payload[:-1] + b',"cached":true}'


def summarise_error(event: dict) -> dict:
    """The `last_error` of heartbeats and status replies: what an operator needs, from an error event."""
    return {key: event.get(key) for key in ("message", "error_type", "fatal", "wall", "seq")}


class LastValueCache:
    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}  # topic -> the payload as published
        self.reason: dict[str, str | None] = {}
        self.last_error: dict[str, dict | None] = {}
        self.statuses: dict[str, dict] = {}

    def see(self, stream: str, topic_frame: bytes, payload: bytes) -> None:
        """Keep the event if it is a status or an error (called for every published event: cheap otherwise)."""
        kind = topic_frame[topic_frame.rfind(b"/") + 1:]
        if kind not in CACHED_KINDS:
            return
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if kind == b"status":
            if not replaces_status(self.statuses.get(stream), event):
                return  # a prompt/rules/zones change: the cached status still says why the stream is in its state
            self.statuses[stream] = event
            self.reason[stream] = event.get("reason")
        else:
            self.last_error[stream] = summarise_error(event)
        self.values[topic_frame] = payload

    def matching(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """What to re-send for a new subscription to `prefix`: (topic, payload marked cached), status first."""
        found = [(topic, mark_cached(payload)) for topic, payload in self.values.items() if topic.startswith(prefix)]
        return sorted(found, key=lambda item: (item[0].rsplit(b"/", 1)[0], item[0].endswith(b"/error")))

    def state(self, stream: str) -> dict:
        """`reason` and `last_error` of a stream, as put into heartbeats."""
        return {"reason": self.reason.get(stream), "last_error": self.last_error.get(stream)}


class StateWatch:
    """The supervisor's view of each stream's `reason` and `last_error`, for `status` replies: a subscriber
    to the streams' status and error topics on the daemon's own event bus (the hub's cache answers it at once,
    also after the hub restarts)."""

    def __init__(self, endpoint: str, stream_ids: list[str], server_key: bytes | None = None) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        for stream in stream_ids:
            for kind in CACHED_KINDS:
                self.socket.setsockopt(zmq.SUBSCRIBE, stream.encode() + b"/" + kind)
        client_curve(self.socket, server_key)
        self.socket.connect(connectable(endpoint))
        self.cache = LastValueCache()

    def drain(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            try:
                topic_frame, payload = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not ours to read
                continue
            stream = topic_frame[: topic_frame.rfind(b"/")].decode(errors="replace")
            self.cache.see(stream, topic_frame, payload)

    def state(self, stream: str) -> dict:
        self.drain()
        return self.cache.state(stream)

    def close(self) -> None:
        self.socket.close()


class ResendFilter:
    """For clients with side effects (MQTT, webhooks): is this event new to me? A `cached` re-send is new only
    when its `seq` is above every `seq` seen from its stream (this client connected after it went out)."""

    def __init__(self) -> None:
        self.highest: dict[str, int] = {}

    def fresh(self, event: dict) -> bool:
        stream, seq = event.get("stream"), event.get("seq")
        if not isinstance(seq, int):
            return True
        highest = self.highest.get(stream)
        if event.get("cached"):
            if highest is not None and seq <= highest:
                return False
        self.highest[stream] = seq if highest is None or not event.get("cached") else max(highest, seq)
        return True
