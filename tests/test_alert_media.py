"""Snapshots, clips and retention (streamer.snapshots, streamer.clips, streamer.retention) on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from streamer.clips import cut_clip, segment_sources
from streamer.media import write_video
from streamer.retention import GIB, RetainPolicy, Retention
from streamer.snapshots import SnapshotKeeper

# -- snapshots ------------------------------------------------------------------------------------------------------


def frame_with_square(x: int, colour=(220, 30, 30), size=(120, 160)) -> tuple[np.ndarray, list[float]]:
    pixels = np.full((*size, 3), 128, np.uint8)
    pixels[40:80, x:x + 40] = colour
    return pixels, [x, 40, x + 40, 80]


def test_snapshot_is_the_best_whole_box_and_the_crop_shows_the_object(tmp_path):
    """A higher score with the box cut by the frame's edge loses to a lower score with the whole box; the JPEGs
    decode, and the crop's middle is the object's colour."""
    keeper = SnapshotKeeper(tmp_path, quality=90, capacity=2)
    rows = np.array([0])
    for x, score, colour in [(60, 0.7, (30, 60, 230)), (0, 0.95, (30, 170, 50)), (50, 0.8, (220, 30, 30)),
                             (55, 0.75, (245, 225, 20))]:
        pixels, box = frame_with_square(x, colour)
        keeper.offer(pixels, rows, np.array([box], np.float64), np.array([score]))
        pixels[:] = 0  # the worker's frame is shared memory, reused after: the keeper must have copied it
    path = keeper.write(0, "cam-run-1", "red square")
    full = cv2.imread(path)
    crop = cv2.imread(str(tmp_path / "cam-run-1-crop.jpg"))
    assert full.shape == (120, 160, 3)
    height, width = crop.shape[:2]
    middle = crop[height // 2, width // 2][::-1].astype(int)  # BGR -> RGB
    assert np.abs(middle - np.array([220, 30, 30])).max() < 25, middle  # the red frame (0.8), not green (0.95)
    assert abs(width - 48) <= 2 and abs(height - 48) <= 2  # the box plus 10 % each side
    assert not list(tmp_path.glob("*.part"))


def test_snapshot_frames_are_shared_and_released(tmp_path):
    keeper = SnapshotKeeper(tmp_path, capacity=4)
    pixels, box = frame_with_square(40)
    keeper.offer(pixels, np.array([0, 1]), np.array([box, box], np.float64), np.array([0.5, 0.6]))
    assert len(keeper.frames) == 1  # one copy for both tracks
    keeper.offer(pixels, np.array([0]), np.array([box], np.float64), np.array([0.9]))
    assert len(keeper.frames) == 2
    keeper.forget(0)
    keeper.forget(1)
    assert keeper.frames == {}


# -- clips ----------------------------------------------------------------------------------------------------------


def numbered_frames(count: int, size=(64, 64)) -> np.ndarray:
    """Frame k shows k in binary, one 8-pixel-wide white column per set bit: robust to compression."""
    frames = np.zeros((count, *size, 3), np.uint8)
    for k in range(count):
        for bit in range(8):
            if k >> bit & 1:
                frames[k, :, bit * 8:(bit + 1) * 8] = 255
    return frames


def frame_number(rgb: np.ndarray) -> int:
    columns = rgb[..., 0].reshape(rgb.shape[0], 8, -1).mean(axis=(0, 2))
    return sum(1 << bit for bit in range(8) if columns[bit] > 128)


def decode(path) -> list[tuple[float, int]]:
    with av.open(str(path)) as container:
        return [(frame.time, frame_number(frame.to_ndarray(format="rgb24"))) for frame in container.decode(video=0)]


@pytest.mark.parametrize("start, end", [(3.25, 5.0), (0.0, 1.5), (8.2, 20.0)])
def test_file_clip_starts_on_the_keyframe_before_and_lasts_as_asked(tmp_path, start, end):
    gop = 10  # frames, at 10 frames/s: one keyframe a second
    source = write_video(tmp_path / "in.mp4", numbered_frames(100), fps=10, gop=gop,
                         options={"bf": "0", "sc_threshold": "0"})
    first, last = cut_clip([(source, 0.0)], tmp_path / "clip.mp4", start, end)
    frames = decode(tmp_path / "clip.mp4")
    numbers = [n for _, n in frames]
    assert numbers == list(range(numbers[0], numbers[-1] + 1))  # every frame, in order: nothing re-encoded away
    first_frame = numbers[0]
    assert first_frame / 10 <= start + 1e-6 and start - first_frame / 10 < gop / 10  # within one GOP before
    assert first == pytest.approx(first_frame / 10)
    assert numbers[-1] == min(99, int(end * 10 + 1e-6))  # through the asked end (or the end of the file)
    assert frames[0][0] == pytest.approx(0.0, abs=0.05)


def write_segments(tmp_path: Path, origin: float, count: int = 3) -> Path:
    """`count` MPEG-TS segments of 2 s (20 frames each, numbered 0..), named like decoder.SegmentWriter's."""
    video = tmp_path / "video"
    video.mkdir()
    frames = numbered_frames(20 * count)
    for index in range(count):
        mp4 = write_video(tmp_path / f"seg{index}.mp4", frames[index * 20:(index + 1) * 20], fps=10, gop=10,
                          options={"bf": "0", "sc_threshold": "0"})
        target = video / f"{int((origin + index * 2) * 1000)}.ts"
        with av.open(str(mp4)) as src, av.open(str(target), "w", format="mpegts") as dst:
            out = dst.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.dts is None:
                    continue
                packet.stream = out
                dst.mux(packet)
    return video


def test_clip_from_live_segments_spans_segments(tmp_path):
    """Recorded segments named by the wall-clock ms of their first packet, cut across a segment boundary."""
    origin = 1_700_000_000.0
    video = write_segments(tmp_path, origin)
    start, end = origin + 1.55, origin + 4.3
    sources = segment_sources(video, start, end)
    assert [p.name for p, _ in sources] == sorted(p.name for p in video.glob("*.ts"))
    first, last = cut_clip(sources, tmp_path / "clip.mp4", start, end)
    numbers = [n for _, n in decode(tmp_path / "clip.mp4")]
    assert numbers == list(range(10, 44))  # keyframe at frame 10 (1.0 s) through frame 43 (4.3 s)
    assert first == pytest.approx(origin + 1.0)


def test_a_clip_is_cut_when_the_newest_segment_is_still_empty(tmp_path):
    """A live recording's newest segment stays empty on disk until its first packets are flushed; a clip whose
    window reached into it failed whole ("Invalid data"), although the segments before held the video (an
    audit). An unreadable segment among several is skipped."""
    origin = 1_700_000_000.0
    video = write_segments(tmp_path, origin)
    (video / f"{int((origin + 6) * 1000)}.ts").write_bytes(b"")  # just opened by the writer
    start, end = origin + 3.05, origin + 6.5
    sources = segment_sources(video, start, end)
    assert len(sources) == 3
    first, last = cut_clip(sources, tmp_path / "clip.mp4", start, end)
    numbers = [n for _, n in decode(tmp_path / "clip.mp4")]
    assert numbers == list(range(30, 60)) and first == pytest.approx(origin + 3.0)


def test_a_looped_files_alert_clip_comes_from_the_pass_it_fired_in(tmp_path):
    """A file stream with `loop = true` goes on in time from pass to pass, but its clips were cut from the file
    at those times as if it were the first pass: every clip after the first pass failed ("no recorded video",
    found by an audit). The clip now comes from the file at the time within its pass."""
    import tracker
    from streamer.alerts import AlertSettings, StreamAlerts
    from streamer.rules import Rule

    source = write_video(tmp_path / "in.mp4", numbered_frames(50), fps=10, gop=10,
                         options={"bf": "0", "sc_threshold": "0"})
    settings = AlertSettings(directory=str(tmp_path / "cam"), source=str(source), pre_capture=1.0, post_capture=1.0,
                             snapshots=False)
    stream = StreamAlerts("cam", "run", [], [], [Rule("any", "person")], settings, live=False)
    track = tracker.Tracker(tracker.TrackerConfig(min_hits=1))
    ts = 2 * 5.0 + 2.0  # the third pass (a pass: 50 frames at 10 frames/s), 2 s into it
    update = track.update(np.array([[10.0, 10.0, 30.0, 40.0]]), np.array([0.9]), ["person"], 120)
    [(kind, fired)], _ = stream.on_frame(update, np.zeros((64, 64, 3), np.uint8), ts)
    assert kind == "alert"
    [(kind, ready)] = stream.tick(ts + 1.5)
    assert ready["event"] == "clip_ready", ready
    numbers = [n for _, n in decode(ready["clip"])]
    assert numbers == list(range(10, 31))  # keyframe at 1.0 s of the pass through 3.0 s
    assert ready["clip_start"] == pytest.approx(11.0) and ready["clip_end"] == pytest.approx(13.0)


def test_clip_outside_the_recording_is_a_clear_error(tmp_path):
    source = write_video(tmp_path / "in.mp4", numbered_frames(10), fps=10)
    with pytest.raises(ValueError, match="no recorded video"):
        cut_clip([(source, 0.0)], tmp_path / "clip.mp4", 50.0, 55.0)
    assert not (tmp_path / "clip.mp4").exists() and not (tmp_path / "clip.mp4.part").exists()


# -- retention ------------------------------------------------------------------------------------------------------

DAY = 86400.0
NOW = 1_800_000_000.0


def make_file(path: Path, age_days: float, size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = NOW - age_days * DAY
    os.utime(path, (when, when))
    return path


def recordings(root: Path) -> dict[str, Path]:
    files = {
        "old_events": make_file(root / "cam" / "events-20260101T000000Z-1.jsonl", 40),
        "new_events": make_file(root / "cam" / "events-20261101T000000Z-2.jsonl", 3),
        "current_events": make_file(root / "cam" / "events-RUN-3.jsonl", 50),  # this run's: being written
        "old_segment": make_file(root / "cam" / "video" / "1000.ts", 9),
        "mid_segment": make_file(root / "cam" / "video" / "2000.ts", 8),
        "newest_segment": make_file(root / "cam" / "video" / "3000.ts", 8.5),  # the decoder appends to it
        "old_snapshot": make_file(root / "cam" / "snapshots" / "a.jpg", 31),
        "new_snapshot": make_file(root / "cam" / "snapshots" / "b.jpg", 1),
        "old_clip": make_file(root / "cam" / "clips" / "a.mp4", 35),
        "partial_clip": make_file(root / "cam" / "clips" / "b.mp4.part", 90),
        "unrelated": make_file(root / "cam" / "notes.txt", 400),
    }
    return files


def test_retention_deletes_exactly_the_expired_files_oldest_first_and_none_being_written(tmp_path):
    files = recordings(tmp_path)
    policy = RetainPolicy(days={"events": 30, "segments": 7, "snapshots": 30, "clips": 30})
    retention = Retention(tmp_path, policy, current_run="RUN", clock=lambda: NOW)
    deleted, report = retention.run()
    names = [f.path for f in deleted]
    assert names == [files["old_events"], files["old_clip"], files["old_snapshot"], files["old_segment"],
                     files["mid_segment"]]  # oldest first
    assert report["expired"] == 5
    for key in ("new_events", "current_events", "newest_segment", "new_snapshot", "partial_clip", "unrelated"):
        assert files[key].exists(), key
    assert retention.run()[0] == []  # nothing more on a second pass at the same time


def test_retention_over_size_and_low_disk_delete_the_oldest(tmp_path):
    files = recordings(tmp_path)
    policy = RetainPolicy(days={}, max_gigabytes=7500 / GIB)  # 9 files of 1000 bytes counted; keep 7.5 kB
    deleted, report = Retention(tmp_path, policy, current_run="RUN", clock=lambda: NOW).run()
    assert [f.path for f in deleted] == [files["old_events"], files["old_clip"]]
    assert report["over_size"] == 2

    free = {"bytes": int(0.5 * GIB)}
    policy = RetainPolicy(days={}, min_free_gigabytes=0.5 + 1500 / GIB)  # needs 1500 bytes more: two files
    retention = Retention(tmp_path, policy, current_run="RUN", clock=lambda: NOW, free_bytes=lambda _: free["bytes"])
    deleted, report = retention.run()
    assert [f.path for f in deleted] == [files["old_segment"], files["mid_segment"]]  # video first, oldest first
    assert report["disk_low"] and report["low_disk"] == 2
    assert files["newest_segment"].exists() and files["new_snapshot"].exists()


def test_retention_expires_a_redacted_files_run_folders_but_not_the_one_being_written(tmp_path):
    """A redacted file stream records each run in `video/<run>/` (media-time names like `0.ts`, `10000.ts`, of no
    fixed width): its segments expire like a camera's, an earlier run's folder goes once empty, and the current
    run's newest segment (being written) stays whatever its age."""
    video = tmp_path / "file" / "video"
    old_run = [make_file(video / "20260101T000000Z-1" / name, 20) for name in ("0.ts", "9000.ts", "10000.ts")]
    current = [make_file(video / "RUN" / name, 20) for name in ("0.ts", "9000.ts", "10000.ts")]
    policy = RetainPolicy(days={"segments": 7})
    deleted, report = Retention(tmp_path, policy, current_run="RUN", clock=lambda: NOW).run()
    assert {f.path for f in deleted} == set(old_run) | set(current[:2])
    assert {f.category for f in deleted} == {"segments"} and report["expired"] == 5
    assert current[2].exists()  # 10000.ts, not 9000.ts: the newest by time, not by name
    assert not (video / "20260101T000000Z-1").exists() and (video / "RUN").is_dir()


def test_retention_never_deletes_a_file_written_moments_ago(tmp_path):
    path = make_file(tmp_path / "cam" / "snapshots" / "c.jpg", 100)
    os.utime(path, (NOW - 3, NOW - 3))
    policy = RetainPolicy(days={"snapshots": 1})
    assert Retention(tmp_path, policy, clock=lambda: NOW).run()[0] == []
    assert Retention(tmp_path, policy, clock=lambda: NOW + 2 * DAY).run()[0][0].path == path


def test_retention_with_the_real_clock_leaves_fresh_files(tmp_path):
    make_file(tmp_path / "cam" / "clips" / "x.mp4", 0)
    os.utime(tmp_path / "cam" / "clips" / "x.mp4", (time.time(), time.time()))
    policy = RetainPolicy(days={"clips": 1})
    assert Retention(tmp_path, policy).run()[0] == []


def test_live_alert_clip_is_cut_from_segments_once_post_capture_has_passed(tmp_path, monkeypatch):
    """A live stream's alert plans its clip at once (path in the alert) and cuts it from the recorded segments
    only after post_capture (plus the writer's flush margin) has passed on the wall clock."""
    import tracker
    from streamer import alerts as alerts_module
    from streamer.alerts import AlertSettings, StreamAlerts
    from streamer.rules import Rule

    origin = 1_700_000_000.0
    video = write_segments(tmp_path, origin)
    settings = AlertSettings(directory=str(tmp_path / "cam"), video_directory=str(video), pre_capture=1.5,
                             post_capture=1.0, snapshots=False)
    stream = StreamAlerts("cam", "run", [], [], [Rule("any", "person")], settings, live=True)
    track = tracker.Tracker(tracker.TrackerConfig(min_hits=1))
    clock = {"now": origin + 3.0}
    monkeypatch.setattr(alerts_module.time, "time", lambda: clock["now"])
    update = track.update(np.array([[10.0, 10.0, 30.0, 40.0]]), np.array([0.9]), ["person"], 0)
    events, fields = stream.on_frame(update, np.zeros((64, 64, 3), np.uint8), origin + 3.0)
    [(kind, fired)] = events
    assert kind == "alert" and fired["clip"].endswith(".mp4") and fired["has_clip"] is False
    assert fields[1]["clip"] == fired["clip"] and fields[1]["has_clip"] is False
    clock["now"] = origin + 4.5  # post_capture passed, but not the flush margin
    assert stream.tick(None) == []
    clock["now"] = origin + 6.5
    [(kind, ready)] = stream.tick(None)
    assert ready["event"] == "clip_ready" and ready["clip"] == fired["clip"]
    numbers = [n for _, n in decode(ready["clip"])]
    assert numbers == list(range(10, 41))  # keyframe at 1.0 s (<= 3.0 - 1.5) through 4.0 s
    assert ready["clip_start"] == pytest.approx(origin + 1.0) and ready["clip_end"] == pytest.approx(origin + 4.0)
    assert stream._all_track_fields(np.array([1]), np.array([stream.rows.row_of[1]]))[1]["has_clip"] is True


def test_supervisor_low_disk_pass_deletes_oldest_video_and_says_so(tmp_path):
    """With less free disk than `min_free_gigabytes`, the supervisor's expiry pass deletes the oldest video and
    publishes an `error` event `disk_low` on the stream whose files went."""
    from streamer.config import parse_config
    from streamer.daemon import Supervisor

    config = parse_config({"streams": [{"id": "cam", "url": "rtsp://127.0.0.1/cam", "prompt": "a person ."}],
                           "record": {"directory": str(tmp_path / "rec"), "retain": {"min_free_gigabytes": 1}}})
    supervisor = Supervisor(config)
    old = make_file(tmp_path / "rec" / "cam" / "video" / "1000.ts", 2, size=4000)
    newest = make_file(tmp_path / "rec" / "cam" / "video" / "2000.ts", 1, size=4000)
    supervisor.retention.free_bytes = lambda _: GIB - 2000
    supervisor.retention.clock = lambda: NOW

    class Sender:
        events: list = []

        def send(self, event):
            self.events.append(event)
            return True

    supervisor.sender = Sender()
    supervisor.expire()
    assert not old.exists() and newest.exists()
    [event] = supervisor.sender.events
    assert event["kind"] == "error" and event["error_type"] == "disk_low" and event["stream"] == "cam"
    assert event["deleted"] == 1 and event["fatal"] is False


def test_the_demo_deletes_no_recordings_beside_its_own(tmp_path):
    """`groundwatch demo -o runs` records into runs/recordings, the default config's folder, with the default
    expiry (7 days of video, a 1 GB free-disk floor), so the demo's daemon deleted a real daemon's older video
    there (found by an audit). The demo's retention deletes nothing, whatever the age or the disk."""
    import os

    from streamer.demo import demo_config
    from streamer.retention import build_retention

    config = demo_config(tmp_path / "runs")
    video = tmp_path / "runs" / "recordings" / "frontdoor" / "video"
    video.mkdir(parents=True)
    segments = [video / "1700000000000.ts", video / "1700000060000.ts"]  # the newer one counts as being written
    for path in segments:
        path.write_bytes(b"\x47" * 188 * 10)
        month_ago = NOW - 30 * DAY
        os.utime(path, (month_ago, month_ago))
    retention = build_retention(config.record, current_run=None)
    retention.clock, retention.free_bytes = (lambda: NOW), (lambda _: 0)  # a month later, and a full disk
    assert retention.run()[0] == []
    assert all(path.exists() for path in segments)
