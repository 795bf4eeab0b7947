"""The web console's parts without a model: config rules, previews (worker side and hub), the bus's per-viewer
queues, recordings, and access control on the real ASGI app served by uvicorn on a loopback port.
The browser tests with a real daemon are in test_web_browser.py."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import zmq

from streamer import cli
from streamer.client import subscribe
from streamer.config import ConfigError, parse_config
from streamer.events import make_event
from streamer.frames import FrameMailbox
from streamer.hub import Hub
from streamer.inference import InferenceWorker, build_tracker
from streamer.media import write_video
from streamer.process import EventSender
from streamer.recording import Recorder, read_events
from streamer.stats import StreamStats
from streamer.web.auth import ADMIN, VIEWER, role_of
from streamer.web.bus import Bus, Viewer
from streamer.web.preview import PreviewEncoder, PreviewSettings, encode_jpeg, preview_size
from streamer.web.recordings import NotFound, VideoCache, list_recordings, recording_events
from streamer.web.settings import WebSettings, WebStream
from tracker import TrackerConfig

MINIMAL = {"streams": [{"id": "cam", "url": "rtsp://127.0.0.1:1/x", "prompt": "a person ."}]}


# -- config -------------------------------------------------------------------------------------------------------


def test_non_loopback_host_needs_a_token(monkeypatch):
    monkeypatch.delenv("GROUNDWATCH_WEB_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="web.host: '0.0.0.0' is beyond loopback; set web.token"):
        parse_config({**MINIMAL, "web": {"host": "0.0.0.0"}})
    config = parse_config({**MINIMAL, "web": {"host": "0.0.0.0", "token": "t" * 20}})
    assert config.web.token == "t" * 20
    monkeypatch.setenv("GROUNDWATCH_WEB_TOKEN", "e" * 24)
    assert parse_config({**MINIMAL, "web": {"host": "0.0.0.0"}}).web.token == "e" * 24
    assert parse_config({**MINIMAL, "web": {"host": "::1"}}).web.is_loopback
    with pytest.raises(ConfigError, match="at least 16"):
        parse_config({**MINIMAL, "web": {"token": "short"}})
    with pytest.raises(ConfigError, match="must differ"):
        parse_config({**MINIMAL, "web": {"token": "x" * 16, "read_token": "x" * 16}})


def test_daemon_refuses_to_start_beyond_loopback_without_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GROUNDWATCH_WEB_TOKEN", raising=False)
    config = tmp_path / "c.toml"
    config.write_text('[[streams]]\nid = "a"\nurl = "rtsp://127.0.0.1:1/x"\nprompt = "p"\n[web]\nhost = "0.0.0.0"\n')
    assert cli.main(["run", str(config)]) == 2
    assert "set web.token" in capsys.readouterr().err


# -- previews -----------------------------------------------------------------------------------------------------


def test_preview_is_downscaled_never_upscaled_and_rate_capped():
    assert preview_size(1920, 1080, 360) == (640, 360)
    assert preview_size(160, 120, 360) == (160, 120)
    pixels = np.zeros((1080, 1920, 3), np.uint8)
    pixels[:, :960] = (255, 0, 0)
    jpeg, width, height = encode_jpeg(pixels, 360, 75)
    import cv2

    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert decoded.shape == (360, 640, 3) and (width, height) == (640, 360)
    assert decoded[180, 100, 0] > 200 and decoded[180, 500, 0] < 50  # left half red: RGB order kept

    clock = [100.0]
    encoder = PreviewEncoder(PreviewSettings(fps=5, short_side=64), clock=lambda: clock[0])
    sent = []
    for index in range(100):  # 10 s of a 10 fps stream
        clock[0] = 100 + index / 10
        message = encoder.maybe_encode("door", index, pixels[:100, :100], ts=index / 10, pts=index / 10,
                                       decoded_at=1000 + index / 10)
        if message is not None:
            sent.append(message)
    assert 49 <= len(sent) <= 51
    topic, header, jpeg = sent[1]
    header = json.loads(header)
    assert topic == b"door/preview" and jpeg[:2] == b"\xff\xd8"
    assert header["frame"] == 2 and header["width"] == 64 and header["source_width"] == 100


def test_worker_sends_a_preview_after_the_detections_of_its_frame(tmp_path):
    """The page pairs a picture with the boxes of the same frame index, so the preview must carry that index and
    follow its detections; the pixels are encoded before the mailbox slot is released. No console, no previews."""
    import itertools

    import fakes as helpers

    always_due = itertools.count(0, 10).__next__
    for previews in (PreviewEncoder(PreviewSettings(fps=1), clock=always_due), None):
        stats = StreamStats(f"/dev/shm/groundwatch-{time.time_ns()}-webtest", ["a"], _create=True)
        mailbox = FrameMailbox.create(f"test-preview-{time.time_ns()}", 4, 32, 24, threading.Lock())
        sender = _ListSender()
        try:
            worker = InferenceWorker(detector=helpers.FakeDetector(), streams=[
                helpers.stream_config("a", False, "thing .")], mailboxes={"a": mailbox}, stats=stats,
                sender=sender, tracker_factory=lambda: build_tracker(TrackerConfig()), previews=previews)
            for value in (1, 2, 3):
                mailbox.put(helpers.frame_with_value(value * 60), frame_index=value, pts=value / 10, ts=value / 10,
                            live=False)
            while worker.step():
                pass
        finally:
            mailbox.close()
            mailbox.unlink()
            stats.close()
            stats.unlink()
        shown = [m for m in sender.messages if m[0].endswith((b"/detections", b"/preview"))]
        if previews is None:
            assert [m[0] for m in shown] == [b"a/detections"] * 3
            continue
        assert [(m[0].split(b"/")[1], json.loads(m[1])["frame"]) for m in shown] == [
            (b"detections", 1), (b"preview", 1), (b"detections", 2), (b"preview", 2), (b"detections", 3),
            (b"preview", 3)]
        import cv2

        for message, value in zip(shown[1::2], (1, 2, 3)):
            picture = cv2.imdecode(np.frombuffer(message[2], np.uint8), cv2.IMREAD_GRAYSCALE)
            assert abs(int(picture.mean()) - value * 60) <= 3  # that frame's pixels, not a later one's


def test_a_file_finishes_beside_a_camera_that_always_has_a_frame():
    """A file stream next to a live one never went offline (end_of_file) while the worker was busy: the worker
    only looked for finished files in rounds with no frame at all, and a camera always has one; the console then
    showed the finished file as online forever."""
    import fakes as helpers

    stats = StreamStats(f"/dev/shm/groundwatch-{time.time_ns()}-webtest", ["cam", "file"], _create=True)
    mailboxes = {name: FrameMailbox.create(f"test-finish-{name}-{time.time_ns()}", 4, 32, 24, threading.Lock())
                 for name in ("cam", "file")}
    sender = _ListSender()
    try:
        worker = InferenceWorker(detector=helpers.FakeDetector(), streams=[
            helpers.stream_config("cam", True, "thing ."), helpers.stream_config("file", False, "thing .")],
            mailboxes=mailboxes, stats=stats, sender=sender,
            tracker_factory=lambda: build_tracker(TrackerConfig()), batch_size=2)
        for index in range(2):
            mailboxes["file"].put(helpers.frame_with_value(50), frame_index=index, pts=index / 10, ts=index / 10,
                                  live=False)
        mailboxes["file"].finish(1)  # end of file
        for index in range(10):  # the camera has a new frame every round
            mailboxes["cam"].put(helpers.frame_with_value(90), frame_index=index, pts=0, ts=time.time(), live=True)
            assert worker.step() >= 1
    finally:
        for mailbox in mailboxes.values():
            mailbox.close()
            mailbox.unlink()
        stats.close()
        stats.unlink()
    statuses = [json.loads(m[1]) for m in sender.messages if m[0] == b"file/status"]
    assert [(e["state"], e["reason"]) for e in statuses] == [("offline", "end_of_file")]


class _ListSender:
    def __init__(self):
        self.messages, self.dropped = [], 0

    def send(self, event):
        from streamer.events import pack_internal

        self.messages.append(pack_internal(event))
        return True

    def send_frames(self, frames):
        self.messages.append(list(frames))
        return True


def test_hub_passes_previews_through_without_seq_or_recording(tmp_path):
    """Previews must reach PUB untouched, never enter the event log, and leave the events' seq gap-free."""
    pull = f"ipc://{tmp_path}/pull"
    pub = f"ipc://{tmp_path}/pub"
    recorder = Recorder(tmp_path / "rec", ["door"], 0.1, stamp="run")
    hub = Hub(pull_endpoint=pull, pub_endpoint=pub, high_water_mark=1000, heartbeat_seconds=60, stats=None,
              recorder=recorder)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(pub)
    time.sleep(0.3)  # slow joiner
    sender = EventSender(pull)
    import itertools

    encoder = PreviewEncoder(PreviewSettings(fps=1), clock=itertools.count(0, 10).__next__)  # always due
    for index in range(3):
        sender.send(make_event("door", "detections", frame=index, detections=[]))
        sender.send_frames(encoder.maybe_encode("door", index, np.zeros((8, 8, 3), np.uint8), ts=0, pts=0,
                                                decoded_at=0))
    received = []
    deadline = time.monotonic() + 10
    while len(received) < 6 and time.monotonic() < deadline:
        hub.drain()
        while sub.poll(50):
            received.append(sub.recv_multipart())
    sender.close()
    hub.close()
    sub.close()
    assert [len(m) for m in received] == [2, 3] * 3
    assert [json.loads(m[1])["seq"] for m in received if len(m) == 2] == [1, 2, 3]
    assert all("seq" not in json.loads(m[1]) for m in received if len(m) == 3)
    logged = list(read_events(tmp_path / "rec" / "door" / "events-run.jsonl"))
    assert [e["kind"] for e in logged] == ["detections"] * 3 and hub.previews_published == 3


def test_subscribers_skip_previews(tmp_path):
    """`groundwatch subscribe` used to unpack every message as [topic, payload]; a three-frame preview on the same
    PUB socket would have crashed it."""
    endpoint = f"ipc://{tmp_path}/pub"
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    event = json.dumps({"v": 1, "seq": 1, "stream": "door", "kind": "status", "state": "online"}).encode()

    def publish():
        time.sleep(0.3)
        pub.send_multipart([b"door/preview", b'{"frame":1}', b"\xff\xd8jpeg"])
        pub.send_multipart([b"door/status", event])

    threading.Thread(target=publish).start()
    received = list(subscribe(endpoint, timeout=3, count=1))
    pub.close()
    assert [e["kind"] for e in received] == ["status"]


# -- the bus --------------------------------------------------------------------------------------------------------


def test_slow_viewer_loses_previews_not_events_and_never_blocks():
    async def scenario():
        bus = Bus("inproc://unused", queue_size=5)
        fast, slow = bus.add_viewer({"door"}), bus.add_viewer({"door"})
        for index in range(20):
            header = json.dumps({"stream": "door", "frame": index}).encode()
            started = time.perf_counter()
            bus.dispatch([b"door/preview", header, b"\xff\xd8" + bytes(1000)])
            bus.dispatch([b"door/detections", json.dumps({"v": 1, "stream": "door", "kind": "detections",
                                                          "frame": index}).encode()])
            assert time.perf_counter() - started < 0.05  # fan-out never waits for a viewer
            fast.take()
        taken = slow.take().decode()
        return fast, slow, taken, bus

    fast, slow, taken, bus = asyncio.run(scenario())
    assert fast.previews_dropped == 0 and fast.events_dropped == 0
    assert slow.previews_dropped == 19  # only the newest preview was kept for it
    assert slow.events_dropped == 15  # its event queue holds 5; the oldest went
    assert taken.count("event: preview") == 1 and '"frame":19' in taken
    assert taken.index('"kind": "detections", "frame": 19') < taken.index("event: preview")
    assert bus.counters()["previews_dropped"] == 19


def test_a_page_opened_later_gets_the_last_picture_with_its_boxes():
    """A finished file used to show "waiting for video" forever to a page opened after its last preview."""
    async def scenario():
        bus = Bus("inproc://unused")
        for frame in (7, 8):
            bus.dispatch([b"door/detections", json.dumps({"v": 1, "stream": "door", "kind": "detections",
                                                          "frame": frame}).encode()])
        bus.dispatch([b"door/preview", json.dumps({"stream": "door", "frame": 8}).encode(), b"\xff\xd8"])
        return bus.add_viewer({"door"}).take().decode(), bus.add_viewer(set()).take()

    shown, nothing = asyncio.run(scenario())
    assert '"frame": 8' in shown and '"frame": 7' not in shown and 'event: preview\ndata: {"cached":true,' in shown
    assert nothing == b""


def test_cached_copies_from_the_hub_reach_pages_once():
    """The hub re-sends each stream's last status to every new subscriber (last-value cache); the console relayed
    every copy, so each page that opened elsewhere added the same status to every open page's events list."""
    async def scenario():
        bus = Bus("inproc://unused")
        viewer = bus.add_viewer(set())
        status = {"v": 1, "seq": 4, "stream": "door", "kind": "status", "state": "offline"}
        bus.dispatch([b"door/status", json.dumps({**status, "cached": True}).encode()])  # ours, on connecting
        bus.dispatch([b"door/status", json.dumps({**status, "cached": True}).encode()])  # another subscriber's
        bus.dispatch([b"door/status", json.dumps({**status, "seq": 9}).encode()])
        bus.dispatch([b"door/status", json.dumps({**status, "seq": 9, "cached": True}).encode()])
        return viewer.take().decode(), bus

    relayed, bus = asyncio.run(scenario())
    assert relayed.count('"seq": 4') == 1 and relayed.count('"seq": 9') == 1
    assert [e["seq"] for e in bus.recent] == [4, 9]


def test_bus_keeps_state_for_new_pages_and_counts_malformed_messages():
    bus = Bus("inproc://unused")
    bus.dispatch([b"door/heartbeat", b'{"v":1,"stream":"door","kind":"heartbeat","fps":2}'])
    bus.dispatch([b"door/status", b'{"v":1,"stream":"door","kind":"status","state":"offline"}'])
    bus.dispatch([b"door/status", b'{"v":2,"stream":"door","kind":"status"}'])
    bus.dispatch([b"a", b"b", b"c", b"d"])
    snapshot = bus.snapshot()
    assert snapshot["heartbeats"]["door"]["fps"] == 2 and snapshot["statuses"]["door"]["state"] == "offline"
    assert [e["kind"] for e in snapshot["recent"]] == ["status"]
    assert bus.received["malformed"] == 2


# -- recordings -----------------------------------------------------------------------------------------------------


def copy_to_segment(video, segment) -> None:
    """A recorded camera segment: the video's packets copied into MPEG-TS, as the daemon's segmenter writes them."""
    import av

    with av.open(str(video)) as source, av.open(str(segment), "w", format="mpegts") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def test_recordings_of_files_and_camera_segments(tmp_path):
    frames = np.zeros((10, 48, 64, 3), np.uint8)
    video = write_video(tmp_path / "clip.mp4", frames, fps=10)
    segments = tmp_path / "rec" / "cam" / "video"
    segments.mkdir(parents=True)
    import av

    start_ms = 1_764_000_000_000
    copy_to_segment(video, segments / f"{start_ms}.ts")
    recorder = Recorder(tmp_path / "rec", ["cam", "file"], stamp="20261127T120000Z-1")
    for stream, ts in (("cam", start_ms / 1000 + 0.5), ("cam", start_ms / 1000 - 60), ("file", 0.3)):
        recorder.append(stream, json.dumps({"v": 1, "stream": stream, "kind": "detections", "ts": ts, "frame": 3,
                                            "pts": 0.3, "detections": []}).encode())
    recorder.close()
    settings = WebSettings(publish_endpoint="inproc://x", control_endpoint="inproc://y", record_directory=str(
        tmp_path / "rec"), streams=(WebStream("cam", True, None, str(segments)), WebStream("file", False, str(video),
                                                                                           None)))
    listed = list_recordings(settings)
    assert [r["id"] for r in listed["cam"]] == [f"segment-{start_ms}"]
    assert listed["file"] == [{"id": "20261127T120000Z-1", "kind": "run", "started": 1795780800.0, "size": listed[
        "file"][0]["size"], "video": True}]
    cam, file = settings.streams
    replay = recording_events(settings, cam, f"segment-{start_ms}")
    assert replay["align"] == "ts" and len(replay["events"]) == 1  # the event a minute earlier is not this segment's
    assert recording_events(settings, file, "20261127T120000Z-1")["align"] == "pts"
    mp4 = VideoCache().video_for(cam, f"segment-{start_ms}")
    with av.open(str(mp4)) as container:
        assert container.format.name.startswith("mov") and sum(1 for _ in container.decode(video=0)) == 10
    assert VideoCache().video_for(file, "20261127T120000Z-1") == video
    for bad in ("../../etc/passwd", "segment-../x", "segment-1", "20261127T120000Z-1/../../x"):
        with pytest.raises(NotFound):
            recording_events(settings, cam, bad)


@pytest.mark.parametrize("bad", [
    pytest.param(b"[" * 5000, id="deeply-nested"),  # RecursionError from the parser (its limit is 1000)
    pytest.param(b'{"kind": "detections", "ts": ' + b"1" * 400 + b"}", id="ts-beyond-float"),  # OverflowError
    pytest.param(b'{"kind": "detections", "ts": 1764000000.5, "score": NaN}', id="nan"),  # no JSON reply holds it
    pytest.param(b'{"kind": "detections", "ts": 1e400}', id="infinite-ts"),
])
def test_one_bad_log_line_or_stray_file_never_breaks_the_recordings_api(tmp_path, bad):
    """One deeply nested line in an event log (RecursionError: only ValueError was caught), one `ts` too large for a
    float (OverflowError in the bisection of read_events_between), or a stray `backup.ts` beside the segments
    (int('backup')) made the console's recordings API answer 500 (found by an audit). A NaN or an infinity, which
    the daemon never writes, passed the reader and broke the JSON reply; a segment gone between listing and
    `stat()` broke the listing. Each bad line is skipped, stray files are not listed, and the rest is served."""
    start_ms = 1_764_000_000_000
    segments = tmp_path / "rec" / "cam" / "video"
    segments.mkdir(parents=True)
    (segments / f"{start_ms}.ts").write_bytes(b"")
    for stray in ("backup.ts", "\u00b2.ts", "123.ts"):  # not a segment's name (a superscript two is isdigit())
        (segments / stray).write_bytes(b"")
    (segments / f"{start_ms - 60_000}.ts").symlink_to(tmp_path / "gone.ts")  # as if retention deleted it just now
    (tmp_path / "rec" / "file").mkdir()

    def good(seq: int) -> bytes:
        return json.dumps({"v": 1, "seq": seq, "stream": "cam", "kind": "detections", "ts": start_ms / 1000 + seq / 100,
                           "detections": []}).encode()

    # Large enough to be bisected, with a bad line wherever the bisection lands.
    body = b"".join((bad if seq % 2 else good(seq)) + b"\n" for seq in range(1000))
    (tmp_path / "rec" / "cam" / "events-20261127T120000Z-1.jsonl").write_bytes(body)
    (tmp_path / "rec" / "file" / "events-20261127T120000Z-1.jsonl").write_bytes(body)
    settings = WebSettings(publish_endpoint="inproc://x", control_endpoint="inproc://y",
                           record_directory=str(tmp_path / "rec"),
                           streams=(WebStream("cam", True, None, str(segments)),
                                    WebStream("file", False, str(tmp_path / "none.mp4"), None)))
    cam, file = settings.streams
    assert [r["id"] for r in list_recordings(settings)["cam"]] == [f"segment-{start_ms}"]
    for stream, recording in ((cam, f"segment-{start_ms}"), (file, "20261127T120000Z-1")):
        found = recording_events(settings, stream, recording)
        # (a file's run lines up by `pts`: an event whose `ts` no float holds is still one, and still serialisable)
        assert [e["seq"] for e in found["events"] if "seq" in e] == list(range(0, 1000, 2)), recording
        json.dumps(found, allow_nan=False)  # what the route's JSONResponse does
    for stray in ("segment-backup", "segment-123"):
        with pytest.raises(NotFound):
            recording_events(settings, cam, stray)


# -- access ---------------------------------------------------------------------------------------------------------


TOKEN, READ_TOKEN = "admin-token-0123456789", "viewer-token-0123456789"


def test_role_of_tokens():
    assert role_of(None, None, None) == ADMIN  # no token configured: loopback only, full access
    assert role_of(TOKEN, TOKEN, READ_TOKEN) == ADMIN
    assert role_of(READ_TOKEN, TOKEN, READ_TOKEN) == VIEWER
    for wrong in (None, "", TOKEN[:-1], TOKEN + "x", "é"):
        assert role_of(wrong, TOKEN, READ_TOKEN) is None


@pytest.fixture
def served(tmp_path):
    """The real app on uvicorn, with tokens, on a free loopback port (no daemon: nothing here reaches it)."""
    from streamer.web.server import bind_listener, serve

    settings = WebSettings(publish_endpoint=f"ipc://{tmp_path}/pub", control_endpoint=f"ipc://{tmp_path}/control",
                           record_directory=str(tmp_path), streams=(WebStream("door", True, None, None),),
                           token=TOKEN, read_token=READ_TOKEN, loopback=True)
    listener = bind_listener("127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, listener, stop), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(url + "/", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    yield url
    stop.set()
    thread.join(10)
    listener.close()


ROUTES = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/console.css"), ("GET", "/api/streams"),
          ("GET", "/api/live?previews=door"), ("GET", "/api/events"), ("POST", "/api/streams/door/prompt"),
          ("GET", "/api/recordings"), ("GET", "/api/recordings/door/segment-1764000000000/events"),
          ("GET", "/api/recordings/door/segment-1764000000000/video"), ("POST", "/logout"), ("GET", "/no/such/route")]


def test_every_route_needs_the_token(served):
    """A wrong or missing token gets 401 on every route, the live stream and static files included; the token in
    the URL is not accepted (URLs end up in logs)."""
    with httpx.Client(base_url=served, timeout=10) as client:
        for method, path in ROUTES:
            for headers in ({}, {"authorization": "Bearer wrong-token-000000000"}, {"authorization": TOKEN},
                            {"cookie": "groundwatch_token=nope"}):
                reply = client.request(method, path, headers=headers, json={"prompt": "a cat ."})
                assert reply.status_code == 401, (method, path, headers, reply.status_code)
            separator = "&" if "?" in path else "?"
            assert client.request(method, f"{path}{separator}token={TOKEN}").status_code == 401
        reply = client.get("/", headers={"accept": "text/html"})
        assert reply.status_code == 401 and 'action="/login"' in reply.text  # a person gets the sign-in form
        assert client.post("/login", data={"token": "wrong"}).status_code == 401
        admin = {"authorization": f"Bearer {TOKEN}"}
        viewer = {"authorization": f"Bearer {READ_TOKEN}"}
        assert client.get("/", headers=admin).status_code == 200
        assert client.get("/static/app.js", headers=viewer).status_code == 200
        assert client.get("/no/such/route", headers=viewer).status_code == 404
        reply = client.post("/api/streams/door/prompt", headers=viewer, json={"prompt": "a cat ."})
        assert reply.status_code == 403 and "may view but not change prompts" in reply.json()["error"]
        with client.stream("GET", "/api/live", headers=viewer) as live:
            assert live.status_code == 200 and live.headers["content-type"].startswith("text/event-stream")
            first = next(live.iter_lines())
            assert first.startswith("retry:")


def test_login_form_sets_an_httponly_cookie(served):
    with httpx.Client(base_url=served, timeout=10) as client:
        reply = client.post("/login", data={"token": READ_TOKEN})
        assert reply.status_code == 303
        cookie = reply.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        reply = client.get("/api/streams")  # the cookie now goes with every request
        assert reply.status_code == 200 and reply.json()["role"] == "viewer"
        assert reply.json()["can_change_prompts"] is False


def test_demo_prints_the_console_address(tmp_path, monkeypatch, capsys):
    """`groundwatch demo` must tell a new user where the page is (the daemon binds it; 8080 when free)."""
    from streamer.daemon import Supervisor

    def run(self, on_ready=None):  # the daemon's own binding and announcement, without a model
        self._bind_web()
        try:
            on_ready(self)
        finally:
            self.web_listener.close()
        return 1

    monkeypatch.setattr(Supervisor, "run", run)
    monkeypatch.setattr(Supervisor, "install_signal_handlers", lambda self: None)
    assert cli.main(["demo", "--weights", "tiny", "-o", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "console at" in line)
    assert line.startswith("groundwatch demo: console at http://127.0.0.1:") and "--stay" in line


def _serve_forever(settings, listener, stop) -> None:
    from streamer.web.server import serve

    serve(settings, listener, stop)


def test_a_killed_web_process_cannot_hang_the_supervisors_shutdown(tmp_path):
    """The web process used to sleep in `stop.wait()`; killed there (a crash, an OOM kill), it left the
    multiprocessing Event counting a sleeper that never wakes, and the supervisor's `stop.set()` at shutdown
    blocked forever."""
    import multiprocessing
    import signal

    from streamer.web.server import bind_listener

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    settings = WebSettings(publish_endpoint=f"ipc://{tmp_path}/pub", control_endpoint=f"ipc://{tmp_path}/control",
                           record_directory=None, streams=())
    listener = bind_listener("127.0.0.1", 0)
    process = context.Process(target=_serve_forever, args=(settings, listener, stop), daemon=True)
    process.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api/events"
    deadline = time.monotonic() + 60
    while True:  # serving: its stop watcher is running
        try:
            httpx.get(url, timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the web process did not start"
            time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    setter = threading.Thread(target=stop.set, daemon=True)
    setter.start()
    setter.join(5)
    listener.close()
    assert not setter.is_alive(), "stop.set() blocked: a dead process still counts as waiting on the Event"


def test_a_segments_events_are_found_without_reading_the_whole_log(tmp_path):
    """Each replay of a camera segment parsed every event log of the stream from the first byte (a week of a
    camera's events is gigabytes; found by an audit). The window is now found by bisecting the log, which is in
    `ts` order up to a minute: the events must be exactly those a full read finds, with out-of-order, torn,
    non-JSON and ts-less lines in the log, at windows before, inside, across and after it."""
    from streamer.recording import read_events_between

    rng = np.random.default_rng(0)
    path = tmp_path / "events-20261127T120000Z-1.jsonl"
    lines = []
    for n in range(30_000):
        ts = 1_764_000_000 + n * 0.1 + float(rng.uniform(-20, 20)) * (n % 7 == 0)  # some logged 20 s late/early
        lines.append(json.dumps({"v": 1, "seq": n + 1, "stream": "cam", "kind": "detections", "ts": ts,
                                 "detections": []}).encode() + b"\n")
        if n % 5000 == 17:
            lines.append(b"not json\n" if n % 2 else b'{"kind": "status"}\n')  # no ts
    path.write_bytes(b"".join(lines) + b'{"v": 1, "ts": 1764001')  # a torn last line
    assert path.stat().st_size > 1_000_000
    every = [e for e in read_events(path) if isinstance(e.get("ts"), float)]
    origin = 1_764_000_000
    for start, end in ((origin - 500, origin - 100), (origin - 5, origin + 7), (origin + 1234.5, origin + 1294.5),
                       (origin + 2990, origin + 3100), (origin + 2000, float("inf")), (origin + 4000, origin + 5000)):
        expected = [e["seq"] for e in every if start <= e["ts"] < end]
        assert [e["seq"] for e in read_events_between(path, start, end)] == expected, (start, end)


def test_a_runs_replay_is_capped_so_a_run_of_days_cannot_fill_the_consoles_memory(tmp_path, monkeypatch):
    """A whole run's events were read into one list and one JSON answer: a looped file's run grows for days, and
    one replay request could make the console's process run out of memory (found by an audit). The answer holds
    the run's first MAX_REPLAY_EVENTS and says it was cut."""
    from streamer.web import recordings

    monkeypatch.setattr(recordings, "MAX_REPLAY_EVENTS", 50)
    recorder = Recorder(tmp_path / "rec", ["file"], stamp="20261127T120000Z-1")
    for n in range(200):
        recorder.append("file", json.dumps({"v": 1, "seq": n + 1, "stream": "file", "kind": "detections",
                                            "ts": n * 0.1, "pts": n * 0.1, "frame": n, "detections": []}).encode())
    recorder.close()
    settings = WebSettings(publish_endpoint="inproc://x", control_endpoint="inproc://y",
                           record_directory=str(tmp_path / "rec"), streams=(WebStream("file", False, None, None),))
    replay = recording_events(settings, settings.streams[0], "20261127T120000Z-1")
    assert replay["truncated"] and [e["seq"] for e in replay["events"]] == list(range(1, 51))
    monkeypatch.setattr(recordings, "MAX_REPLAY_EVENTS", 1000)
    replay = recording_events(settings, settings.streams[0], "20261127T120000Z-1")
    assert not replay["truncated"] and len(replay["events"]) == 200


def test_the_video_cache_is_bounded_and_removed_when_the_console_stops(tmp_path):
    """Every segment viewed in the console was remuxed into a cache folder under /tmp that nothing ever emptied:
    copies as large as the recordings themselves piled up for the daemon's lifetime and were left behind at every
    restart, long after retention deleted the segments (found by an audit). The cache keeps its newest files up to
    a bound and is removed when the console stops."""
    video = write_video(tmp_path / "clip.mp4", np.zeros((10, 48, 64, 3), np.uint8), fps=10)
    segments = tmp_path / "rec" / "cam" / "video"
    segments.mkdir(parents=True)
    starts = [1_764_000_000_000 + 60_000 * k for k in range(4)]
    for start_ms in starts:
        copy_to_segment(video, segments / f"{start_ms}.ts")
    cam = WebStream("cam", True, None, str(segments))
    cache = VideoCache(max_files=2)
    served = [cache.video_for(cam, f"segment-{start_ms}") for start_ms in starts]
    assert served[-1].is_file()
    assert len(list(cache.directory.iterdir())) == 2, sorted(p.name for p in cache.directory.iterdir())
    assert cache.video_for(cam, f"segment-{starts[0]}").is_file()  # an evicted one is remuxed again when asked
    cache.close()
    assert not cache.directory.exists()
