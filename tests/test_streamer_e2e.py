"""End-to-end: the real daemon (`groundwatch run`, a subprocess) with real parts.

A real GStreamer RTSP server (Debian's /usr/bin/python3 + gir1.2-gst-rtsp-server-1.0), real files written with
PyAV, the real Grounding DINO code (random tiny weights: these tests check plumbing, not answers), real ZeroMQ
sockets. One daemon serves the whole module, because starting one costs seconds on a 2-core machine; the tests
run in file order and the last one stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parent))
from daemon_harness import Collector, Daemon, loopback_endpoint  # noqa: E402
from rtsp_server import RtspServer, gstreamer_available  # noqa: E402

from streamer import cli  # noqa: E402
from streamer.client import set_prompt, status  # noqa: E402
from streamer.media import write_video  # noqa: E402
from streamer.recording import read_events  # noqa: E402
from streamer.replay import replay  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILE_FRAMES = 8

pytestmark = pytest.mark.skipif(not gstreamer_available(), reason="GStreamer RTSP server not installed "
                                "(scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from gdino.shapes import render_video

    root = tmp_path_factory.mktemp("daemon")
    frames, _ = render_video(3, FILE_FRAMES, (120, 160), 10)
    write_video(root / "good.mp4", frames, fps=10)
    whole = write_video(root / "whole.mp4", frames, fps=10).read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # moov atom (at the end) cut off
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, np.uint8).tobytes())

    server = RtspServer(width=160, height=120, fps=10)
    server.start()
    publish, control = loopback_endpoint(), loopback_endpoint()
    daemon = Daemon(root, publish=publish, control=control, config_text=f"""
[[streams]]
id = "file"
url = "good.mp4"
prompt = "red circle . blue square ."

[[streams]]
id = "cam"
url = "{server.url}"
prompt = "red circle ."
fps = 4
record_video = true

[[streams]]
id = "truncated"
url = "truncated.mp4"
prompt = "a thing ."

[[streams]]
id = "garbage"
url = "garbage.mp4"
prompt = "a thing ."

[model]
weights = "tiny"
short_side = 96
max_side = 128
box_threshold = 0.9
batch_size = 4

[live]
open_timeout_seconds = 3
read_timeout_seconds = 2
reconnect_initial_seconds = 0.3
reconnect_max_seconds = 1.5
segment_seconds = 2

[publish]
endpoint = "{publish}"
control_endpoint = "{control}"
high_water_mark = 1000
heartbeat_seconds = 0.5

[record]
directory = "recordings"

[metrics]
port = 0

[web]
enabled = false  # its own tests: test_web.py, test_web_browser.py

[supervisor]
exit_when_done = false
""")
    collector = Collector(publish)
    # A subscriber that connects and then never reads a single event.
    stuck = zmq.Context.instance().socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 10)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.connect(publish)
    daemon.start()
    try:
        daemon.wait_ready(120)
        yield {"process": daemon.process, "root": root, "server": server, "control": control,
               "collector": collector, "stuck": stuck, "log": daemon.log_path, "publish": publish}
    finally:
        daemon.kill()
        collector.close()
        stuck.close()
        server.kill()


def recording(root: Path, stream: str) -> list[dict]:
    [path] = sorted((root / "recordings" / stream).glob("events-*.jsonl"))
    return list(read_events(path))


def test_file_processed_frame_by_frame(daemon):
    """A file must be processed whole and in order: one detections event per frame, none skipped or repeated,
    and per-stream sequence numbers without gaps (they are how subscribers detect lost events)."""
    collector = daemon["collector"]
    [offline] = collector.wait_for(120, "file", "status", state="offline", reason="end_of_file")
    assert offline["frames"] == FILE_FRAMES  # sent once the last frame's events are out
    assert status(daemon["control"])["streams"]["file"]["frames_processed"] == FILE_FRAMES
    time.sleep(1.0)  # the recording is flushed at least every flush_seconds (0.5 s)
    events = recording(daemon["root"], "file")
    detections = [e for e in events if e["kind"] == "detections"]
    assert [e["frame"] for e in detections] == list(range(FILE_FRAMES))
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["v"] == 1 and e["prompt"] == "red circle . blue square ." for e in detections)
    assert np.allclose([e["ts"] for e in detections], np.arange(FILE_FRAMES) / 10, atol=1e-3)
    # The subscriber that was connected before start saw the same detections.
    assert [e["frame"] for e in collector.select("file", "detections")] == list(range(FILE_FRAMES))
    # And the recording replays over the file, every frame matched to its event.
    log = next((daemon["root"] / "recordings" / "file").glob("events-*.jsonl"))
    summary = replay(daemon["root"] / "good.mp4", log, daemon["root"] / "replay.mp4", progress=False)
    assert summary.frames == FILE_FRAMES and summary.frames_with_events == FILE_FRAMES


def test_status_metrics_and_subscribe_commands(daemon, capsys):
    """The operator's views: `groundwatch status`, the Prometheus endpoint and `groundwatch subscribe`."""
    assert cli.main(["status", "--control", daemon["control"]]) == 0
    table = capsys.readouterr().out
    assert "file" in table and "cam" in table and "frames_dropped" in table
    reply = status(daemon["control"])
    metrics = urllib.request.urlopen(reply["metrics"], timeout=10).read().decode()
    assert f'groundwatch_frames_processed_total{{stream="file"}} {float(FILE_FRAMES)}' in metrics
    assert 'groundwatch_stream_state{state="online",stream="cam"} 1.0' in metrics
    result = subprocess.run([sys.executable, "-m", "streamer.cli", "subscribe", daemon["publish"], "--stream", "cam",
                             "--kind", "heartbeat", "--count", "2", "--timeout", "20"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and [(e["stream"], e["kind"]) for e in lines] == [("cam", "heartbeat")] * 2


def test_corrupt_files_report_an_error_and_others_continue(daemon):
    """A truncated or garbage file used to be able to take the daemon down; it must give that stream a clear
    fatal error event and an offline status, without restarts, while the other streams keep working."""
    collector = daemon["collector"]
    for stream in ("truncated", "garbage"):
        # These decoders fail within milliseconds of start-up, possibly before this subscriber's subscription
        # has reached the freshly bound PUB socket (ZeroMQ's slow joiner), so the one-shot events are read from
        # the stream's event log, the same bytes the hub publishes; what a subscriber received must equal them.
        collector.wait_for(30, stream, "heartbeat", state="offline")
        deadline = time.monotonic() + 10  # the log is flushed at least every 0.5 s
        while True:
            logged = recording(daemon["root"], stream)
            errors = [e for e in logged if e["kind"] == "error"]
            offline = [e for e in logged if e["kind"] == "status" and e.get("state") == "offline"
                       and e.get("reason") == "error"]
            if (errors and offline) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(errors) == 1 and offline, logged
        error = errors[0]
        assert error["fatal"] is True and error["error_type"] == "open_failed"
        assert f"{stream}.mp4" in error["message"]
        assert all(e == error for e in collector.select(stream, "error"))
    reply = status(daemon["control"])
    assert reply["processes"]["decoder-truncated"]["restarts"] == 0
    assert reply["processes"]["worker"]["alive"] and reply["processes"]["decoder-cam"]["alive"]
    since = collector.mark()
    collector.wait_for(60, "cam", "detections", since=since, count=2)


def test_prompt_change_through_control_socket(daemon):
    """Changing a prompt while running: the reply comes once the new prompt is encoded, later detections use
    it, the stream's tracks end with reason prompt_changed, and a bad request gets an error, not a crash."""
    collector = daemon["collector"]
    collector.wait_for(60, "cam", "detections")
    since = collector.mark()
    reply = set_prompt(daemon["control"], "cam", "blue square .")
    assert reply["ok"] and reply["previous_prompt"] == "red circle ." and reply["prompt"] == "blue square ."
    collector.wait_for(10, "cam", "status", since=since, reason="prompt_changed", prompt="blue square .")
    collector.wait_for(60, "cam", "detections", since=since, prompt="blue square .")
    tracks = collector.select("cam", "track")
    changed = collector.select("cam", "status", reason="prompt_changed")[0]
    alive = set()
    for event in tracks:
        if event["seq"] > changed["seq"]:
            break
        if event["event"] == "started":
            alive.add(event["track_id"])
        elif event["event"] == "ended":
            assert event.get("reason") in (None, "prompt_changed")
            alive.discard(event["track_id"])
    assert not alive  # every track of the old prompt ended before the new prompt's first frame
    assert not set_prompt(daemon["control"], "nope", "x")["ok"]
    assert not set_prompt(daemon["control"], "cam", "  ")["ok"]
    assert status(daemon["control"])["streams"]["cam"]["prompt"] == "blue square ."


def test_rtsp_server_killed_and_restarted(daemon):
    """PyAV reports a dropped RTSP connection as a normal end of stream; on a live source that must mean
    'reconnect', not 'done': the stream goes reconnecting, comes back online and events resume."""
    collector, server = daemon["collector"], daemon["server"]
    collector.wait_for(60, "cam", "detections", since=collector.mark())
    since = collector.mark()
    server.kill()
    collector.wait_for(15, "cam", "status", since=since, state="reconnecting")
    time.sleep(1.0)
    server.start()
    online = collector.wait_for(30, "cam", "status", since=since, state="online")
    after = collector.select(since=since).index(online[0]) + since
    collector.wait_for(60, "cam", "detections", since=after, count=2)
    reply = status(daemon["control"])
    assert reply["streams"]["cam"]["reconnects"] >= 1
    assert all(p["alive"] and p["restarts"] == 0 for name, p in reply["processes"].items()
               if name in ("hub", "worker", "decoder-cam"))


def test_rtsp_server_stalled_then_resumed(daemon):
    """A server that stops answering (SIGSTOP) without closing the connection used to hang the decoder
    forever; the read timeout must turn it into a reconnect, and events must resume after SIGCONT."""
    collector, server = daemon["collector"], daemon["server"]
    collector.wait_for(60, "cam", "detections", since=collector.mark())
    since = collector.mark()
    server.stall()
    try:
        collector.wait_for(15, "cam", "status", since=since, state="reconnecting")
        assert status(daemon["control"], timeout=5)["ok"]  # the daemon itself stays responsive
    finally:
        server.resume()
    online = collector.wait_for(40, "cam", "status", since=since, state="online")
    after = collector.select(since=since).index(online[0]) + since
    collector.wait_for(60, "cam", "detections", since=after, count=2)


def test_subscriber_that_never_reads(daemon):
    """A subscriber that never reads must not slow the pipeline or grow the daemon's memory: it loses events
    at its high-water mark (visible to it as gaps in seq) while other subscribers get everything."""
    collector = daemon["collector"]
    start = collector.mark()
    time.sleep(3.0)
    heartbeats = collector.select("cam", "heartbeat", start)
    assert len(heartbeats) >= 4  # 0.5 s heartbeats kept coming on time
    seqs = [e["seq"] for e in collector.select("cam", since=start)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the reading subscriber lost nothing
    # It is still connected and its queue holds the oldest events; overflowing the OS socket buffers takes
    # megabytes, so the loss itself is shown against the hub in test_streamer.py (test_hub_stuck_subscriber).
    stuck, received = daemon["stuck"], 0
    while stuck.poll(100) and received < 100:
        stuck.recv_multipart(flags=zmq.NOBLOCK)
        received += 1
    assert received > 0


def test_crashed_decoder_is_restarted(daemon):
    """A decoder that dies (here: SIGKILL) must be restarted by the supervisor with backoff, with an error
    event saying so, and the stream's events must resume."""
    collector = daemon["collector"]
    pid = status(daemon["control"])["processes"]["decoder-cam"]["pid"]
    since = collector.mark()
    os.kill(pid, signal.SIGKILL)
    [error] = collector.wait_for(20, "cam", "error", since=since, error_type="process_crashed")[:1]
    assert "decoder-cam" in error["message"]
    collector.wait_for(60, "cam", "detections", since=collector.mark(), count=2)
    processes = status(daemon["control"])["processes"]
    assert processes["decoder-cam"]["restarts"] == 1 and processes["decoder-cam"]["pid"] != pid


def test_sigterm_during_work(daemon):
    """SIGTERM while streams are live must stop every process in order, leave no orphan, flush the
    recordings (complete lines, a final offline status) and remove the shared-memory mailboxes."""
    process, collector = daemon["process"], daemon["collector"]
    collector.wait_for(60, "cam", "detections", since=collector.mark())
    pids = [p["pid"] for p in status(daemon["control"])["processes"].values() if p["pid"]]
    assert len(pids) == 6
    process.send_signal(signal.SIGTERM)
    assert process.wait(40) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not list(Path("/dev/shm").glob(f"groundwatch-{process.pid}-*"))
    cam = recording(daemon["root"], "cam")
    assert cam[-1]["kind"] in ("status", "heartbeat", "track")
    last_status = [e for e in cam if e["kind"] == "status"][-1]
    assert last_status["state"] == "offline" and last_status["reason"] == "shutdown"
    assert [e["seq"] for e in cam] == list(range(1, len(cam) + 1))
    raw = next((daemon["root"] / "recordings" / "cam").glob("events-*.jsonl")).read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines())
    segments = sorted((daemon["root"] / "recordings" / "cam" / "video").glob("*.ts"))
    assert segments, "live video was not copied"
    import av

    with av.open(str(segments[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) > 0
    assert "Traceback" not in daemon["log"].read_text()
