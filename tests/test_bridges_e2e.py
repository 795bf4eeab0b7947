"""The MQTT bridge and webhooks with the real daemon, a real Mosquitto broker and real HTTP servers.

One daemon serves the module (starting one costs seconds on 2 cores): the bundled video (`loop = true`, so
that the stream is still running when the prompt changes) through the default model, `[mqtt]` with Home Assistant
discovery, and three webhooks (a good endpoint with a secret, and one that never answers). Tests run in file
order; the last one kills the daemon with SIGKILL and checks the broker's last will.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mqtt_broker import Mosquitto, Recorder, free_port, mosquitto_binary, retained_copy  # noqa: E402
from test_mqtt_bridge import (  # noqa: E402
    check_discovery_payload, documented_object_fields, documented_topics)
from daemon_harness import Collector, Daemon, loopback_endpoint  # noqa: E402

from streamer.client import status  # noqa: E402
from streamer.webhooks import SIGNATURE_HEADER, verify  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "green star . black cross . purple square . black ring ."
SECRET = "s3cret-for-tests"

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed (scripts/setup.sh)")


class Hook(BaseHTTPRequestHandler):
    """Keeps every POST (`server.received`); a `server.hanging` server never answers (until the test ends)."""

    release = threading.Event()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.hanging:
            self.server.held.append(body)
            self.release.wait(600)
            return
        self.server.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def http_server(hanging: bool = False) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    server.daemon_threads = True
    server.hanging, server.received, server.held = hanging, [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("bridges")
    broker = Mosquitto(root / "broker").start()
    request.addfinalizer(broker.stop)  # whatever fails below, the broker and the servers go
    good, hanging = http_server(), http_server(hanging=True)
    request.addfinalizer(good.shutdown)
    request.addfinalizer(hanging.shutdown)
    request.addfinalizer(Hook.release.set)  # first: lets the hanging handler threads end
    publish, control = loopback_endpoint(), loopback_endpoint()
    daemon = Daemon(root, publish=publish, control=control, config_text=f"""
[[streams]]
id = "demo"
url = "{REPO / 'streamer' / 'assets' / 'demo.mp4'}"
prompt = "{PROMPT}"
fps = 5
loop = true

[model]
weights = "default"
box_threshold = 0.3
batch_size = 4
short_side = 192
max_side = 256

[tracker]
high_score = 0.3
new_track_score = 0.3
low_score = 0.1
max_age = 5

[publish]
endpoint = "{publish}"
control_endpoint = "{control}"
heartbeat_seconds = 0.5

[record]
directory = "recordings"

[metrics]
enabled = false

[web]
enabled = false

[supervisor]
exit_when_done = false
restart_initial_seconds = 0.3

[mqtt]
port = {broker.port}
homeassistant = true
update_seconds = 0.5
reconnect_initial_seconds = 0.2
reconnect_max_seconds = 1

[[webhooks]]
url = "http://127.0.0.1:{good.server_address[1]}/hook"
kinds = ["track"]
secret = "{SECRET}"
headers = {{ Authorization = "Bearer test" }}

[[webhooks]]
url = "http://127.0.0.1:{hanging.server_address[1]}/hook"
kinds = ["detections", "track"]
timeout_seconds = 300
queue_size = 5
""")
    recorder = Recorder(broker.port, ["groundwatch/#", "homeassistant/#"])
    collector = Collector(publish)
    daemon.start()
    try:
        daemon.wait_ready(180)
        yield {"process": daemon.process, "broker": broker, "recorder": recorder, "collector": collector,
               "control": control, "good": good, "hanging": hanging, "root": root}
    finally:
        Hook.release.set()
        daemon.kill()
        collector.close()
        recorder.close()


def frigate_events(recorder: Recorder, since: int = 0) -> list[dict]:
    return [json.loads(payload) for _topic, payload, _ in recorder.select("groundwatch/events", since)]


def test_topics_and_payloads_match_the_docs(daemon):
    """Every topic the bridge publishes is documented, and each Frigate event carries exactly the documented
    fields with the documented types."""
    recorder = daemon["recorder"]
    recorder.wait_for(lambda m: m[0] == "groundwatch/events" and json.loads(m[1])["type"] == "end", 120,
                      "a Frigate 'end' event")
    assert recorder.select("groundwatch/available")[0][1] == b"online"
    documented = documented_topics()
    for topic, _payload, _ in recorder.select(prefix="groundwatch/"):
        assert any(pattern.fullmatch(topic) for pattern in documented), f"undocumented topic {topic}"
    fields = documented_object_fields()
    events = frigate_events(recorder)
    assert {e["type"] for e in events} >= {"new", "end"}
    for event in events:
        assert set(event) == {"type", "before", "after"}
        for side in ("before", "after"):
            obj = event[side]
            assert set(obj) == set(fields), set(obj) ^ set(fields)
            for name, types in fields.items():
                assert isinstance(obj[name], types), (name, obj[name])
            assert obj["camera"] == "demo"
            assert obj["label"] in ("green star", "black cross", "purple square", "black ring")
            x1, y1, x2, y2 = obj["box"]
            assert x1 <= x2 and y1 <= y2 and -320 < x1 and x2 < 640  # pixels (a box may overhang the edge)
            assert obj["area"] == (x2 - x1) * (y2 - y1)
            assert 0 <= obj["score"] <= obj["top_score"] <= 1
        if event["type"] == "new":
            assert event["before"] == event["after"] and event["after"]["end_time"] is None
        if event["type"] == "end":
            assert event["after"]["end_time"] >= event["after"]["start_time"]
            assert event["after"]["id"] == event["before"]["id"]
    ids = {e["after"]["id"] for e in events if e["type"] == "new"}
    assert ids >= {e["after"]["id"] for e in events if e["type"] == "end"}  # every ended object was announced
    # counts are integers per phrase; 'all' is their sum when they were last published together
    counts = {t: int(p) for t, p, _ in recorder.select(prefix="groundwatch/demo/") if t.count("/") == 2
              and t.rsplit("/", 1)[1] not in ("status",)}
    assert set(counts) >= {"groundwatch/demo/green_star", "groundwatch/demo/black_cross", "groundwatch/demo/all"}
    status_payload = json.loads(recorder.select("groundwatch/demo/status")[-1][1])
    assert status_payload["state"] in ("online", "offline") and status_payload["source"] == "file"
    assert recorder.select("groundwatch/demo/prompt/state")[0][1].decode() == PROMPT


def test_updates_are_throttled(daemon):
    """A busy scene must not flood the broker: per object at most one position update per update_seconds
    (0.5 s here), while the daemon sends a track event for that object on every frame."""
    events = frigate_events(daemon["recorder"])
    by_object: dict[str, list[float]] = {}
    for event in events:
        if event["type"] == "update" and event["before"]["current_zones"] == event["after"]["current_zones"]:
            by_object.setdefault(event["after"]["id"], []).append(event["after"]["frame_time"])
    track_updates = len(daemon["collector"].select(kind="track", event="updated"))
    assert sum(len(v) for v in by_object.values()) < track_updates / 2


def test_home_assistant_discovery_validates(daemon):
    """Discovery configs per stream: a binary sensor and a count sensor per phrase (and for all), the prompt as
    a text entity, all on one device; each validates against Home Assistant's documented keys."""
    recorder = daemon["recorder"]
    configs = {t: json.loads(p) for t, p, _ in recorder.select(prefix="homeassistant/") if p}
    slugs = ["green_star", "black_cross", "purple_square", "black_ring", "all"]
    for slug in slugs:
        assert f"homeassistant/binary_sensor/groundwatch_demo/{slug}_present/config" in configs
        assert f"homeassistant/sensor/groundwatch_demo/{slug}_count/config" in configs
    assert "homeassistant/text/groundwatch_demo/prompt/config" in configs
    for topic, payload in configs.items():
        component = topic.split("/")[1]
        check_discovery_payload(component, payload)
        assert payload["device"]["identifiers"] == ["groundwatch_demo"]
    unique_ids = [p["unique_id"] for p in configs.values()]
    assert len(unique_ids) == len(set(unique_ids))


def test_prompt_set_over_mqtt_changes_later_detections(daemon):
    """A prompt published on <prefix>/<stream>/prompt/set reaches the daemon: the state topic answers with it,
    later frames are detected with it (no other phrase), and discovery drops the phrases that left."""
    recorder, collector = daemon["recorder"], daemon["collector"]
    mark, event_mark = recorder.mark(), collector.mark()
    new_prompt = "purple square ."
    recorder.client.publish("groundwatch/demo/prompt/set", new_prompt, qos=1)
    recorder.wait_for(lambda m: m[0] == "groundwatch/demo/prompt/state" and m[1] == new_prompt.encode(), 180,
                      "the new prompt on prompt/state")
    changed = collector.wait_for(180, "demo", "status", since=event_mark, reason="prompt_changed")[0]
    assert changed["prompt"] == new_prompt
    deadline = time.monotonic() + 180
    found = []
    while not found and time.monotonic() < deadline:  # the purple square is in the video: it will be found
        later = collector.select("demo", "detections", since=event_mark, prompt=new_prompt)
        found = [event for event in later if event["detections"]]
        time.sleep(0.2)
    assert found, "no detection with the new prompt"
    phrases = {d["phrase"] for event in later for d in event["detections"]}
    assert phrases <= {"purple square", "purple", "square"}, phrases
    cleared = {t for t, p, _ in recorder.select(since=mark, prefix="homeassistant/") if p == b""}
    assert "homeassistant/binary_sensor/groundwatch_demo/green_star_present/config" in cleared
    new_labels = {e["after"]["label"] for e in frigate_events(recorder, mark) if e["type"] == "new"}
    assert new_labels <= {"purple square", "purple", "square"}, new_labels
    assert status(daemon["control"])["streams"]["demo"]["prompt"] == new_prompt


def test_broker_restart_republishes_state_and_loses_nothing_after(daemon):
    """Mosquitto restarted mid-run (without persistence: its retained messages are gone). The bridge reconnects
    with backoff, publishes its retained state again, and every object the daemon starts tracking after the
    bridge is back reaches the broker."""
    recorder, collector, broker = daemon["recorder"], daemon["collector"], daemon["broker"]
    recorder.client.publish("groundwatch/demo/prompt/set", PROMPT, qos=1)
    collector.wait_for(180, "demo", "status", reason="prompt_changed", prompt=PROMPT)
    recorder.connected.clear()
    mark = recorder.mark()
    broker.restart(down_seconds=1.5)
    assert recorder.connected.wait(15)
    # A new subscriber gets the broker's retained messages (flagged retained): after a restart without
    # persistence they exist only because the bridge published them again.
    assert retained_copy(broker.port, "groundwatch/available", 30) == b"online"
    back_at = time.time()
    for topic in ("groundwatch/demo/green_star", "groundwatch/demo/all", "groundwatch/demo/status",
                  "homeassistant/sensor/groundwatch_demo/green_star_count/config"):
        assert retained_copy(broker.port, topic)
    assert retained_copy(broker.port, "groundwatch/demo/prompt/state").decode() == PROMPT
    deadline = time.monotonic() + 180
    started = []
    while not started and time.monotonic() < deadline:
        started = [e for e in collector.select("demo", "track", event="started") if e["wall"] > back_at + 0.5]
        time.sleep(0.2)
    assert started, "no track started after the broker came back"
    time.sleep(2.0)
    announced = {e["after"]["track_id"] for e in frigate_events(recorder, mark) if e["type"] == "new"}
    assert {e["track_id"] for e in started} <= announced


def test_webhooks_signed_and_a_hanging_endpoint_costs_nothing(daemon):
    """The good endpoint gets signed track events (the signature verifies over the body as received). The
    endpoint that never answers holds a request; its queue stays at 5 (oldest dropped, counted) while frames
    keep flowing through the daemon."""
    good = daemon["good"]
    deadline = time.monotonic() + 30
    while len(good.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(good.received) >= 3
    for headers, body in good.received[:20]:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert verify(SECRET, body, lowered[SIGNATURE_HEADER.lower()])
        assert lowered["authorization"] == "Bearer test"
        document = json.loads(body)
        assert document["event"]["kind"] == "track" and document["event"]["stream"] == "demo"
        assert lowered["x-groundwatch-delivery"] == document["delivery"]
    assert 1 <= len(daemon["hanging"].held) <= 2  # the request the endpoint holds, unanswered (5 min timeout)
    before = status(daemon["control"])["streams"]["demo"]
    deadline = time.monotonic() + 120
    after = before
    while after["frames_processed"] < before["frames_processed"] + 5 and time.monotonic() < deadline:
        time.sleep(0.5)
        after = status(daemon["control"])["streams"]["demo"]
    assert after["frames_processed"] >= before["frames_processed"] + 5, "the pipeline stalled"
    assert after["webhook_dropped"] > before["webhook_dropped"] > 0
    assert after["webhook_delivered"] >= 3


def test_last_will_after_kill_9(daemon):
    """SIGKILL of the bridge: the broker publishes its last will ('offline'); the supervisor restarts the
    bridge, which comes back 'online'. Then SIGKILL of the whole daemon: 'offline' again."""
    recorder, process = daemon["recorder"], daemon["process"]
    pid = status(daemon["control"])["processes"]["mqtt"]["pid"]
    mark = recorder.mark()
    os.kill(pid, signal.SIGKILL)
    recorder.wait_for(lambda m: m[0] == "groundwatch/available" and m[1] == b"offline", 15,
                      "the last will after kill -9 of the bridge", since=mark)
    recorder.wait_for(lambda m: m[0] == "groundwatch/available" and m[1] == b"online", 30,
                      "'online' from the restarted bridge", since=mark)
    assert status(daemon["control"])["processes"]["mqtt"]["restarts"] >= 1
    mark = recorder.mark()
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    recorder.wait_for(lambda m: m[0] == "groundwatch/available" and m[1] == b"offline", 15,
                      "the last will after kill -9 of the daemon", since=mark)


def test_unreachable_broker_at_start_daemon_runs_and_reports(tmp_path):
    """[mqtt] names a broker where nothing listens: the daemon starts anyway, processes its file to the end,
    says so in an error event (mqtt_unreachable) and in every heartbeat (mqtt_state: disconnected)."""
    from gdino.shapes import render_video

    from streamer.media import write_video

    frames, _ = render_video(1, 8, (120, 160), 10)
    write_video(tmp_path / "clip.mp4", frames, fps=10)
    publish, control = loopback_endpoint(), loopback_endpoint()
    daemon = Daemon(tmp_path, publish=publish, control=control, config_text=f"""
[[streams]]
id = "clip"
url = "clip.mp4"
prompt = "red circle ."

[model]
weights = "tiny"
short_side = 96
max_side = 128

[publish]
endpoint = "{publish}"
control_endpoint = "{control}"
heartbeat_seconds = 0.3

[record]
directory = "recordings"

[metrics]
enabled = false

[web]
enabled = false

[supervisor]
exit_when_done = false

[mqtt]
port = {free_port()}
reconnect_initial_seconds = 0.2
reconnect_max_seconds = 1
""")
    collector = Collector(publish)
    daemon.start()
    try:
        daemon.wait_ready(180)
        error = collector.wait_for(60, "clip", "error", error_type="mqtt_unreachable")[0]
        assert "cannot reach the MQTT broker at 127.0.0.1:" in error["message"]
        collector.wait_for(300, "clip", "status", reason="end_of_file")
        heartbeat = collector.wait_for(10, "clip", "heartbeat", since=collector.mark())[0]
        assert heartbeat["mqtt_state"] == "disconnected" and heartbeat["frames_processed"] == 8
        assert status(control)["processes"]["mqtt"]["alive"]
    finally:
        code = daemon.stop(60)
        collector.close()
    assert code == 0, daemon.log()[-3000:]
