"""The MQTT bridge alone: its event -> message logic (no I/O), and the bridge process's code against a real
Mosquitto broker with a test-side ZeroMQ PUB socket standing in for the daemon's event bus.

Home Assistant's documented discovery keys are written out below (from the MQTT binary sensor, sensor and text
integration pages and the MQTT discovery page of home-assistant.io); every discovery payload must use only
documented keys, carry the required ones, and give each its documented type.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from mqtt_broker import Mosquitto, Recorder, free_port, mosquitto_binary, retained_copy  # noqa: E402

from streamer.config import ConfigError, MqttConfig, parse_config  # noqa: E402
from streamer.events import encode_payload, make_event, splice_header, topic  # noqa: E402
from streamer.mqtt_bridge import BridgeState, MqttBridge, Outbox, prompt_phrases, topic_slug  # noqa: E402
from streamer.process import EventSender  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "mqtt.md"
needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/setup.sh)")

# -- Home Assistant's documented keys ------------------------------------------------------------------------
# Common to MQTT entities (binary_sensor.mqtt, sensor.mqtt, text.mqtt "Configuration Variables").
_ENTITY_KEYS = {
    "availability": list, "availability_mode": str, "availability_template": str, "availability_topic": str,
    "device": dict, "enabled_by_default": bool, "encoding": str, "entity_category": str, "entity_picture": str,
    "icon": str, "json_attributes_template": str, "json_attributes_topic": str, "name": (str, type(None)),
    "object_id": str, "default_entity_id": str, "origin": dict, "payload_available": str,
    "payload_not_available": str, "platform": str, "qos": int, "unique_id": str, "value_template": str,
}
HA_KEYS = {
    "binary_sensor": {**_ENTITY_KEYS, "device_class": str, "expire_after": int, "force_update": bool,
                      "off_delay": int, "payload_off": str, "payload_on": str, "state_topic": str},
    "sensor": {**_ENTITY_KEYS, "device_class": str, "expire_after": int, "force_update": bool,
               "last_reset_value_template": str, "options": list, "suggested_display_precision": int,
               "state_class": str, "state_topic": str, "unit_of_measurement": str},
    "text": {**_ENTITY_KEYS, "command_template": str, "command_topic": str, "max": int, "min": int, "mode": str,
             "pattern": str, "retain": bool, "state_topic": str},
}
HA_REQUIRED = {"binary_sensor": {"state_topic"}, "sensor": {"state_topic"}, "text": {"command_topic"}}
# "device": at least one of identifiers or connections must be present to identify the device.
HA_DEVICE_KEYS = {"configuration_url": str, "connections": list, "hw_version": str, "identifiers": (list, str),
                  "manufacturer": str, "model": str, "model_id": str, "name": str, "serial_number": str,
                  "suggested_area": str, "sw_version": str, "via_device": str}
HA_AVAILABILITY_KEYS = {"payload_available": str, "payload_not_available": str, "topic": str,
                        "value_template": str}
HA_ORIGIN_KEYS = {"name": str, "sw_version": str, "support_url": str}  # name required
HA_STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
HA_BINARY_DEVICE_CLASSES = {"battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door",
                            "garage_door", "gas", "heat", "light", "lock", "moisture", "motion", "moving",
                            "occupancy", "opening", "plug", "power", "presence", "problem", "running", "safety",
                            "smoke", "sound", "tamper", "update", "vibration", "window"}
HA_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]+$")  # node_id and object_id in a discovery topic


def check_discovery_payload(component: str, payload: dict) -> None:
    keys = HA_KEYS[component]
    unknown = set(payload) - set(keys)
    assert not unknown, f"{component}: keys Home Assistant does not document: {unknown}"
    missing = HA_REQUIRED[component] - set(payload)
    assert not missing, f"{component}: required keys missing: {missing}"
    for key, value in payload.items():
        assert isinstance(value, keys[key]), (component, key, value)
    assert payload["unique_id"]  # needed for the device registry
    device = payload["device"]
    assert set(device) <= set(HA_DEVICE_KEYS) and ("identifiers" in device or "connections" in device)
    for key, value in device.items():
        assert isinstance(value, HA_DEVICE_KEYS[key]), (key, value)
    for entry in payload.get("availability", []):
        assert set(entry) <= set(HA_AVAILABILITY_KEYS) and "topic" in entry
    assert set(payload["origin"]) <= set(HA_ORIGIN_KEYS) and "name" in payload["origin"]
    assert payload.get("qos", 0) in (0, 1, 2)
    if "state_class" in payload:
        assert payload["state_class"] in HA_STATE_CLASSES
    if component == "binary_sensor" and "device_class" in payload:
        assert payload["device_class"] in HA_BINARY_DEVICE_CLASSES


# -- what docs/mqtt.md says ----------------------------------------------------------------------------------

def _table(section: str) -> list[list[str]]:
    text = DOCS.read_text()
    start = text.index(section)
    rows, started = [], False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set(cells[0]) <= set("-") and cells[0] not in ("topic", "field"):
                rows.append(cells)
        elif started:
            break
    return rows


def documented_topics(prefix: str = "groundwatch", discovery: str = "homeassistant") -> list[re.Pattern]:
    patterns = []
    for cells in _table("### Topics"):
        template = cells[0].strip("`")
        pattern = re.escape(template)
        for placeholder, regex in (("<prefix>", re.escape(prefix)), ("<discovery_prefix>", re.escape(discovery)),
                                   ("<stream>", r"[A-Za-z0-9_.-]+"), ("<phrase>", r"[a-z0-9_-]+"),
                                   ("<node>", r"[a-z0-9_-]+")):
            pattern = pattern.replace(re.escape(placeholder), regex)
        patterns.append(re.compile(pattern))
    return patterns


_TYPES = {"string": str, "number": (int, float), "integer": int, "bool": bool, "list": list, "null": type(None)}


def documented_object_fields() -> dict[str, tuple]:
    """{field: allowed Python types} from the table of Frigate object fields ('number or null', ...)."""
    fields = {}
    for cells in _table("### `<prefix>/events`"):
        types: tuple = ()
        for part in cells[1].split(" or "):
            found = _TYPES[part.strip()]
            types += found if isinstance(found, tuple) else (found,)
        fields[cells[0].strip("`")] = types
    return fields


def check_object(obj: dict) -> None:
    fields = documented_object_fields()
    assert set(obj) == set(fields), set(obj) ^ set(fields)
    for name, types in fields.items():
        value = obj[name]
        # bool is an int in Python: an integer or number field must not be a bool, and a bool field must be one
        assert isinstance(value, types) and (bool in types or not isinstance(value, bool)), (name, value)


# -- the logic, without I/O -----------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def track(event: str, track_id: int = 1, ts: float = 1.0, score: float = 0.5, box=(10, 20, 50, 80),
          phrase: str = "green star", **extra) -> dict:
    return {"stream": "cam", "kind": "track", "ts": ts, "wall": 1795000000.0 + ts, "event": event,
            "track_id": track_id, "box": list(box), "score": score, "phrase": phrase, "age": 3, "hits": 3, **extra}


def frigate(messages) -> list[dict]:
    return [json.loads(m.payload) for m in messages if m.topic == "groundwatch/events"]


def test_documented_tables_are_read():
    """The docs tables the tests check against are really parsed (a renamed heading must fail, not pass)."""
    assert len(documented_object_fields()) >= 20
    assert "top_score" in documented_object_fields() and "entered_zones" in documented_object_fields()
    assert any(p.fullmatch("groundwatch/cam/green_star") for p in documented_topics())
    assert not any(p.fullmatch("groundwatch/cam/green star") for p in documented_topics())


def test_frigate_lifecycle_new_update_end():
    """started -> `new` (before == after), updated -> `update` with before = what was last sent, ended -> `end`
    with end_time; top_score is the best score seen and start_time the started event's time when the daemon
    sends neither; every object has exactly the documented fields and types."""
    clock = Clock()
    state = BridgeState(prefix="groundwatch", streams={"cam": "green star . black cross ."}, update_seconds=1.0,
                        clock=clock)
    new = frigate(state.handle(track("started", ts=2.0, score=0.6)))
    assert [e["type"] for e in new] == ["new"] and new[0]["before"] == new[0]["after"]
    obj = new[0]["after"]
    check_object(obj)
    assert obj["start_time"] == 2.0 and obj["end_time"] is None and obj["top_score"] == 0.6
    assert obj["box"] == [10, 20, 50, 80] and obj["area"] == 40 * 60 and obj["camera"] == "cam"
    clock.now += 1.5
    update = frigate(state.handle(track("updated", ts=2.5, score=0.9, box=(12, 20, 52, 80))))
    assert [e["type"] for e in update] == ["update"]
    assert update[0]["before"] == obj and update[0]["after"]["top_score"] == 0.9
    clock.now += 1.5
    later = frigate(state.handle(track("updated", ts=3.0, score=0.7, box=(14, 20, 54, 80))))
    assert later[0]["after"]["top_score"] == 0.9 and later[0]["after"]["score"] == 0.7
    end = frigate(state.handle(track("ended", ts=4.0, score=0.7)))
    assert [e["type"] for e in end] == ["end"]
    assert end[0]["after"]["end_time"] == 4.0 and end[0]["after"]["start_time"] == 2.0
    assert end[0]["after"]["id"] == obj["id"] == end[0]["before"]["id"]
    check_object(end[0]["after"])
    assert state.counts["cam"]["green star"] == 0


def test_fields_of_the_alerts_work_are_mapped_when_present():
    """Track events that carry id, zones, start_time, top_score, snapshot and clip (zones and alerts work) keep
    them; a zone change is sent at once even inside update_seconds."""
    clock = Clock()
    state = BridgeState(prefix="groundwatch", streams={"cam": "green star ."}, update_seconds=10.0, clock=clock)
    extra = dict(id="cam-run7-1", start_time=1.25, top_score=0.95, current_zones=[], entered_zones=[])
    first = frigate(state.handle(track("started", ts=2.0, **extra)))[0]["after"]
    assert first["id"] == "cam-run7-1" and first["start_time"] == 1.25 and first["top_score"] == 0.95
    clock.now += 0.1
    assert frigate(state.handle(track("updated", ts=2.1, box=(11, 20, 51, 80), **extra))) == []  # throttled
    zoned = dict(extra, current_zones=["driveway"], entered_zones=["driveway"], has_snapshot=True,
                 snapshot="/rec/cam/snap-1.jpg")
    update = frigate(state.handle(track("updated", ts=2.2, **zoned)))
    assert len(update) == 1 and update[0]["after"]["current_zones"] == ["driveway"]
    assert update[0]["before"]["current_zones"] == [] and update[0]["after"]["has_snapshot"] is True
    assert update[0]["after"]["snapshot_path"] == "/rec/cam/snap-1.jpg"
    check_object(update[0]["after"])


def test_updates_throttled_to_update_seconds():
    """A track event every frame (30 per second here) makes at most one update per update_seconds."""
    clock = Clock()
    state = BridgeState(prefix="groundwatch", streams={"cam": "green star ."}, update_seconds=1.0, clock=clock)
    messages = state.handle(track("started"))
    for frame in range(90):
        clock.now += 1 / 30
        messages += state.handle(track("updated", ts=frame / 30, box=(10 + frame, 20, 50 + frame, 80)))
    updates = [e for e in frigate(messages) if e["type"] == "update"]
    assert 2 <= len(updates) <= 3


def test_counts_per_phrase_retained_throttled_and_settled():
    """Counts go to <prefix>/<stream>/<phrase> and .../all (retained); changes inside update_seconds wait, and
    the latest value is sent when the time has come (a count never stays stale)."""
    clock = Clock()
    state = BridgeState(prefix="groundwatch", streams={"cam": "green star . black cross ."}, update_seconds=1.0,
                        clock=clock)
    assert state.retained["groundwatch/cam/green_star"].payload == b"0"
    clock.now += 5
    first = state.handle(track("started", 1))
    assert [(m.topic, m.payload, m.retain) for m in first if m.topic.startswith("groundwatch/cam/")] == [
        ("groundwatch/cam/green_star", b"1", True), ("groundwatch/cam/all", b"1", True)]
    clock.now += 0.1
    second = state.handle(track("started", 2, phrase="star"))  # part of one prompt phrase: counts under it
    assert not [m for m in second if m.topic.startswith("groundwatch/cam/")]
    assert state.tick() == []
    clock.now += 1.0
    settled = {m.topic: m.payload for m in state.tick()}
    assert settled == {"groundwatch/cam/green_star": b"2", "groundwatch/cam/all": b"2"}


def test_discovery_follows_the_prompt():
    """A prompt change announces configs for new phrases and removes those of phrases that left (an empty
    retained config), and every payload validates against Home Assistant's documented keys."""
    state = BridgeState(prefix="groundwatch", streams={"cam": "green star . black cross ."}, homeassistant=True)
    topics = {t for t in state.retained if t.startswith("homeassistant/")}
    assert "homeassistant/binary_sensor/groundwatch_cam/green_star_present/config" in topics
    for t in topics:
        _, component, node, object_id, last = t.split("/")
        assert HA_ID_PATTERN.match(node) and HA_ID_PATTERN.match(object_id) and last == "config"
        check_discovery_payload(component, json.loads(state.retained[t].payload))
    messages = state.handle({"stream": "cam", "kind": "status", "state": "online", "reason": "prompt_changed",
                             "prompt": "black cross . a red car .", "previous_prompt": "green star . black cross ."})
    removed = {m.topic for m in messages if m.payload == b"" and m.retain}
    assert removed == {"homeassistant/binary_sensor/groundwatch_cam/green_star_present/config",
                       "homeassistant/sensor/groundwatch_cam/green_star_count/config",
                       "groundwatch/cam/green_star"}
    added = {m.topic for m in messages if m.payload}
    assert "homeassistant/sensor/groundwatch_cam/a_red_car_count/config" in added
    assert ("groundwatch/cam/prompt/state", b"black cross . a red car .") in {(m.topic, m.payload) for m in messages}


def test_status_of_a_bridge_that_joined_late():
    """A bridge that missed the stream's `online` status event (it subscribed after it) still publishes the
    state: seeded from the daemon's status reply, corrected by the next heartbeat, unchanged by later ones."""
    state = BridgeState(prefix="groundwatch", streams={"cam": "green star ."})
    [seeded] = state.seed_status("cam", {"state": "starting", "source": "live", "fps": 0.0})
    assert json.loads(seeded.payload) == {"state": "starting", "source": "live"} and seeded.retain
    [corrected] = state.handle({"stream": "cam", "kind": "heartbeat", "ts": 5.0, "state": "online"})
    assert json.loads(corrected.payload) == {"state": "online", "source": "live", "ts": 5.0}
    assert state.handle({"stream": "cam", "kind": "heartbeat", "ts": 6.0, "state": "online"}) == []
    other = BridgeState(prefix="groundwatch", streams={"cam": "green star ."})  # the heartbeat came first
    other.handle({"stream": "cam", "kind": "heartbeat", "ts": 5.0, "state": "online"})
    [filled] = other.seed_status("cam", {"state": "starting", "source": "file"})
    assert json.loads(filled.payload) == {"state": "online", "source": "file", "ts": 5.0}
    state.handle({"stream": "cam", "kind": "status", "ts": 7.0, "state": "reconnecting", "source": "live",
                  "reason": "timeout"})
    assert state.seed_status("cam", {"state": "online", "source": "live"}) == []  # events know better


def test_a_phrase_named_like_a_bridge_topic_counts_on_its_own_topic():
    """A prompt phrase `status` used to count on <prefix>/<stream>/status, and `all` on the total's topic: anyone
    who could set a prompt (prompt/set) overwrote the stream's retained JSON status with a number. A phrase whose
    slug is a level the bridge uses there itself counts on that slug plus `_` (no other slug ends in `_`);
    ordinary phrases keep their topics, and every topic and Home Assistant unique_id stays distinct."""
    state = BridgeState(prefix="groundwatch", streams={"cam": "person ."}, update_seconds=0.0, homeassistant=True)
    state.handle({"stream": "cam", "kind": "status", "state": "online", "reason": "started", "ts": 1.0})
    messages = state.set_prompt("cam", "status . all . prompt . person .")
    messages += state.handle(track("started", 1, phrase="status"))
    messages += state.handle(track("started", 2, phrase="person"))
    status = json.loads(state.retained["groundwatch/cam/status"].payload)
    assert isinstance(status, dict) and status["state"] == "online", f"the stream's status became {status!r}"
    counts = {t: state.retained[t].payload for t in ("groundwatch/cam/status_", "groundwatch/cam/all_",
                                                     "groundwatch/cam/prompt_", "groundwatch/cam/person",
                                                     "groundwatch/cam/all")}
    assert counts == {"groundwatch/cam/status_": b"1", "groundwatch/cam/all_": b"0",
                      "groundwatch/cam/prompt_": b"0", "groundwatch/cam/person": b"1", "groundwatch/cam/all": b"2"}
    documented = documented_topics()
    assert all(any(p.fullmatch(m.topic) for p in documented) for m in messages)
    configs = [json.loads(m.payload) for t, m in state.retained.items() if t.startswith("homeassistant/")]
    assert len({c["unique_id"] for c in configs}) == len(configs) == 2 * (4 + 1) + 1


def test_phrases_and_slugs():
    assert prompt_phrases("Green Star . black cross . green star .") == ["green star", "black cross"]
    assert topic_slug("a red car/van+#") == "a_red_car_van"


def test_outbox_drops_oldest_and_counts():
    outbox = Outbox(3)
    from streamer.mqtt_bridge import Message

    outbox.extend(Message(f"t/{i}", b"x") for i in range(5))
    assert [m.topic for m in outbox.messages] == ["t/2", "t/3", "t/4"]
    assert [m.topic for m in outbox.take_dropped()] == ["t/0", "t/1"]


def test_config_errors_are_clear():
    base = {"streams": [{"id": "cam", "url": "rtsp://127.0.0.1/x", "prompt": "a car ."}]}
    with pytest.raises(ConfigError, match=r"webhooks\[0\]\.url: a webhook URL must be http:// or https://"):
        parse_config(dict(base, webhooks=[{"url": "ftp://example.net/hook"}]))
    with pytest.raises(ConfigError, match=r"webhooks\[0\]\.url"):
        parse_config(dict(base, webhooks=[{"url": "file:///etc/passwd"}]))
    with pytest.raises(ConfigError, match=r"mqtt\.topic_prefix"):
        parse_config(dict(base, mqtt={"topic_prefix": "gw/#"}))
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        parse_config(dict(base, mqtt={"port": 0}))
    with pytest.raises(ConfigError, match=r"mqtt\.hots: unknown key"):
        parse_config(dict(base, mqtt={"hots": "x"}))


# -- the bridge against a real broker, events from a test-side bus ------------------------------------------

class FakeBus:
    """A PUB socket publishing events the way the hub does (topic frame, numbered JSON body)."""

    def __init__(self) -> None:
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.socket.bind(self.endpoint)
        self.seq = 0

    def send(self, stream: str, kind: str, **fields) -> dict:
        self.seq += 1
        event = make_event(stream, kind, **fields)
        self.socket.send_multipart([topic(stream, kind), splice_header(encode_payload(event), self.seq)])
        return event

    def close(self) -> None:
        self.socket.close()


class Errors:
    """The hub's PULL end: what the bridge reports."""

    def __init__(self, directory: Path) -> None:
        self.endpoint = f"ipc://{directory}/events"
        self.socket = zmq.Context.instance().socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)

    def wait(self, error_type: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.poll(100):
                event = json.loads(self.socket.recv_multipart()[1])
                if event.get("error_type") == error_type:
                    return event
        raise AssertionError(f"no {error_type} error event within {timeout} s")


class FakeControl:
    """The daemon's control socket (ROUTER): answers every request `ok` and records each set_prompt's prompt.
    While `free` is clear the daemon is busy encoding: the set_prompt just received waits for it."""

    def __init__(self) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.prompts: list[str] = []
        self.free = threading.Event()
        self.free.set()
        self.stop = threading.Event()
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(50):
                continue
            *envelope, body = self.socket.recv_multipart()
            request = json.loads(body)
            if request["cmd"] == "set_prompt":
                self.prompts.append(request["prompt"])
                self.free.wait(10)
            self.socket.send_multipart([*envelope, json.dumps({"ok": True, "streams": {}}).encode()])

    def close(self) -> None:
        self.free.set()
        self.stop.set()
        self.thread.join(5)
        self.socket.close()


def command_until_applied(client, control: FakeControl, prompt: str, timeout: float = 10.0) -> None:
    """Publish a prompt command (not retained) until it reaches the daemon: the bridge has (re)subscribed."""
    deadline = time.monotonic() + timeout
    while prompt not in control.prompts:
        assert time.monotonic() < deadline, f"{prompt!r} did not reach the daemon within {timeout} s"
        client.publish("groundwatch/cam/prompt/set", prompt, qos=1)
        time.sleep(0.5)


def run_bridge(config: MqttConfig, bus: FakeBus, sender: EventSender | None = None,
               prompts: dict | None = None, control_endpoint: str = "tcp://127.0.0.1:1"):
    bridge = MqttBridge(config=config, prompts=prompts or {"cam": "green star ."}, events_endpoint=bus.endpoint,
                        control_endpoint=control_endpoint, sender=sender)
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    return bridge, stop, thread


@needs_broker
def test_alerts_after_a_broker_restart_are_not_lost(tmp_path):
    """The broker restarts (losing its retained messages). The bridge reconnects with backoff, republishes its
    retained state, and every alert the bus publishes after it is back reaches the broker, in order."""
    broker = Mosquitto(tmp_path / "broker").start()
    bus = FakeBus()
    config = MqttConfig(port=broker.port, reconnect_initial_seconds=0.1, reconnect_max_seconds=0.5)
    bridge, stop, thread = run_bridge(config, bus)
    recorder = Recorder(broker.port, ["groundwatch/#"])
    try:
        recorder.wait_for(lambda m: m[0] == "groundwatch/available" and m[1] == b"online", 10, "online")
        recorder.connected.clear()
        broker.restart(down_seconds=1.0)
        assert recorder.connected.wait(15)
        deadline = time.monotonic() + 15
        while not bridge.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.connected, "the bridge did not reconnect"
        # The restarted broker kept nothing: retained copies exist only because the bridge published them again.
        assert retained_copy(broker.port, "groundwatch/cam/green_star") == b"0"
        assert retained_copy(broker.port, "groundwatch/available") == b"online"
        mark = recorder.mark()
        sent = [bus.send("cam", "alert", rule="van", n=n) for n in range(50)]
        received = recorder.wait_for(lambda m: m[0] == "groundwatch/alerts" and json.loads(m[1])["n"] == 49, 15,
                                     "the last alert", since=mark)
        assert received
        alerts = [json.loads(p)["n"] for t, p, _ in recorder.select("groundwatch/alerts", mark)]
        assert alerts == [e["n"] for e in sent]
    finally:
        stop.set()
        thread.join(10)
        recorder.close()
        bus.close()
        broker.stop()


@needs_broker
def test_wrong_credentials_give_a_clear_error_event(tmp_path):
    """A broker with a password file refuses a wrong password: one error event per stream says so
    (mqtt_auth_failed, naming the broker and the keys to check); the right password connects."""
    broker = Mosquitto(tmp_path / "broker", users={"gw": "right"}).start()
    bus, errors = FakeBus(), Errors(tmp_path)
    sender = EventSender(errors.endpoint)
    bridge, stop, thread = run_bridge(MqttConfig(port=broker.port, user="gw", password="wrong",
                                                 reconnect_initial_seconds=0.2, reconnect_max_seconds=1), bus, sender)
    try:
        event = errors.wait("mqtt_auth_failed", 15)
        assert event["stream"] == "cam" and event["kind"] == "error" and event["fatal"] is False
        assert f"127.0.0.1:{broker.port}" in event["message"] and "user and password" in event["message"]
        assert not bridge.connected
    finally:
        stop.set()
        thread.join(10)
    good, stop, thread = run_bridge(MqttConfig(port=broker.port, user="gw", password="right", client_id="gw2"),
                                    bus)
    try:
        recorder = Recorder(broker.port, ["groundwatch/available"], user="gw", password="right")
        recorder.wait_for(lambda m: m[1] == b"online", 10, "online with the right password")
        recorder.close()
    finally:
        stop.set()
        thread.join(10)
        sender.close()
        bus.close()
        broker.stop()


@needs_broker
def test_unreachable_broker_is_reported_then_joined(tmp_path):
    """No broker at start: an mqtt_unreachable error event, the bridge keeps trying with backoff; events made
    meanwhile wait in the bounded queue (oldest dropped, counted) and go out once a broker listens."""
    # The test's subscriber gets a persistent session first, so that it misses nothing whoever connects first
    # when the broker comes up.
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()
    Recorder(broker.port, ["groundwatch/alerts"], client_id="test-unreachable", clean_session=False).close()
    broker.stop()
    bus, errors = FakeBus(), Errors(tmp_path)
    sender = EventSender(errors.endpoint)
    bridge, stop, thread = run_bridge(MqttConfig(port=broker.port, qos=1, reconnect_initial_seconds=0.2,
                                                 reconnect_max_seconds=0.5, queue_size=20), bus, sender)
    try:
        event = errors.wait("mqtt_unreachable", 15)
        assert f"127.0.0.1:{broker.port}" in event["message"] and event["stream"] == "cam"
        time.sleep(0.5)  # the bridge's subscription to the bus is in place
        for n in range(30):
            bus.send("cam", "alert", rule="van", n=n)
        deadline = time.monotonic() + 5
        while bridge.dropped < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.dropped == 10 and len(bridge.outbox) == 20
        broker.start()
        recorder = Recorder(broker.port, ["groundwatch/alerts"], client_id="test-unreachable", clean_session=False)
        recorder.wait_for(lambda m: m[0] == "groundwatch/alerts" and json.loads(m[1])["n"] == 29, 15,
                          "queued alerts after the broker came up")
        assert [json.loads(p)["n"] for t, p, _ in recorder.select("groundwatch/alerts")] == list(range(10, 30))
        recorder.close()
    finally:
        stop.set()
        thread.join(10)
        sender.close()
        bus.close()
        broker.stop()


@needs_broker
def test_a_retained_prompt_command_is_not_applied(tmp_path):
    """A prompt left retained on prompt/set (published with retain by some client) used to be applied at every
    (re)connect: at start it replaced the config's prompt, and each broker restart or network blip undid later
    changes. Commands are one-shot: the broker's retained copy is ignored (and counted); a command published while
    the bridge is connected is applied once."""
    broker = Mosquitto(tmp_path / "broker", persistence=True).start()  # keeps the retained command over a restart
    control, bus = FakeControl(), FakeBus()
    remote = Recorder(broker.port, ["groundwatch/cam/prompt/state"])
    remote.client.publish("groundwatch/cam/prompt/set", "stale .", qos=1, retain=True).wait_for_publish(5)
    bridge, stop, thread = run_bridge(MqttConfig(port=broker.port, reconnect_initial_seconds=0.1,
                                                 reconnect_max_seconds=0.5), bus, control_endpoint=control.endpoint)
    try:
        # The broker replays a retained message on subscribing, before any later command: once a later command
        # reached the daemon, the retained one would have reached it first.
        command_until_applied(remote.client, control, "first .")
        broker.restart(down_seconds=0.5)
        command_until_applied(remote.client, control, "second .", timeout=15)
        assert "stale ." not in control.prompts, control.prompts
        assert bridge.retained_commands_ignored == 2
    finally:
        stop.set()
        thread.join(10)
        remote.close()
        control.close()
        bus.close()
        broker.stop()


@needs_broker
def test_a_flood_of_prompt_commands_keeps_only_the_newest(tmp_path):
    """Prompt commands used to wait in an unbounded queue, sent to the daemon one at a time (each may take up to
    60 s to encode): a flood of them grew the bridge's memory without bound, and a legitimate prompt waited
    behind the whole backlog. A newer command now replaces one of the same stream not sent yet: 500 commands
    made while the daemon encodes leave one waiting, the newest."""
    broker = Mosquitto(tmp_path / "broker").start()
    control, bus = FakeControl(), FakeBus()
    bridge, stop, thread = run_bridge(MqttConfig(port=broker.port), bus, control_endpoint=control.endpoint)
    remote = Recorder(broker.port, ["groundwatch/cam/prompt/state"])
    try:
        command_until_applied(remote.client, control, "person .")
        mark = len(control.prompts)
        control.free.clear()  # the daemon is busy encoding the first command of the flood
        for n in range(500):
            remote.client.publish("groundwatch/cam/prompt/set", f"thing {n} .", qos=0)
        remote.client.publish("groundwatch/cam/prompt/set", "person . car .", qos=1).wait_for_publish(5)
        time.sleep(1.0)  # the flood reaches the bridge
        control.free.set()
        deadline = time.monotonic() + 5
        while "person . car ." not in control.prompts and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything still waiting in the bridge would follow now
        sent = control.prompts[mark:]
        assert sent and sent[-1] == "person . car .", sent[-3:]
        assert len(sent) < 10, f"{len(sent)} prompts sent to the daemon for 501 commands"
    finally:
        stop.set()
        thread.join(10)
        remote.close()
        control.close()
        bus.close()
        broker.stop()


@needs_broker
def test_home_assistant_online_flood_does_not_push_alerts_out(tmp_path):
    """Each `online` on homeassistant/status used to append every discovery config to the bounded outbox, pushing
    queued alerts out: a flood of them (anyone on the broker may publish one) lost alerts. Now it only marks the
    configs due; they are sent at most once a second, ahead of the queue, and evict nothing."""
    broker = Mosquitto(tmp_path / "broker").start()
    bus = FakeBus()
    config = MqttConfig(port=broker.port, homeassistant=True, queue_size=100)
    bridge, stop, thread = run_bridge(config, bus, prompts={"cam": "green star . black cross . purple square ."})
    announced = "homeassistant/sensor/groundwatch_cam/all_count/config"
    recorder = Recorder(broker.port, ["groundwatch/alerts", announced])
    try:
        deadline = time.monotonic() + 10
        while not recorder.select("groundwatch/alerts"):  # until the bridge's subscription to the bus is up
            assert time.monotonic() < deadline, "no alert went through the bridge"
            bus.send("cam", "alert", rule="probe")
            time.sleep(0.2)
        mark = recorder.mark()

        def flood() -> None:
            for _ in range(3000):
                recorder.client.publish("homeassistant/status", "online", qos=0)

        flooding = threading.Thread(target=flood)
        flooding.start()
        for n in range(50):
            bus.send("cam", "alert", rule="van", n=n)
            time.sleep(0.01)
        flooding.join()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(bridge.outbox) or bridge._sent > bridge._acked):
            time.sleep(0.1)
        time.sleep(0.3)  # the broker forwards the last ones
        alerts = [json.loads(p)["n"] for t, p, _ in recorder.select("groundwatch/alerts", mark)
                  if json.loads(p).get("rule") == "van"]
        assert alerts == list(range(50)) and bridge.dropped == 0, (alerts, bridge.dropped)
        time.sleep(1.5)  # an `online` within the last second is answered at the end of it
        assert 1 <= len(recorder.select(announced, mark)) <= 10
    finally:
        stop.set()
        thread.join(10)
        recorder.close()
        bus.close()
        broker.stop()
