"""Live redaction end to end: the real daemon (`groundwatch run`) with the bundled default model watching a real
RTSP server that streams a shapes-world video with known ground truth (tests/redaction_scene.py): `redact` set,
`record_video` on, previews on, a zone and a rule that make a snapshot and a clip.

Everything the daemon wrote under its data folder and every preview it published is decoded; each picture carries
its source frame index in its pixels, so it is checked against that frame's ground-truth box: the hidden object's
outline must not survive anywhere, while the watched object's does (the check can tell). And a redact prompt on a
stream whose model never loads leaves no picture on disk at all.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parent))
import redaction_scene as scene  # noqa: E402
from daemon_harness import Daemon, Subscriber  # noqa: E402
from rtsp_server import RtspServer, gstreamer_available  # noqa: E402

import gdino  # noqa: E402
from streamer.media import write_video  # noqa: E402

DEFAULT = Path(gdino.__file__).parent / "assets" / "default" / "model.safetensors"
SHARP = 20.0  # outline sharpness (redaction_scene.outline_sharpness): raw after two H.264 passes >= ~50, blurred ~8

needs_rtsp = pytest.mark.skipif(not gstreamer_available(), reason="GStreamer RTSP server not available")
needs_model = pytest.mark.skipif(not DEFAULT.is_file(), reason="default weights not shipped")

STREAM = f"""
[[streams]]
id = "cam"
url = "{{url}}"
prompt = "{scene.PROMPT}"
redact = "{scene.REDACT}"
record_video = true

[[streams.zones]]
name = "yard"
polygon = [[0.0, 0.45], [1.0, 0.45], [1.0, 1.0], [0.0, 1.0]]
inertia = 1

[[rules]]
name = "square_in_yard"
phrase = "{scene.WATCHED}"
zone = "yard"

[clips]
pre_capture = 1
post_capture = 1
"""


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def redacted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("liveredact")
    video = write_video(root / "scene.mp4", scene.render(900), fps=scene.FPS, gop=10)
    server = RtspServer(file=video)
    server.start()
    daemon = Daemon(root, STREAM.format(url=server.url), extra="""
[model]
weights = "default"
short_side = 192
max_side = 256
box_threshold = 0.3
batch_size = 1
threads = 2
[tracker]
min_hits = 1
[live]
segment_seconds = 4
[web]
enabled = true
""")
    previews = Subscriber(daemon.publish, b"cam/")
    messages: list[list[bytes]] = []
    try:
        daemon.start()
        daemon.wait_ready(300)
        deadline = time.monotonic() + 240
        fired = clip = None
        shown = 0
        video = root / "recordings" / "cam" / "video"
        # Until a clip, previews and a second segment exist: the layout test needs two segments, and a fast
        # machine fired the clip within the first one (CI: one segment, stopped 3 s after the model was ready).
        while time.monotonic() < deadline and not (clip and shown >= 8 and len(list(video.glob("*.ts"))) >= 2):
            if previews.socket.poll(100):
                while True:
                    try:
                        message = previews.socket.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    messages.append(message)
                    shown += message[0] == b"cam/preview"
                    if len(message) == 2:
                        event = json.loads(message[1])
                        if event["kind"] == "alert" and event.get("event") == "fired":
                            fired = fired or event
                        if event["kind"] == "alert" and event.get("event") == "clip_ready":
                            clip = clip or event
            assert daemon.process.poll() is None, daemon.log()
        status = daemon.request({"cmd": "status"})["streams"]["cam"]
        daemon.request({"cmd": "stop"})
        assert daemon.wait_exit(60) is not None, daemon.log()
        yield {"root": root, "messages": messages, "fired": fired, "clip": clip, "status": status,
               "log": daemon.log()}
    finally:
        daemon.kill()
        previews.close()
        server.kill()


def checked_pictures(redacted_run):
    """(what, picture) for every picture the run let out: recorded segments, clips, snapshots, previews."""
    data = redacted_run["root"] / "recordings"
    for path in sorted(data.rglob("*")):
        if path.is_dir():
            continue
        if path.suffix in (".ts", ".mp4"):
            for k, picture in enumerate(decode(path)):
                yield f"{path.relative_to(data)}#{k}", picture
        elif path.suffix == ".jpg":
            yield str(path.relative_to(data)), cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    for message in redacted_run["messages"]:
        if len(message) == 3 and message[0] == b"cam/preview":
            yield f"preview {json.loads(message[1])['frame']}", rgb(message[2])


@needs_rtsp
@needs_model
@pytest.mark.slow
def test_nothing_written_or_published_shows_the_redacted_object(redacted_run):
    """Every recorded segment, clip, snapshot and preview: matched to its source frame by the index in its pixels,
    the hidden object's outline is gone (blurred) while the watched object's is sharp in the same picture."""
    assert redacted_run["fired"] is not None and redacted_run["fired"]["has_snapshot"], redacted_run["log"][-3000:]
    assert redacted_run["clip"] is not None, redacted_run["log"][-3000:]
    data = redacted_run["root"] / "recordings"
    kinds = {path.suffix for path in data.rglob("*") if path.is_file()}
    assert kinds <= {".ts", ".mp4", ".jpg", ".jsonl"}, kinds  # nothing else was written (no half-done .part)
    counts: dict[str, int] = {}
    leaks, unreadable = [], []
    for what, picture in checked_pictures(redacted_run):
        kind = "preview" if what.startswith("preview") else Path(what.split("#")[0]).suffix
        if what.endswith("-crop.jpg"):
            # A crop around the square (no index): the circle is never near it; no sharp red anywhere in it.
            assert scene.redness(picture).max() < 60, what
            counts["crop"] = counts.get("crop", 0) + 1
            continue
        counts[kind] = counts.get(kind, 0) + 1
        index = scene.read_index(picture)
        if index is None:
            # The planner redacts weak detections that form a track (privacy favours recall), and the default
            # model gives the code's black and white blocks weak "red circle" scores (0.1-0.22) on some frames, so
            # the code can be blurred too. Such a picture is checked at every place the circle ever is.
            unreadable.append(what)
            hidden = scene.sharpest_outline_anywhere(picture)
            if hidden >= SHARP:
                leaks.append((what, None, round(hidden, 1)))
            assert scene.sharpest_outline_anywhere(picture, scene.WATCHED) >= SHARP, what  # a real, sharp frame
            continue
        hidden = scene.outline_sharpness(picture, index)
        watched = scene.outline_sharpness(picture, index, scene.WATCHED)
        if hidden >= SHARP:
            leaks.append((what, index, round(hidden, 1)))
        assert watched >= SHARP, (what, index, watched)  # the picture is the frame we think it is, unblurred
    assert not leaks, leaks
    # How many had their code blurred depends on the model's weak scores on it (a CI run: 36 of 74); enough are
    # still matched to their exact frame for the check above to have looked at known frames.
    exact = sum(counts.values()) - counts.get("crop", 0) - len(unreadable)
    assert exact >= 10, (exact, unreadable, counts)
    assert counts.get(".ts", 0) >= 5 and counts.get(".mp4", 0) >= 1 and counts.get(".jpg", 0) >= 1, counts
    assert counts.get("preview", 0) >= 5 and counts.get("crop", 0) >= 1, counts


@needs_rtsp
@needs_model
@pytest.mark.slow
def test_redacted_recording_keeps_the_segment_layout_and_the_events_hide_the_phrase(redacted_run):
    """Segments are `<ms of first frame>.ts`, one every segment_seconds, each opening on a keyframe; the redact
    phrase's detections are not published; the status counts redacted frames and no failures."""
    data = redacted_run["root"] / "recordings" / "cam"
    segments = sorted((data / "video").glob("*.ts"), key=lambda p: int(p.stem))
    assert len(segments) >= 2, redacted_run["log"][-3000:]
    starts = [int(p.stem) / 1000 for p in segments]
    assert all(later - earlier >= 4.0 for earlier, later in zip(starts, starts[1:]))
    for path in segments:
        with av.open(str(path)) as container:
            first = next(container.decode(video=0))
        assert first.key_frame
    [log_path] = data.glob("events-*.jsonl")
    detections = [json.loads(line) for line in log_path.read_text().splitlines()]
    phrases = {d["phrase"] for e in detections if e["kind"] == "detections" for d in e["detections"]}
    assert phrases == {scene.WATCHED}
    status = redacted_run["status"]
    assert status["frames_redacted"] >= 5 and status["redaction_failed"] == 0, status


@needs_rtsp
@pytest.mark.slow
def test_redact_on_a_stream_whose_model_does_not_load_writes_no_picture(tmp_path):
    """A redacted stream must not be recorded before its detector runs: with the model failing to load the daemon
    stops with a clear error, and not one video segment (raw or otherwise) is left behind."""
    video = write_video(tmp_path / "scene.mp4", scene.render(60), fps=scene.FPS, gop=10)
    (tmp_path / "broken.safetensors").write_bytes(b"not weights at all")
    server = RtspServer(file=video)
    server.start()
    daemon = Daemon(tmp_path, STREAM.format(url=server.url), extra="""
[model]
weights = "broken.safetensors"
""")
    try:
        daemon.start()
        code = daemon.wait_exit(400)  # the worker's start-up (torch, the model) is slow on a loaded machine
        assert code not in (None, 0), daemon.log()
        assert "cannot load the model" in daemon.log()
        written = [p for p in (tmp_path / "recordings").rglob("*") if p.is_file()]
        assert not [p for p in written if p.suffix in (".ts", ".mp4", ".jpg", ".part")], written
    finally:
        daemon.kill()
        server.kill()
