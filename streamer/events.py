"""Event schema (see docs/events.md): what goes out on the PUB socket and into the recordings.

On the wire an event is two ZeroMQ frames: the topic `<stream>/<kind>` (UTF-8) and the payload, a JSON object
with `v` (schema version), `stream`, `kind`, `seq` (per stream, counted over every kind, so a subscriber sees a
gap when it lost events), `ts` (the frame's timestamp, seconds; wall-clock time for live sources, media time for
files) and `wall` (when the event was made, Unix seconds), plus the fields of its kind.

Inside the daemon, children send the hub `[topic, JSON body]` without `v`/`seq`; the hub numbers the events of
each stream in one place, so the numbering is gap-free even though several processes produce events.
"""

from __future__ import annotations

import json
import time
from typing import Any

SCHEMA_VERSION = 1
EVENT_KINDS = ("detections", "track", "status", "heartbeat", "error", "zone", "line", "alert")  # docs/events.md
COUNTS_KIND = "zone_counts"  # worker -> hub only, never published: the live zone and line counts for heartbeats
# Status reasons that report a change of settings, not of the stream's state. A late subscriber or a page must
# still learn why a stream is in its state, so such a status never replaces the one that said why.
SETTINGS_REASONS = ("prompt_changed", "rules_changed", "zones_changed")


def replaces_status(previous: dict | None, event: dict) -> bool:
    """Whether `event` becomes a stream's "last status" in place of `previous` (see `SETTINGS_REASONS`)."""
    return (previous is None or event.get("reason") not in SETTINGS_REASONS
            or previous.get("state") != event.get("state"))


def topic(stream: str, kind: str) -> bytes:
    return f"{stream}/{kind}".encode()


def make_event(stream: str, kind: str, ts: float | None = None, **fields: Any) -> dict:
    """An event body (no `seq`/`v` yet: the hub adds them)."""
    now = time.time()
    event = {"stream": stream, "kind": kind, "ts": now if ts is None else float(ts), "wall": now}
    event.update(fields)
    return event


def pack_internal(event: dict) -> list[bytes]:
    """Child -> hub: the topic frame and the JSON body without `v`/`seq` (never pickle: a misbehaving child
    cannot make the hub run code). The hub splices `v` and `seq` in front without parsing the body, which is
    what lets one hub publish well over 50,000 events/s."""
    return [topic(event["stream"], event["kind"]), encode_payload(event)]


def unpack_internal(frames: list[bytes]) -> dict:
    return json.loads(frames[1])


def splice_header(body: bytes, seq: int) -> bytes:
    """`{"stream":...}` -> `{"v":1,"seq":N,"stream":...}`: the public payload from an internal body."""
    if body[:1] != b"{" or len(body) < 3:
        raise ValueError("an internal event body must be a non-empty JSON object")
    return b'{"v":%d,"seq":%d,' % (SCHEMA_VERSION, seq) + body[1:]


def encode_payload(event: dict) -> bytes:
    """The public JSON payload (compact separators: a third fewer bytes, and faster)."""
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode()


def decode_payload(payload: bytes) -> dict:
    event = json.loads(payload)
    version = event.get("v")
    if version != SCHEMA_VERSION:
        raise ValueError(f"event schema version {version!r}, this reader understands {SCHEMA_VERSION}")
    return event


def round_box(box_xyxy) -> list[float]:
    return [round(float(v), 2) for v in box_xyxy]
