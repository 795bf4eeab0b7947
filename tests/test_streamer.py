"""Streamer unit tests: config, mailboxes, worker (with a deterministic fake detector), hub, recording, replay.

The fake detector stands in for the model only here; the end-to-end tests (test_streamer_e2e.py) and the demo
run the real Grounding DINO code.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from streamer import cli
from streamer.client import GapCounter, subscription_prefix
from streamer.config import ConfigError, load_config, parse_config
from streamer.decoder import EXIT_DONE, EXIT_FATAL, Decoder, backoff_delay, fit_size
from streamer.events import decode_payload, encode_payload, unpack_internal
from streamer.hub import Hub
from streamer.media import count_frames, write_video
from streamer.recording import EventLog, Recorder, read_events
from streamer.replay import replay
from tracker import TrackerConfig

# Shared fakes (tests/fakes.py; re-exported for modules that still import them from here); the fixtures
# mailbox_factory and stats_factory come from tests/conftest.py.
from fakes import FakeDetections, FakeDetector, FlagEvent, ListSender, frame_with_value, make_worker  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


MINIMAL = {"streams": [{"id": "cam", "url": "rtsp://127.0.0.1:1/x", "prompt": "a person ."}]}


# -- config ---------------------------------------------------------------------------------------------------


def test_example_config_is_valid():
    config = load_config(REPO / "config.toml")
    assert config.streams and all(stream.prompt for stream in config.streams)


def test_bad_config_lists_every_bad_field(tmp_path):
    """A bad file used to be reported one field per restart; the report must name every bad field at once."""
    path = tmp_path / "bad.toml"
    path.write_text("""
publsh = 1
[model]
box_threshold = 1.5
device = "tpu"
[tracker]
low_score = 0.9
high_score = 0.5
[[streams]]
id = "a/b"
url = "missing.mp4"
[[streams]]
id = "x"
url = "rtsp://h/x"
prompt = "a"
fps = -1
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    report = str(info.value)
    for field in ("publsh: unknown key", "model.box_threshold", "model.device", "streams[0].id",
                  "streams[0].prompt: required", "streams[1].fps", "tracker.low_score", "missing.mp4"):
        assert field in report, report
    assert report.startswith(f"{path}: 8 problems")


def test_semantic_config_errors_are_reported_together(tmp_path):
    """Errors found after the schema (missing files, tracker bounds) used to stop at the first one."""
    data = {"streams": [{"id": "a", "url": "nope1.mp4", "prompt": "x"}, {"id": "b", "url": "nope2.mp4",
                                                                          "prompt": "x"}],
            "tracker": {"low_score": 0.9, "high_score": 0.5}}
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=tmp_path)
    report = str(info.value)
    assert "nope1.mp4" in report and "nope2.mp4" in report and "tracker.low_score" in report


def test_daemon_tracker_settings_are_the_trackers_own():
    """streamer/config.py used to keep its own copy of the tracker settings, whose max_predict_frames default had
    drifted (10 against the tracker's 20): the [tracker] section now builds `tracker.TrackerConfig` itself."""
    config = parse_config(MINIMAL)
    assert type(config.tracker) is TrackerConfig and config.tracker == TrackerConfig()
    custom = parse_config({**MINIMAL, "tracker": {"max_age": 7, "class_agnostic": True}})
    assert custom.tracker == TrackerConfig(max_age=7, class_agnostic=True)
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "tracker": {"min_hits": 0, "match_iou": 0, "velocity": 1}})
    report = str(info.value)
    assert "tracker.velocity: unknown key" in report and report.startswith("<config>: 1 problem")
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "tracker": {"min_hits": 0, "match_iou": 0}})
    report = str(info.value)
    assert "tracker.min_hits: must be at least 1 (got 0)" in report and "tracker.match_iou: must be in (0, 1]" in report
    assert report.startswith("<config>: 2 problems")


def _echo_configs(configs, results) -> None:
    results.put([(type(c).__name__, c) for c in configs])


def test_typed_configs_cross_a_spawned_process(tmp_path):
    """Child processes receive the frozen config objects (not dicts): they must survive the spawn pickling
    intact, equal and still frozen."""
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    config = parse_config({"streams": [{"id": "cam", "url": "rtsp://127.0.0.1/cam", "prompt": "a person ."},
                                       {"id": "file", "url": str(video), "prompt": "a car ."}],
                           "tracker": {"min_hits": 3}})
    sent = [*config.streams, config.model, config.live, config.tracker]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_echo_configs, args=(sent, results))
    child.start()
    try:
        received = results.get(timeout=60)
    finally:
        child.join(30)
    assert [name for name, _ in received] == ["StreamConfig", "StreamConfig", "ModelConfig", "LiveConfig",
                                              "TrackerConfig"]
    assert [c for _, c in received] == sent
    assert received[0][1].is_live and not received[1][1].is_live
    with pytest.raises(Exception):
        received[4][1].min_hits = 1


def test_bad_toml_and_duplicate_ids_are_reported(tmp_path):
    """A TOML syntax error or a duplicated stream id must be a readable report, not a traceback."""
    path = tmp_path / "broken.toml"
    path.write_text("[[streams]\nid=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    twice = {"streams": [MINIMAL["streams"][0], MINIMAL["streams"][0]]}
    with pytest.raises(ConfigError, match="used twice"):
        parse_config(twice)


def test_cli_bad_config_exit_code(tmp_path, capsys):
    """`groundwatch run bad.toml` must exit 2 with the report on stderr and start nothing."""
    path = tmp_path / "bad.toml"
    path.write_text('[[streams]]\nid = "a"\nurl = "rtsp://x/y"\nprompt = "p"\nfps = "fast"\n[metrics]\nport = -1\n')
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "streams[0].fps" in err and "metrics.port" in err and "Traceback" not in err


def test_live_or_file_inferred_and_paths_resolved(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    config = parse_config({"streams": [{"id": "f", "url": "v.mp4", "prompt": "p"},
                                       {"id": "l", "url": "rtsp://h/s", "prompt": "p"}]}, base_dir=tmp_path)
    assert not config.streams[0].is_live and config.streams[0].url == str(video)
    assert config.streams[1].is_live
    assert Path(config.record.directory).is_absolute()


# -- mailboxes ------------------------------------------------------------------------------------------------


def test_live_mailbox_keeps_the_freshest_frame(mailbox_factory):
    """A live source must never wait for a slow worker: stale frames are dropped (and counted), the worker
    always gets the newest one."""
    mailbox = mailbox_factory("live")
    for value in range(6):
        assert mailbox.put(frame_with_value(value), frame_index=value, pts=value, ts=value, live=True)
    [frame] = mailbox.take(live=True)
    assert frame.frame_index == 5 and frame.pixels[0, 0, 0] == 5
    assert mailbox.dropped == 5  # 3 overwritten by the decoder, 2 skipped by the worker
    mailbox.release(frame)
    assert mailbox.take(live=True) == []


def test_file_mailbox_keeps_every_frame_in_order(mailbox_factory):
    """Files are processed whole: the decoder waits for a free slot instead of dropping."""
    mailbox = mailbox_factory("file", slots=2)
    stop = FlagEvent()
    written = []

    def produce():
        for value in range(10):
            mailbox.put(frame_with_value(value), frame_index=value, pts=value, ts=value, live=False, stop=stop)
            written.append(value)
        mailbox.finish()

    thread = threading.Thread(target=produce)
    thread.start()
    seen = []
    deadline = time.monotonic() + 10
    while not (mailbox.finished and not mailbox.pending()) and time.monotonic() < deadline:
        for frame in mailbox.take(live=False, limit=2):
            seen.append((frame.frame_index, int(frame.pixels[0, 0, 0])))
            mailbox.release(frame)
    thread.join()
    assert seen == [(v, v) for v in range(10)] and mailbox.dropped == 0


def test_frame_too_large_for_slot_is_refused(mailbox_factory):
    mailbox = mailbox_factory("small", width=8, height=8)
    with pytest.raises(ValueError, match="does not fit"):
        mailbox.put(frame_with_value(1, 16, 16), frame_index=0, pts=0, ts=0, live=True)
    assert fit_size(3840, 2160, 1920, 1080) == (1920, 1080) and fit_size(320, 240, 1920, 1080) == (320, 240)


# -- worker ---------------------------------------------------------------------------------------------------


def test_worker_batches_across_streams_and_tracks_each(mailbox_factory, stats_factory):
    """Two file streams with the same prompt: frames are batched together, the prompt is encoded once, and
    each stream gets its own tracker (one track each: started once, updated every frame, ended at the end)."""
    streams = [{"id": "a", "live": False, "prompt": "thing ."}, {"id": "b", "live": False, "prompt": "thing ."}]
    worker, mailboxes, detector, sender, stats = make_worker(mailbox_factory, stats_factory, streams)
    frames = 6
    for stream_id, mailbox in mailboxes.items():
        for value in range(frames):
            mailbox.put(frame_with_value(value), frame_index=value, pts=value / 10, ts=value / 10, live=False)
        mailbox.finish(1)
    worker.encoding_for("thing .")
    while not all(s.finished for s in worker.streams.values()):
        worker.step()
    assert detector.encoded == ["thing ."]
    assert max(detector.batches) == 4 and sum(detector.batches) == 2 * frames
    for stream in ("a", "b"):
        detections = [e for e in sender.events if e["stream"] == stream and e["kind"] == "detections"]
        assert [e["frame"] for e in detections] == list(range(frames))
        tracks = [e for e in sender.events if e["stream"] == stream and e["kind"] == "track"]
        kinds = [e["event"] for e in tracks]
        assert kinds.count("started") == 1 and kinds.count("ended") == 1
        assert kinds.count("updated") == frames - 2  # min_hits = 2: started on the 2nd frame
        assert tracks[-1]["reason"] == "end_of_stream"
        offline = [e for e in sender.events if e["stream"] == stream and e["kind"] == "status"][-1]
        assert offline["state"] == "offline" and offline["reason"] == "end_of_file" and offline["frames"] == frames
        assert detections[-1]["detections"][0]["track_id"] == tracks[0]["track_id"]
        assert stats.get(stream, "worker_finished") == 1 and stats.get(stream, "frames_processed") == frames


def test_prompt_change_encodes_once_and_restarts_the_tracker(mailbox_factory, stats_factory):
    """A prompt change must encode the new text once (not per frame), end the stream's tracks with reason
    prompt_changed, and start a fresh tracker."""
    streams = [{"id": "cam", "live": True, "prompt": "old ."}]
    worker, mailboxes, detector, sender, _ = make_worker(mailbox_factory, stats_factory, streams)
    mailbox = mailboxes["cam"]
    worker.encoding_for("old .")
    for value in range(3):
        mailbox.put(frame_with_value(value), frame_index=value, pts=0, ts=time.time(), live=True)
        worker.step()
    reply = worker.set_prompt("cam", "new .")
    assert reply["previous_prompt"] == "old ." and reply["prompt"] == "new ."
    ended = [e for e in sender.events if e["kind"] == "track" and e["event"] == "ended"]
    assert len(ended) == 1 and ended[0]["reason"] == "prompt_changed"
    for value in range(3, 6):
        mailbox.put(frame_with_value(value), frame_index=value, pts=0, ts=time.time(), live=True)
        worker.step()
    assert detector.encoded == ["old .", "new ."]
    last = [e for e in sender.events if e["kind"] == "detections"][-1]
    assert last["prompt"] == "new ." and last["detections"][0]["phrase"] == "new"
    started = [e for e in sender.events if e["kind"] == "track" and e["event"] == "started"]
    assert len(started) == 2
    assert "old ." not in worker.encodings  # unused encodings are forgotten


def test_nan_boxes_do_not_kill_the_stream(mailbox_factory, stats_factory):
    """A detector returning NaN boxes used to be able to crash the JSON encoder (NaN is not JSON); such boxes
    are left out of the event and the stream goes on."""
    streams = [{"id": "a", "live": False, "prompt": "thing ."}]
    worker, mailboxes, detector, sender, _ = make_worker(mailbox_factory, stats_factory, streams)

    def nan_detect(frames, encoding):
        return [FakeDetections(np.array([[np.nan, 0, 1, 1], [0, 0, 5, 5]], np.float32), np.array([0.9, 0.8]),
                               ["x", "y"]) for _ in frames]

    detector.detect = nan_detect
    mailboxes["a"].put(frame_with_value(0), frame_index=0, pts=0, ts=0, live=False)
    worker.step()
    [event] = [e for e in sender.events if e["kind"] == "detections"]
    assert [d["phrase"] for d in event["detections"]] == ["y"]
    encode_payload({"v": 1, "seq": 1, **event})


# -- decoder --------------------------------------------------------------------------------------------------


def test_decoder_reads_a_file_frame_by_frame(tmp_path, mailbox_factory, stats_factory):
    frames = np.stack([frame_with_value(v * 20, 48, 64) for v in range(7)])
    path = write_video(tmp_path / "v.mp4", frames, fps=10)
    mailbox = mailbox_factory("dec", slots=3, width=64, height=48)
    stats, sender, stop = stats_factory(["v"]), ListSender(), FlagEvent()
    decoder = Decoder(stream_id="v", url=str(path), live=False, fps=0, max_width=64, max_height=48, mailbox=mailbox,
                      stats=stats, sender=sender, stop=stop)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", decoder.run()))
    thread.start()
    got = []
    while thread.is_alive() or mailbox.pending():
        for frame in mailbox.take(live=False, limit=3):
            got.append((frame.frame_index, round(frame.pts, 3), frame.pixels.shape))
            mailbox.release(frame)
    thread.join()
    assert result["code"] == EXIT_DONE
    assert got == [(i, i / 10, (48, 64, 3)) for i in range(7)]
    assert [e["state"] for e in sender.events if e["kind"] == "status"] == ["online"]
    assert mailbox.finished and mailbox.end_reason == "end_of_file"  # the worker announces the end


def test_decoder_fps_cap_on_files_uses_media_time(tmp_path, mailbox_factory, stats_factory):
    frames = np.stack([frame_with_value(v, 48, 64) for v in range(10)])
    path = write_video(tmp_path / "v.mp4", frames, fps=10)
    mailbox = mailbox_factory("cap", slots=12, width=64, height=48)
    decoder = Decoder(stream_id="v", url=str(path), live=False, fps=5, max_width=64, max_height=48,
                      mailbox=mailbox, stats=stats_factory(["v"]), sender=ListSender(), stop=FlagEvent())
    decoder.run()
    assert [f.frame_index for f in mailbox.take(live=False, limit=12)] == [0, 2, 4, 6, 8]


def test_decoder_delivers_the_frames_after_timestamps_jump_back(tmp_path, mailbox_factory, stats_factory):
    """Two MPEG-TS files joined with `cat` (or recorded segments joined) start again at zero at the join: every
    frame after it used to be decoded and silently never delivered, even with fps = 0. They must be delivered,
    with media times that go on increasing."""
    first = write_video(tmp_path / "a.ts", np.stack([frame_with_value(v * 10, 48, 64) for v in range(8)]), fps=10)
    second = write_video(tmp_path / "b.ts", np.stack([frame_with_value(200 - v * 10, 48, 64) for v in range(6)]),
                         fps=10)
    path = tmp_path / "joined.ts"
    path.write_bytes(first.read_bytes() + second.read_bytes())
    mailbox = mailbox_factory("joined", slots=16, width=64, height=48)
    decoder = Decoder(stream_id="v", url=str(path), live=False, fps=0, max_width=64, max_height=48,
                      mailbox=mailbox, stats=stats_factory(["v"]), sender=ListSender(), stop=FlagEvent())
    assert decoder.run() == EXIT_DONE
    got = mailbox.take(live=False, limit=16)
    assert [f.frame_index for f in got] == list(range(14))
    assert abs(int(got[8].pixels[0, 0, 0]) - 200) < 8  # the first frame of the second file
    pts = [f.pts for f in got]
    assert np.allclose(np.diff(pts), 0.1, atol=1e-3)  # one frame on at the join, never back
    assert decoder.discontinuities == 1


def test_forward_clock_goes_on_across_joins_and_loop_passes():
    """The one clock of the decoder and search: file times that start again (a join) or a new loop pass go on one
    frame after the last media time; small backward steps (B-frame reordering jitter) are not joins."""
    from streamer.media import ForwardClock

    clock = ForwardClock(0.1)
    times = [clock(t) for t in (5.0, 5.1, 5.2, 0.0, 0.1, 0.05)]
    assert np.allclose(times, [5.0, 5.1, 5.2, 5.3, 5.4, 5.35])  # 0.05 is half a frame back: not a join
    assert clock.jumped is False and clock.file_time == 0.05
    clock.next_pass()
    # the next pass's file time 0 is one frame after the last media time (streamer.clips.file_pass_seconds
    # counts passes so), and a join within the pass still goes on
    assert [round(clock(t), 6) for t in (0.0, 0.1, 3.0, 0.0)] == [5.45, 5.55, 8.45, 8.55]
    assert clock.jumped


def test_the_segment_being_recorded_is_on_disk_packet_by_packet(tmp_path):
    """A low-bitrate camera's current segment used to stay 0 bytes until FFmpeg's 32 KiB buffer filled, so an
    alert clip reaching into it failed: every packet copied must reach the file at once."""
    import av

    from streamer.decoder import SegmentWriter

    source = write_video(tmp_path / "cam.ts", np.stack([frame_with_value(v * 20, 48, 64) for v in range(10)]), fps=10)
    writer = SegmentWriter(tmp_path / "video", segment_seconds=60.0)
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            writer.write(packet, stream)
    try:
        [segment] = (tmp_path / "video").glob("*.ts")
        assert 0 < segment.stat().st_size < 32 << 10
        with av.open(str(segment)) as container:
            assert sum(1 for _ in container.decode(video=0)) >= 8  # readable while still being written
    finally:
        writer.close()


def test_segment_writers_keep_no_list_of_every_segment(tmp_path, monkeypatch):
    """Both segment writers (the camera's packet copy, the redacted stream's encoder) appended every segment's path
    to a list nobody read: a camera recording for months grew it by one path a segment, for good (found by an
    audit). What a writer holds must not grow with the segments it has written."""
    import av

    from streamer import decoder
    from streamer.decoder import SegmentWriter
    from streamer.redaction import RedactedSegmentWriter

    clock = [1_000_000.0]
    monkeypatch.setattr(decoder.time, "time", lambda: clock[0])
    source = write_video(tmp_path / "cam.ts", np.stack([frame_with_value(v * 20, 48, 64) for v in range(12)]), fps=10,
                         gop=1)
    writer = SegmentWriter(tmp_path / "video", segment_seconds=1.0)
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            clock[0] += 2.0  # every keyframe starts a new segment
            writer.write(packet, stream)
    writer.close()
    redacted = RedactedSegmentWriter(tmp_path / "redacted", segment_seconds=1.0)
    for index in range(12):
        redacted.write(frame_with_value(index * 20, 48, 64), ts=2.0 * index)
    redacted.close()
    assert len(list((tmp_path / "video").glob("*.ts"))) >= 10 and len(list((tmp_path / "redacted").glob("*.ts"))) == 12
    for held in (writer, redacted):
        assert not [name for name, value in vars(held).items() if isinstance(value, (list, dict, set)) and len(value) > 1]


def test_truncated_file_gives_a_fatal_error_event(tmp_path, mailbox_factory, stats_factory):
    """A file cut short used to raise out of the decoder (and be restarted forever); it must end with one
    clear error event and the 'do not restart' exit code."""
    frames = np.stack([frame_with_value(v, 48, 64) for v in range(10)])
    whole = write_video(tmp_path / "v.mp4", frames).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(whole[: len(whole) // 3])
    sender = ListSender()
    decoder = Decoder(stream_id="v", url=str(path), live=False, fps=0, max_width=64, max_height=48,
                      mailbox=mailbox_factory("cut", width=64, height=48), stats=stats_factory(["v"]), sender=sender,
                      stop=FlagEvent())
    assert decoder.run() == EXIT_FATAL
    [error] = [e for e in sender.events if e["kind"] == "error"]
    assert error["fatal"] and "cut.mp4" in error["message"]


def test_unreachable_live_source_retries_with_backoff(mailbox_factory, stats_factory):
    """A camera that is down must be retried (status reconnecting, growing delays), never given up on."""
    sender, stop = ListSender(), FlagEvent()
    decoder = Decoder(stream_id="cam", url="rtsp://127.0.0.1:9/nothing", live=True, fps=0, max_width=32,
                      max_height=24, mailbox=mailbox_factory("down"), stats=stats_factory(["cam"]), sender=sender,
                      stop=stop, open_timeout=1, read_timeout=1, reconnect_initial=0.05, reconnect_max=0.2)
    threading.Timer(1.0, stop.set).start()
    assert decoder.run() == EXIT_DONE
    statuses = [e for e in sender.events if e["kind"] == "status"]
    attempts = [e["attempt"] for e in statuses if e["state"] == "reconnecting"]
    assert len(attempts) >= 3 and attempts == sorted(attempts)
    assert statuses[-1]["state"] == "offline"


def test_backoff_grows_caps_and_jitters():
    rng = random.Random(0)
    delays = [backoff_delay(attempt, 0.5, 8.0, rng) for attempt in range(1, 10)]
    for attempt, delay in enumerate(delays, start=1):
        full = min(8.0, 0.5 * 2 ** (attempt - 1))
        assert full / 2 <= delay <= full
    assert len({round(backoff_delay(3, 0.5, 8, rng), 6) for _ in range(20)}) > 1


# -- hub, events, recording ----------------------------------------------------------------------------------


def hub_pair(tmp_path, high_water_mark=1000, recorder=None):
    context = zmq.Context.instance()
    pull_endpoint = f"ipc://{tmp_path}/pull"
    pub_endpoint = f"ipc://{tmp_path}/pub"
    hub = Hub(pull_endpoint=pull_endpoint, pub_endpoint=pub_endpoint, high_water_mark=high_water_mark,
              heartbeat_seconds=1000, stats=None, recorder=recorder, context=context)
    return hub, pub_endpoint


def test_hub_numbers_events_per_stream_and_records_them(tmp_path):
    recorder = Recorder(tmp_path / "rec", ["a", "b"], flush_seconds=0.1, stamp="t")
    hub, endpoint = hub_pair(tmp_path, recorder=recorder)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"a/")
    sub.connect(endpoint)
    time.sleep(0.2)
    for i in range(5):
        for stream in ("a", "b"):
            hub.publish({"stream": stream, "kind": "detections" if i % 2 else "track", "ts": i, "wall": 0.0})
    received = []
    while sub.poll(500):
        topic, payload = sub.recv_multipart()
        received.append((topic, decode_payload(payload)))
    assert [t for t, _ in received] == [b"a/track", b"a/detections"] * 2 + [b"a/track"]
    assert [e["seq"] for _, e in received] == [1, 2, 3, 4, 5]
    hub.close()
    lines = list(read_events(tmp_path / "rec" / "b" / "events-t.jsonl"))
    assert [e["seq"] for e in lines] == [1, 2, 3, 4, 5] and all(e["v"] == 1 for e in lines)
    sub.close()


def test_hub_stuck_subscriber(tmp_path):
    """A subscriber that never reads used to be able to block publishing; publishing must go on at full speed,
    the stuck subscriber loses events past its high-water mark and sees the loss as a seq gap."""
    hub, endpoint = hub_pair(tmp_path, high_water_mark=100)
    context = zmq.Context.instance()
    stuck = context.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 10)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(endpoint)
    time.sleep(0.2)
    started = time.perf_counter()
    count = 50_000
    event = {"stream": "s", "kind": "detections", "ts": 0.0, "wall": 0.0, "detections": []}
    for _ in range(count):
        hub.publish(dict(event))
    elapsed = time.perf_counter() - started
    assert elapsed < 10
    gaps = GapCounter()
    received = 0
    while stuck.poll(200):
        gaps.see(decode_payload(stuck.recv_multipart()[1]))
        received += 1
    hub.publish(dict(event))
    if stuck.poll(1000):
        gaps.see(decode_payload(stuck.recv_multipart()[1]))
    assert received < count and gaps.lost > 0
    stuck.close()
    hub.close()


def test_internal_events_are_json_never_pickle():
    from streamer.events import pack_internal, splice_header

    frames = pack_internal({"stream": "s", "kind": "error", "ts": 1.0, "message": "x"})
    assert frames[0] == b"s/error" and frames[1][:1] == b"{"  # pickle would start with 0x80
    assert unpack_internal(frames)["message"] == "x"
    assert decode_payload(splice_header(frames[1], 7)) == {"v": 1, "seq": 7, "stream": "s", "kind": "error",
                                                           "ts": 1.0, "message": "x"}
    with pytest.raises(ValueError):
        splice_header(b"[]", 1)


def test_subscription_prefix_filters():
    assert subscription_prefix("cam", "track") == b"cam/track"
    assert subscription_prefix("cam", None) == b"cam/" and subscription_prefix(None, None) == b""


def _write_forever(path):
    log = EventLog(Path(path), flush_seconds=0.5)
    while True:
        log.append(json.dumps({"wall": time.time()}).encode())
        log.maybe_flush()
        time.sleep(0.001)


def test_recording_survives_kill_9(tmp_path):
    """A kill -9 used to be able to lose everything not yet flushed; at most the last second may be lost."""
    path = tmp_path / "events.jsonl"
    process = multiprocessing.get_context("spawn").Process(target=_write_forever, args=(str(path),))
    process.start()
    deadline = time.monotonic() + 60  # the spawned child's start-up is slow on a loaded machine: not under test
    while not (path.exists() and path.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.5)
    os.kill(process.pid, signal.SIGKILL)
    killed_at = time.time()
    process.join()
    events = list(read_events(path))
    assert events and killed_at - events[-1]["wall"] <= 1.0


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":2}\n{"a":')
    assert [e["a"] for e in read_events(path)] == [1, 2]


def test_a_restarted_hub_never_glues_its_first_event_to_a_torn_line(tmp_path):
    """A hub killed mid-write (a short write on a full disk, or SIGKILL inside a large write) leaves a torn last
    line; the restarted hub appends to the same run's log, and its first event used to be glued onto that half
    line: one unreadable line, the new event lost to every reader (found by an audit)."""
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"a":1}\n{"a":')
    log = EventLog(path, flush_seconds=0.0)
    log.append(b'{"a":3}')
    log.close()
    assert [e["a"] for e in read_events(path)] == [1, 3]


# -- replay ---------------------------------------------------------------------------------------------------


def test_replay_draws_events_at_their_frames(tmp_path):
    frames = np.zeros((6, 64, 96, 3), np.uint8)
    video = write_video(tmp_path / "in.mp4", frames)
    events = tmp_path / "events.jsonl"
    lines = [{"v": 1, "seq": 1, "stream": "s", "kind": "status", "state": "online", "source": "file", "ts": 0}]
    for index in range(0, 6, 2):
        lines.append({"v": 1, "seq": index + 2, "stream": "s", "kind": "detections", "frame": index, "ts": index / 10,
                      "detections": [{"box": [10 + index, 10, 40 + index, 40], "score": 0.9, "phrase": "box",
                                      "track_id": 1}]})
    events.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = replay(video, events, tmp_path / "out.mp4", progress=False)
    assert summary.frames == 6 and summary.frames_with_events == 3
    assert count_frames(tmp_path / "out.mp4") == 6
    import av

    with av.open(str(tmp_path / "out.mp4")) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert first[10:40, 10:12].max() > 100  # the box edge was drawn on frame 0


def test_cli_replay_and_subscribe_help(tmp_path, capsys):
    assert cli.main(["replay", str(tmp_path / "none.mp4"), "--events", "x", "-o", "y"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["subscribe", "--help"])
    assert "--stream" in capsys.readouterr().out


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "streamer.cli", "--help"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and "replay" in result.stdout and "subscribe" in result.stdout


def test_failing_batch_costs_its_frames_not_the_worker(mailbox_factory, stats_factory):
    """A detector exception used to kill the inference worker (every stream stalls until the restart); one bad
    batch must give an error event and the next frames must be processed."""
    streams = [{"id": "a", "live": False, "prompt": "thing ."}]
    worker, mailboxes, detector, sender, _ = make_worker(mailbox_factory, stats_factory, streams)
    working = detector.detect
    detector.detect = lambda frames, encoding: (_ for _ in ()).throw(RuntimeError("out of memory"))
    mailboxes["a"].put(frame_with_value(0), frame_index=0, pts=0, ts=0, live=False)
    worker.step()
    detector.detect = working
    mailboxes["a"].put(frame_with_value(1), frame_index=1, pts=0.1, ts=0.1, live=False)
    worker.step()
    [error] = [e for e in sender.events if e["kind"] == "error"]
    assert error["error_type"] == "inference_failed" and "out of memory" in error["message"]
    assert [e["frame"] for e in sender.events if e["kind"] == "detections"] == [1]
    assert mailboxes["a"].pending() == 0


def test_endpoint_in_use_is_a_clear_error(tmp_path, capsys):
    """A second daemon on the same ports used to crash its hub in a restart loop; it must refuse to start."""
    taken = zmq.Context.instance().socket(zmq.REP)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    video = write_video(tmp_path / "v.mp4", np.zeros((2, 24, 32, 3), np.uint8))
    config = tmp_path / "c.toml"
    config.write_text(f'[[streams]]\nid = "a"\nurl = "{video}"\nprompt = "p"\n[publish]\n'
                      f'control_endpoint = "tcp://127.0.0.1:{port}"\nendpoint = "tcp://127.0.0.1:1"\n'
                      f'[metrics]\nenabled = false\n')
    try:
        assert cli.main(["run", str(config)]) == 2
    finally:
        taken.close(linger=0)
    assert "cannot bind" in capsys.readouterr().err
