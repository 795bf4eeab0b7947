"""The MQTT bridge: carries the daemon's events to an MQTT broker in Frigate's topic layout, announces Home
Assistant discovery configs, and takes prompt changes from MQTT. Topics and payloads: docs/mqtt.md.

A client of the daemon like any other (STYLE 16): it subscribes to the event bus (ZeroMQ SUB on
`publish.endpoint`) and sends prompt changes to the control socket; the supervisor starts, restarts and stops
it like its other children. Nothing in the daemon waits on the broker: ZeroMQ drops what this process does not
read, and inside it every message waits in one bounded outbox (the oldest dropped and counted) until paho-mqtt's
network thread can hand it to the broker. paho reconnects with exponential backoff; on every (re)connect the
retained state (availability, counts, stream status, prompts, discovery configs) is published again.

Two parts: `BridgeState` turns events into MQTT messages (pure, no I/O: tested without a broker), and
`MqttBridge` moves bytes between ZeroMQ, the control socket and paho.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import zmq

from streamer.auth import connectable
from streamer.busclient import BusSubscriber
from streamer.lastvalue import ResendFilter
from streamer.config import MqttConfig
from streamer.events import make_event
from streamer.process import EventSender, child_setup
from streamer.stats import BRIDGE_STATE_CODES, StreamStats

log = logging.getLogger("groundwatch.mqtt")

# The event kinds the bridge reads; ZeroMQ filters the rest (one detections event per frame) at the publisher.
BRIDGED_KINDS = ("track", "status", "alert", "heartbeat")
MAX_PROMPT_BYTES = 4096
# Levels the bridge publishes under <prefix>/<stream>/ itself: a phrase's count topic must never be one of them.
RESERVED_LEVELS = ("all", "status", "prompt")
ANNOUNCE_INTERVAL_SECONDS = 1.0  # least time between two announcements asked for by Home Assistant


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    stream: str | None = None  # whose counters it counts in


def topic_slug(text: str) -> str:
    """A phrase as one topic level (and a Home Assistant object id): 'Green star' -> 'green_star'."""
    slug = re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_")
    return slug or "_"


def phrase_level(phrase: str) -> str:
    """A phrase's count topic level under <prefix>/<stream>/ (and its Home Assistant object id): its slug, with a
    `_` added when the bridge uses that level itself ('status' -> 'status_'). No other slug ends in `_`, so the
    renamed one cannot meet another phrase's."""
    slug = topic_slug(phrase)
    return slug + "_" if slug in RESERVED_LEVELS else slug


def prompt_phrases(prompt: str) -> list[str]:
    """'Red car . person .' -> ['red car', 'person']: the rule of gdino.text.split_phrases after its lowercasing,
    kept here so that the bridge process never imports torch."""
    seen: list[str] = []
    for part in re.split(r"[.?]", prompt.lower()):
        part = part.strip()
        if part and part not in seen:
            seen.append(part)
    return seen


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("groundwatch")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        return "0"


@dataclass
class TrackedObject:
    after: dict
    count_key: str
    last_sent: dict | None = None
    last_sent_at: float = float("-inf")


# Fields whose change is sent at once, whatever update_seconds says (Frigate: zone changes, a better snapshot).
_IMMEDIATE_FIELDS = ("label", "current_zones", "entered_zones", "has_snapshot", "has_clip")


@dataclass
class BridgeState:
    """What the broker should hold, from the events seen so far. `handle(event)` and `tick()` return messages."""

    prefix: str
    streams: dict[str, str]  # stream -> current prompt
    qos: int = 0
    update_seconds: float = 1.0
    homeassistant: bool = False
    discovery_prefix: str = "homeassistant"
    client_id: str = "groundwatch"
    version: str = "0"
    clock: object = time.monotonic
    tracks: dict[tuple[str, int], TrackedObject] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    retained: dict[str, Message] = field(default_factory=dict)  # latest value of every retained topic
    pending: dict[str, Message] = field(default_factory=dict)  # throttled retained values not yet sent
    last_state_at: dict[str, float] = field(default_factory=dict)
    discovery_topics: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stream, prompt in self.streams.items():
            self.counts[stream] = {}
            self._apply_prompt(stream, prompt, initial=True)

    # -- topics ----------------------------------------------------------------------------------------------

    @property
    def available_topic(self) -> str:
        return f"{self.prefix}/available"

    def count_topic(self, stream: str, phrase: str) -> str:
        return f"{self.prefix}/{stream}/{phrase_level(phrase)}"

    def total_topic(self, stream: str) -> str:
        return f"{self.prefix}/{stream}/all"

    def node_id(self, stream: str) -> str:
        return topic_slug(f"{self.client_id}_{stream}")

    # -- retained state --------------------------------------------------------------------------------------

    def _state(self, topic: str, payload: bytes, stream: str | None, throttle: bool = False) -> list[Message]:
        """Set a retained topic; returns what to send now (nothing when unchanged or throttled)."""
        message = Message(topic, payload, self.qos, True, stream)
        previous = self.retained.get(topic)
        self.retained[topic] = message
        if previous is not None and previous.payload == payload and topic not in self.pending:
            return []
        now = self.clock()
        if throttle and now - self.last_state_at.get(topic, float("-inf")) < self.update_seconds:
            self.pending[topic] = message
            return []
        self.pending.pop(topic, None)
        self.last_state_at[topic] = now
        return [message]

    def _clear(self, topic: str, stream: str | None) -> list[Message]:
        """Delete a retained topic from the broker (an empty retained payload)."""
        self.pending.pop(topic, None)
        if self.retained.pop(topic, None) is None:
            return []
        return [Message(topic, b"", self.qos, True, stream)]

    def retained_messages(self) -> list[Message]:
        """Everything to publish again after a (re)connect: availability first, then discovery, then state."""
        messages = [Message(self.available_topic, b"online", 1, True)]
        discovery = [m for t, m in self.retained.items() if t.startswith(self.discovery_prefix + "/")]
        state = [m for t, m in self.retained.items() if not t.startswith(self.discovery_prefix + "/")]
        self.pending.clear()
        now = self.clock()
        for message in state:
            self.last_state_at[message.topic] = now
        return messages + discovery + state

    def discovery_messages(self) -> list[Message]:
        return [m for t, m in self.retained.items() if t.startswith(self.discovery_prefix + "/")]

    def tick(self) -> list[Message]:
        """Throttled values whose time has come."""
        if not self.pending:
            return []
        now = self.clock()
        due = [m for t, m in self.pending.items() if now - self.last_state_at.get(t, float("-inf"))
               >= self.update_seconds]
        for message in due:
            del self.pending[message.topic]
            self.last_state_at[message.topic] = now
        return due

    # -- prompts, counts and discovery ------------------------------------------------------------------------

    def count_key(self, stream: str, phrase: str) -> str:
        """The prompt phrase a detected phrase counts under ('star' counts as 'green star' when only that
        phrase contains it); a phrase outside the prompt counts under itself."""
        phrases = prompt_phrases(self.streams.get(stream, ""))
        phrase = phrase.lower().strip()
        if phrase in phrases:
            return phrase
        containing = [p for p in phrases if phrase and phrase in p]
        return containing[0] if len(containing) == 1 else phrase

    def _counts_messages(self, stream: str, keys: Iterable[str]) -> list[Message]:
        counts = self.counts[stream]
        messages = []
        for key in keys:
            messages += self._state(self.count_topic(stream, key), str(counts.get(key, 0)).encode(), stream,
                                    throttle=True)
        messages += self._state(self.total_topic(stream), str(sum(counts.values())).encode(), stream,
                                throttle=True)
        return messages

    def _apply_prompt(self, stream: str, prompt: str, initial: bool = False) -> list[Message]:
        old_phrases = set() if initial else set(prompt_phrases(self.streams.get(stream, "")))
        self.streams[stream] = prompt
        phrases = prompt_phrases(prompt)
        messages = self._state(f"{self.prefix}/{stream}/prompt/state", prompt.encode(), stream)
        counts = self.counts.setdefault(stream, {})
        for gone in old_phrases - set(phrases):
            if counts.get(gone, 0) == 0:
                counts.pop(gone, None)
                messages += self._clear(self.count_topic(stream, gone), stream)
        messages += self._counts_messages(stream, phrases)
        if self.homeassistant:
            messages += self._discovery(stream, phrases)
        return messages

    def _discovery(self, stream: str, phrases: list[str]) -> list[Message]:
        """Home Assistant discovery for one stream: a device; per phrase a binary sensor (present) and a count
        sensor; a count of everything; the prompt as a text entity. Configs of phrases no longer in the prompt
        are removed (an empty retained config)."""
        node = self.node_id(stream)
        device = {"identifiers": [node], "name": f"groundwatch {stream}", "manufacturer": "groundwatch",
                  "model": "Grounding DINO video stream", "sw_version": self.version}
        common = {"availability": [{"topic": self.available_topic, "payload_available": "online",
                                    "payload_not_available": "offline"}],
                  "device": device, "origin": {"name": "groundwatch", "sw_version": self.version},
                  "qos": self.qos}
        configs: dict[str, dict] = {}
        sensors = [(phrase_level(p), self.count_topic(stream, p), p) for p in phrases]
        for slug, state_topic, label in sensors + [("all", self.total_topic(stream), "all objects")]:
            configs[f"{self.discovery_prefix}/binary_sensor/{node}/{slug}_present/config"] = {
                "name": f"{label} present", "unique_id": f"{node}_{slug}_present", "state_topic": state_topic,
                "value_template": "{{ 'ON' if (value | int(0)) > 0 else 'OFF' }}", "payload_on": "ON",
                "payload_off": "OFF", "device_class": "occupancy", **common}
            configs[f"{self.discovery_prefix}/sensor/{node}/{slug}_count/config"] = {
                "name": f"{label} count", "unique_id": f"{node}_{slug}_count", "state_topic": state_topic,
                "state_class": "measurement", "unit_of_measurement": "objects", "icon": "mdi:counter", **common}
        configs[f"{self.discovery_prefix}/text/{node}/prompt/config"] = {
            "name": "prompt", "unique_id": f"{node}_prompt", "command_topic": f"{self.prefix}/{stream}/prompt/set",
            "state_topic": f"{self.prefix}/{stream}/prompt/state", "min": 1, "max": 255, "mode": "text",
            "icon": "mdi:text-search", **common}
        messages = []
        for topic in self.discovery_topics.get(stream, set()) - set(configs):
            messages += self._clear(topic, stream)
        for topic, config in configs.items():
            messages += self._state(topic, _json(config), stream)
        self.discovery_topics[stream] = set(configs)
        return messages

    # -- events ------------------------------------------------------------------------------------------------

    def handle(self, event: dict, raw: bytes | None = None) -> list[Message]:
        kind, stream = event.get("kind"), event.get("stream")
        if stream not in self.streams:
            return []
        if kind == "track":
            return self._track(event)
        if kind == "status":
            return self._status(event)
        if kind == "heartbeat":
            return self._heartbeat(event)
        if kind == "alert":
            payload = raw if raw is not None else _json(event)
            return [Message(f"{self.prefix}/alerts", payload, self.qos, False, stream)]
        return []

    def _status(self, event: dict) -> list[Message]:
        stream = event["stream"]
        status = {key: event[key] for key in ("state", "reason", "source", "ts", "prompt") if key in event}
        messages = self._state(f"{self.prefix}/{stream}/status", _json(status), stream)
        if event.get("reason") == "prompt_changed" and isinstance(event.get("prompt"), str):
            messages += self.set_prompt(stream, event["prompt"])
        return messages

    def _heartbeat(self, event: dict) -> list[Message]:
        """Heartbeats carry the stream's state: they correct a status this bridge missed (it joined late)."""
        stream, state = event["stream"], event.get("state")
        topic = f"{self.prefix}/{stream}/status"
        current = self.retained.get(topic)
        status = json.loads(current.payload) if current is not None else {}
        if not isinstance(state, str) or status.get("state") == state:
            return []
        status.update(state=state, ts=event.get("ts"))
        status.pop("reason", None)
        return self._state(topic, _json(status), stream)

    def seed_status(self, stream: str, figures: dict) -> list[Message]:
        """A stream's state and source from the daemon's `status` reply, where no event has said them yet
        (events and heartbeats are newer than this reply: what they said stays)."""
        topic = f"{self.prefix}/{stream}/status"
        if stream not in self.streams:
            return []
        current = json.loads(self.retained[topic].payload) if topic in self.retained else {}
        status = {**{key: figures[key] for key in ("state", "source") if key in figures}, **current}
        if status == current:
            return []
        return self._state(topic, _json(status), stream)

    def set_prompt(self, stream: str, prompt: str) -> list[Message]:
        if self.streams.get(stream) == prompt:
            return []
        return self._apply_prompt(stream, prompt)

    def _object(self, event: dict, previous: dict | None) -> dict:
        """Frigate's tracked-object fields from a groundwatch track event (docs/mqtt.md)."""
        box = [int(round(float(v))) for v in event.get("box", (0, 0, 0, 0))]
        width, height = max(0, box[2] - box[0]), max(0, box[3] - box[1])
        score = float(event.get("score", 0.0))
        top_score = max(score, float(event.get("top_score", score)), previous["top_score"] if previous else 0.0)
        start_time = event.get("start_time", previous["start_time"] if previous else event.get("ts"))
        stream, track_id = event["stream"], int(event["track_id"])
        object_id = event.get("id") or (previous["id"] if previous else
                                         f"{float(event.get('wall', time.time())):.6f}-{stream}-{track_id}")
        snapshot, clip = event.get("snapshot"), event.get("clip")
        return {
            "id": object_id, "camera": stream, "frame_time": event.get("ts"), "label": event.get("phrase"),
            "sub_label": None, "track_id": track_id, "score": round(score, 4), "top_score": round(top_score, 4),
            "false_positive": False, "start_time": start_time, "end_time": None, "box": box,
            "area": width * height, "ratio": round(width / height, 4) if height else 0.0,
            "current_zones": list(event.get("current_zones", previous["current_zones"] if previous else [])),
            "entered_zones": list(event.get("entered_zones", previous["entered_zones"] if previous else [])),
            "has_snapshot": bool(event.get("has_snapshot", bool(snapshot))),
            "has_clip": bool(event.get("has_clip", bool(clip))),
            "snapshot_path": snapshot if snapshot else (previous or {}).get("snapshot_path"),
            "clip_path": clip if clip else (previous or {}).get("clip_path"),
            "lost": event.get("event") == "lost", "hits": event.get("hits"), "age": event.get("age"),
        }

    def _frigate(self, kind: str, before: dict, after: dict, stream: str) -> Message:
        return Message(f"{self.prefix}/events", _json({"type": kind, "before": before, "after": after}),
                       self.qos, False, stream)

    def _track(self, event: dict) -> list[Message]:
        stream, what = event["stream"], event.get("event")
        try:
            key = (stream, int(event["track_id"]))
        except (KeyError, TypeError, ValueError):
            return []
        tracked = self.tracks.get(key)
        messages: list[Message] = []
        if tracked is None:
            if what == "ended":
                return []  # a track that ended before this bridge saw it start (the bridge restarted)
            after = self._object(event, None)
            tracked = TrackedObject(after, self.count_key(stream, after["label"] or ""))
            self.tracks[key] = tracked
            self.counts[stream][tracked.count_key] = self.counts[stream].get(tracked.count_key, 0) + 1
            messages.append(self._frigate("new", after, after, stream))
            tracked.last_sent, tracked.last_sent_at = after, self.clock()
            return messages + self._counts_messages(stream, [tracked.count_key])
        previous = tracked.after
        after = self._object(event, previous)
        tracked.after = after
        if what == "ended":
            after["end_time"] = event.get("ts")
            after["lost"] = False
            del self.tracks[key]
            counts = self.counts[stream]
            counts[tracked.count_key] = max(0, counts.get(tracked.count_key, 0) - 1)
            messages.append(self._frigate("end", tracked.last_sent or previous, after, stream))
            return messages + self._counts_messages(stream, [tracked.count_key])
        last = tracked.last_sent or previous
        now = self.clock()
        immediate = any(after[name] != last[name] for name in _IMMEDIATE_FIELDS)
        due = now - tracked.last_sent_at >= self.update_seconds and (
            after["box"] != last["box"] or after["score"] != last["score"] or after["lost"] != last["lost"])
        if immediate or due:
            messages.append(self._frigate("update", last, after, stream))
            tracked.last_sent, tracked.last_sent_at = after, now
        return messages


class Outbox:
    """Messages waiting for the broker, oldest first; when full the oldest is dropped and counted."""

    def __init__(self, size: int) -> None:
        self.messages: deque[Message] = deque()
        self.size = size
        self.dropped: list[Message] = []

    def extend(self, messages: Iterable[Message]) -> None:
        for message in messages:
            if len(self.messages) >= self.size:
                self.dropped.append(self.messages.popleft())
            self.messages.append(message)

    def push_front(self, messages: list[Message]) -> None:
        """The retained state, sent first after a (re)connect; it may exceed the bound by its own size (that is
        bounded by the streams and phrases), and never pushes a queued event out."""
        for message in reversed(messages):
            self.messages.appendleft(message)

    def take_dropped(self) -> list[Message]:
        dropped, self.dropped = self.dropped, []
        return dropped

    def __len__(self) -> int:
        return len(self.messages)


class PendingPrompts:
    """Prompt commands not yet sent to the daemon: the newest per stream, so that a flood of commands costs
    nothing and a stream's latest prompt never waits behind older ones (one may be in flight besides)."""

    def __init__(self) -> None:
        self.prompts: dict[str, str] = {}  # stream -> prompt, oldest stream first
        self.replaced = 0
        self.closed = False
        self.changed = threading.Condition()

    def put(self, stream: str, prompt: str) -> None:
        with self.changed:
            if stream in self.prompts:
                self.replaced += 1
            self.prompts[stream] = prompt
            self.changed.notify()

    def take(self) -> tuple[str, str] | None:
        """The stream waiting longest and its newest prompt; waits for one; None once closed."""
        with self.changed:
            while not self.prompts and not self.closed:
                self.changed.wait()
            if self.closed:
                return None
            stream = next(iter(self.prompts))
            return stream, self.prompts.pop(stream)

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()

    def __len__(self) -> int:
        with self.changed:
            return len(self.prompts)


class MqttBridge:
    """ZeroMQ events in, MQTT messages out, prompt changes from MQTT to the control socket."""

    def __init__(self, *, config: MqttConfig, prompts: dict[str, str], events_endpoint: str,
                 control_endpoint: str, stats: StreamStats | None = None, sender: EventSender | None = None,
                 max_inflight: int = 1000, server_key: bytes | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.config, self.stats, self.sender = config, stats, sender
        self.control_endpoint = connectable(control_endpoint)
        self.server_key = server_key  # the daemon's CURVE public key when its endpoints need one
        self.max_inflight = max_inflight
        self.stream_ids = list(prompts)
        self.state = BridgeState(prefix=config.topic_prefix, streams=dict(prompts), qos=config.qos,
                                 update_seconds=config.update_seconds, homeassistant=config.homeassistant,
                                 discovery_prefix=config.discovery_prefix, client_id=config.client_id,
                                 version=_software_version())
        self.outbox = Outbox(config.queue_size)
        self.connected = False
        self.published = 0
        self.dropped = 0
        self._sent = 0
        self._acked = 0  # written by paho's thread only
        self._notices: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt_requests = PendingPrompts()
        self.retained_commands_ignored = 0
        self._announce_due = False  # Home Assistant asked for the discovery configs again
        self._announce_after = float("-inf")
        self._reported: str | None = None  # the error last reported, so a retry loop reports it once

        self._resends = ResendFilter()
        self.bus = BusSubscriber(events_endpoint,
                                 [f"{stream}/{kind}" for stream in self.stream_ids for kind in BRIDGED_KINDS],
                                 server_key=server_key)

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id,
                             reconnect_on_failure=True)
        user = config.user or os.environ.get("GROUNDWATCH_MQTT_USER")
        password = config.password or os.environ.get("GROUNDWATCH_MQTT_PASSWORD")
        if user:
            client.username_pw_set(user, password)
        if config.tls:
            client.tls_set(ca_certs=config.tls_ca_certs, certfile=config.tls_client_cert,
                           keyfile=config.tls_client_key)
            client.tls_insecure_set(config.tls_insecure)
        client.will_set(self.state.available_topic, "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=config.reconnect_initial_seconds,
                                   max_delay=config.reconnect_max_seconds)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.client = client
        self._mqtt = mqtt
        self._set_state("connecting")

    # -- paho's thread: only hand notices to the main loop ---------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._notices.put(("refused", str(reason_code), int(reason_code.value)))
        else:
            self._notices.put(("connected",))

    def _on_connect_fail(self, client, userdata) -> None:
        self._notices.put(("unreachable",))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._notices.put(("disconnected", str(reason_code)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acked += 1

    def _on_message(self, client, userdata, message) -> None:
        self._notices.put(("message", message.topic, bytes(message.payload), bool(message.retain)))

    # -- main thread ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_seconds)
        self.client.loop_start()
        threading.Thread(target=self._prompt_loop, name="mqtt-prompts", daemon=True).start()

    def _set_state(self, name: str) -> None:
        if self.stats is not None:
            for stream in self.stream_ids:
                self.stats.set(stream, "mqtt_state", BRIDGE_STATE_CODES[name])

    def _report(self, error_type: str, message: str) -> None:
        """One error event per stream when the bridge's trouble changes (not at every retry)."""
        if self._reported == message:
            return
        self._reported = message
        log.error("%s", message)
        if self.sender is not None:
            for stream in self.stream_ids:
                self.sender.send(make_event(stream, "error", message=message, error_type=error_type, fatal=False,
                                            process="mqtt"))

    def _broker(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def _handle_notice(self, notice: tuple) -> None:
        what = notice[0]
        if what == "connected":
            self.connected = True
            self._sent = self._acked
            self._reported = None
            self._set_state("connected")
            log.info("connected to MQTT broker %s", self._broker())
            prefix = self.config.topic_prefix
            self.client.subscribe([(f"{prefix}/+/prompt/set", 1)] + (
                [(f"{self.config.discovery_prefix}/status", 1)] if self.config.homeassistant else []))
            self.outbox.push_front(self.state.retained_messages())
            self._announce_due = False  # the discovery configs are among them
        elif what == "refused":
            self.connected = False
            self._set_state("disconnected")
            reason, code = notice[1], notice[2]
            if code in (0x04, 0x05, 0x86, 0x87):  # bad user name or password / not authorised (3.1.1 and 5)
                self._report("mqtt_auth_failed", f"MQTT broker {self._broker()} refused the credentials "
                             f"({reason}): check [mqtt] user and password (or $GROUNDWATCH_MQTT_USER/PASSWORD)")
            else:
                self._report("mqtt_refused", f"MQTT broker {self._broker()} refused the connection ({reason})")
        elif what == "unreachable":
            self.connected = False
            self._set_state("disconnected")
            self._report("mqtt_unreachable", f"cannot reach the MQTT broker at {self._broker()}; retrying with "
                         f"backoff up to {self.config.reconnect_max_seconds:g} s (the daemon runs on)")
        elif what == "disconnected":
            was_connected, self.connected = self.connected, False
            self._set_state("disconnected")
            if was_connected:
                log.warning("lost the MQTT broker %s (%s); reconnecting", self._broker(), notice[1])
        elif what == "message":
            self._handle_message(notice[1], notice[2], retained=notice[3])
        elif what == "daemon_status":
            for stream, figures in notice[1].get("streams", {}).items():
                self._queue(self.state.seed_status(stream, figures))
        elif what == "prompt_result":
            stream, prompt, reply = notice[1], notice[2], notice[3]
            if reply.get("ok"):
                self._queue(self.state.set_prompt(stream, prompt))
            else:
                error = str(reply.get("error", "refused"))
                log.warning("prompt for %s from MQTT refused: %s", stream, error)
                self._queue([Message(f"{self.config.topic_prefix}/{stream}/prompt/error",
                                     _json({"prompt": prompt, "error": error}), self.config.qos, False, stream)])

    def _handle_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A message on a subscribed topic. `retained`: the broker's stored copy, replayed on (re)subscribing,
        not a message published now. Commands are one-shot, so a retained copy is old news: a retained prompt
        would undo later changes at every reconnect, and a retained Home Assistant `online` adds nothing to
        the announcement that every (re)connect makes anyway."""
        prefix = self.config.topic_prefix
        if self.config.homeassistant and topic == f"{self.config.discovery_prefix}/status":
            if not retained and payload.strip().lower() == b"online":  # Home Assistant restarted
                self._announce_due = True  # announced in step(): a flood of these costs one announcement
            return
        if not (topic.startswith(prefix + "/") and topic.endswith("/prompt/set")):
            return
        if retained:
            self.retained_commands_ignored += 1
            log.warning("ignored the retained prompt command on %s: commands are one-shot (publish them "
                        "without retain; an empty retained message deletes this one)", topic)
            return
        stream = topic[len(prefix) + 1: -len("/prompt/set")]
        if stream not in self.state.streams:
            log.warning("prompt for unknown stream %r on %s", stream, topic)
            return
        if len(payload) > MAX_PROMPT_BYTES:
            self._notices.put(("prompt_result", stream, "", {"ok": False, "error": f"prompt longer than "
                                                             f"{MAX_PROMPT_BYTES} bytes"}))
            return
        try:
            prompt = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._notices.put(("prompt_result", stream, "", {"ok": False, "error": "prompt is not UTF-8"}))
            return
        self._prompt_requests.put(stream, prompt)  # replaces the stream's older command not sent yet

    def _prompt_loop(self) -> None:
        """Control requests on their own thread: the daemon may take seconds to encode a prompt."""
        from streamer.client import request

        # A subscriber that joins after a stream went online misses that status event (ZeroMQ's slow joiner):
        # ask the daemon once for every stream's state so that <prefix>/<stream>/status exists from the start.
        for _attempt in range(30):
            try:
                reply = request(self.control_endpoint, {"cmd": "status"}, timeout=2.0, server_key=self.server_key)
            except (TimeoutError, zmq.ZMQError, ValueError):
                continue
            if reply.get("ok"):
                self._notices.put(("daemon_status", reply))
                break
        while (item := self._prompt_requests.take()) is not None:
            stream, prompt = item
            try:
                reply = request(self.control_endpoint, {"cmd": "set_prompt", "stream": stream, "prompt": prompt},
                                timeout=60.0, server_key=self.server_key)
            except (TimeoutError, zmq.ZMQError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
            self._notices.put(("prompt_result", stream, prompt, reply))

    def _announce(self) -> None:
        """Discovery configs again for Home Assistant, at most once per ANNOUNCE_INTERVAL_SECONDS and never
        while the last announcement still waits: ahead of the queue, like the state sent on a reconnect, so
        that they push no alert or event out of it."""
        now = time.monotonic()
        if not self.connected or now < self._announce_after:
            return
        discovery = self.config.discovery_prefix + "/"
        if any(message.topic.startswith(discovery) for message in self.outbox.messages):
            return
        self._announce_due, self._announce_after = False, now + ANNOUNCE_INTERVAL_SECONDS
        self.outbox.push_front(self.state.discovery_messages())

    def _queue(self, messages: list[Message]) -> None:
        """Events wait in the outbox; retained state waits only while connected, since every (re)connect
        publishes the latest state anyway (an older queued value must not overwrite it)."""
        if not self.connected:
            messages = [m for m in messages if not m.retain]
        self.outbox.extend(messages)

    def _take_event(self, event: dict, payload: bytes) -> None:
        if self._resends.fresh(event):  # a cached copy already seen: dropped
            self._queue(self.state.handle(event, payload))

    def receive(self, limit: int = 10_000) -> int:
        """Events from the bus to the outbox, without blocking."""
        return self.bus.receive(self._take_event, limit)

    def flush(self) -> int:
        """Hand queued messages to paho while connected and fewer than `max_inflight` are unsent."""
        sent = 0
        published: dict[str | None, int] = {}
        while self.connected and self.outbox.messages and self._sent - self._acked < self.max_inflight:
            message = self.outbox.messages.popleft()
            info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
                self.outbox.messages.appendleft(message)
                break
            self._sent += 1
            sent += 1
            published[message.stream] = published.get(message.stream, 0) + 1
        self.published += sent
        dropped = self.outbox.take_dropped()
        self.dropped += len(dropped)
        if self.stats is not None:
            for stream, count in published.items():
                if stream in self.stats.row_of:
                    self.stats.add(stream, "mqtt_published", count)
            for message in dropped:
                stream = message.stream if message.stream in self.stats.row_of else self.stream_ids[0]
                self.stats.add(stream, "mqtt_dropped")
        return sent

    def step(self, timeout_ms: int = 20) -> None:
        if self.bus.poll(timeout_ms):
            self.receive(limit=1000)  # a burst is read in slices, with the broker served in between
        while True:
            try:
                self._handle_notice(self._notices.get_nowait())
            except queue.Empty:
                break
        if self._announce_due:
            self._announce()
        self._queue(self.state.tick())
        self.flush()

    def run(self, stop) -> None:
        self.start()
        while not stop.is_set():
            self.step()
        # The hub stopped before us (Supervisor.shutdown): take what it published last, then leave cleanly.
        self.bus.drain(self._take_event)
        deadline = time.monotonic() + 3.0
        while self.connected and (self.outbox or self._sent > self._acked) and time.monotonic() < deadline:
            self.step(20)
        self.close()

    def close(self) -> None:
        self._prompt_requests.close()
        if self.connected:
            info = self.client.publish(self.state.available_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                pass
            self.client.disconnect()
        self.client.loop_stop()
        self._set_state("off")
        self.bus.close()


def mqtt_main(*, config: MqttConfig, prompts: dict[str, str], events_endpoint: str, control_endpoint: str,
              internal_endpoint: str, stats_spec: dict, stop, parent_pid: int, server_key: bytes | None = None) -> None:
    """Entry point of the MQTT bridge process (spawned by the supervisor)."""
    child_setup("mqtt", parent_pid)
    stats = StreamStats.attach(stats_spec)
    sender = EventSender(internal_endpoint)
    bridge = MqttBridge(config=config, prompts=prompts, events_endpoint=events_endpoint,
                        control_endpoint=control_endpoint, stats=stats, sender=sender, server_key=server_key)
    try:
        bridge.run(stop)
    finally:
        sender.close()
