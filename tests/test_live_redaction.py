"""Live redaction in the inference worker (streamer/redaction.py), with a deterministic fake detector: the redact
phrases ride in the watch prompt's pass and are split off again, boxes are carried through misses, and nothing of
a frame leaves the worker unredacted (previews, recording, snapshots), failures included. The daemon end to end
over a real RTSP server is tests/test_live_redaction_e2e.py."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import av
import cv2
import numpy as np
import pytest

import fakes as helpers
from streamer.alerts import AlertSettings, StreamAlerts
from streamer.clips import cut_clip, segment_sources
from streamer.config import ConfigError, parse_config
from streamer.inference import InferenceWorker, build_tracker
from streamer.redaction import (RedactedSegmentWriter, RedactionSettings, StreamRedaction, detector_prompt,
                                redact_phrases)
from streamer.rules import Rule
from streamer.web.preview import PreviewEncoder, PreviewSettings
from tracker import TrackerConfig

HEIGHT, WIDTH = 48, 64
SECRET = (24, 12, 44, 32)  # xyxy of the secret's checkerboard in every frame (unless the frame says otherwise)


def scene(index: int, secret_at: int | None = None) -> np.ndarray:
    """Grey frame; a checkerboard 'secret' (sharp 2 px squares: any unblurred pixel of it shows) at SECRET
    shifted by `secret_at` px; a flat white 'thing' in the lower-left corner; pixel (0, 0) carries the index."""
    frame = np.full((HEIGHT, WIDTH, 3), 120, np.uint8)
    x1, y1, x2, y2 = SECRET
    shift = secret_at or 0
    yy, xx = np.mgrid[y1:y2, x1 + shift:x2 + shift]
    frame[y1:y2, x1 + shift:x2 + shift] = np.where(((yy // 2 + xx // 2) % 2)[..., None] == 1, 250, 5)
    frame[36:46, 2:12] = 255
    frame[0, 0] = index
    return frame


def secret_leaks(picture: np.ndarray, shift: int = 0, tolerance: float = 20.0) -> bool:
    """Whether the secret's checkerboard is still visible: its region keeps the sharp 2 px alternation."""
    x1, y1, x2, y2 = SECRET
    region = picture[y1 + 2:y2 - 2, x1 + shift + 2:x2 + shift - 2].astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(region, axis=1)).mean()) > tolerance


@dataclass
class Found:
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    phrases: list


class SecretDetector:
    """Finds 'thing' (the white corner) and, when the prompt has it, 'secret' at the checkerboard. A frame whose
    index is in `miss` has no secret box; in `nan` its secret box is NaN; in `fail` the whole call raises."""

    def __init__(self, miss=(), nan=(), fail=()) -> None:
        self.encoded: list[str] = []
        self.miss, self.nan, self.fail = set(miss), set(nan), set(fail)

    def encode(self, prompt):
        self.encoded.append(prompt)
        return prompt

    def detect(self, frames, prompt):
        out = []
        for frame in frames:
            index = int(frame[0, 0, 0])
            if index in self.fail:
                raise RuntimeError("detector broke")
            boxes, phrases = [[2, 36, 12, 46]], ["thing"]
            if "secret" in prompt and index not in self.miss:
                shift = 4 if index >= 100 else 0
                x1, y1, x2, y2 = SECRET
                boxes.append([x1 + shift, y1, x2 + shift, y2] if index not in self.nan else [np.nan] * 4)
                phrases.append("secret")
            out.append(Found(np.array(boxes, np.float32), np.full(len(boxes), 0.9, np.float32), phrases))
        return out


class Sender(helpers.ListSender):
    def __init__(self) -> None:
        super().__init__()
        self.frames: list[list[bytes]] = []

    def send_frames(self, frames):
        self.frames.append(frames)
        return True


def redaction(tmp_path=None, **changes) -> StreamRedaction:
    settings = RedactionSettings(phrases=redact_phrases("secret ."), prompt="secret .", padding=0.1,
                                 carry_frames=2, video_directory=str(tmp_path / "video") if tmp_path else None,
                                 segment_seconds=2.0)
    return StreamRedaction(RedactionSettings(**{**settings.__dict__, **changes}))


def run_worker(mailbox_factory, stats_factory, detector, frames, *, tmp_path, prompt="thing .", redacted=True,
               alerts=None):
    stream = helpers.stream_config("cam", True, prompt)
    mailbox = mailbox_factory("cam", slots=4, width=WIDTH, height=HEIGHT)
    stats = stats_factory(["cam"])
    sender = Sender()
    clock = iter(range(0, 10_000, 10)).__next__  # every frame's preview is due
    worker = InferenceWorker(
        detector=detector, streams=[stream], mailboxes={"cam": mailbox}, stats=stats, sender=sender,
        tracker_factory=lambda: build_tracker(TrackerConfig(min_hits=1, max_age=3)), batch_size=1,
        previews=PreviewEncoder(PreviewSettings(fps=1, short_side=HEIGHT, quality=95), clock=clock),
        redactions={"cam": redaction(tmp_path)} if redacted else None, alerts=alerts)
    worker.prepare_prompts()
    for k, (index, frame) in enumerate(frames):
        mailbox.put(frame, frame_index=index, pts=k * 0.1, ts=1000.0 + k * 0.5, live=True)
        worker.step()
    for item in worker.redactions.values():
        item.close()
    return worker, sender, stats


def previews_of(sender) -> dict[int, np.ndarray]:
    shown = {}
    for topic, header, jpeg in sender.frames:
        picture = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        shown[json.loads(header)["frame"]] = picture
    return shown


def recorded(directory) -> list[np.ndarray]:
    pictures = []
    for path in sorted(directory.glob("*.ts"), key=lambda p: int(p.stem)):
        with av.open(str(path)) as container:
            pictures.extend(f.to_ndarray(format="rgb24") for f in container.decode(video=0))
    return pictures


def test_detector_prompt_appends_only_the_redact_phrases_the_prompt_lacks():
    assert detector_prompt("person . car .", None) == "person . car ."
    assert detector_prompt("person . car .", "Face . car .") == "person . car . face ."
    assert detector_prompt("person", "face .") == "person . face ."
    assert detector_prompt("person . face .", "face .") == "person . face ."
    assert redact_phrases(" Face .licence  plate. face .") == ("face", "licence plate")


def test_split_publishes_watched_phrases_and_redacts_redact_phrases_and_the_unsure():
    """A redact-only phrase is not published; a phrase in both is both; a phrase the split cannot place (text
    threshold cut it short) is redacted and published: unsure means redact."""
    item = redaction(prompt="secret . face .", phrases=("secret", "face"))
    result = Found(np.arange(16, dtype=np.float32).reshape(4, 4), np.full(4, 0.9, np.float32),
                   ["thing", "secret", "face", "secr"])
    found, boxes, _ = item.split(result, "thing . face .")
    assert found.phrases == ["thing", "face", "secr"]
    assert boxes.tolist() == result.boxes_xyxy[1:].tolist()


def test_previews_and_recording_are_redacted_and_redact_phrases_not_published(mailbox_factory, stats_factory,
                                                                             tmp_path):
    detector = SecretDetector()
    frames = [(k, scene(k)) for k in range(1, 9)]
    worker, sender, stats = run_worker(mailbox_factory, stats_factory, detector, frames, tmp_path=tmp_path)
    assert detector.encoded == ["thing . secret ."]  # one pass, one encoding: the redact phrase rides along
    detections = [e for e in sender.events if e["kind"] == "detections"]
    assert len(detections) == 8
    assert all([d["phrase"] for d in e["detections"]] == ["thing"] for e in detections)
    shown = previews_of(sender)
    assert sorted(shown) == list(range(1, 9))
    assert not any(secret_leaks(p) for p in shown.values())
    assert all(not secret_leaks(p) for p in recorded(tmp_path / "video"))
    assert len(recorded(tmp_path / "video")) == 8
    assert stats.get("cam", "frames_redacted") == 8
    # The check can fail: the same frames without redaction show the secret.
    _, plain, _ = run_worker(mailbox_factory, stats_factory, SecretDetector(), frames, tmp_path=tmp_path / "b",
                             redacted=False)
    assert all(secret_leaks(p) for p in previews_of(plain).values())


def test_a_missed_detection_is_covered_by_the_carried_box_then_dropped(mailbox_factory, stats_factory, tmp_path):
    """Live has no look-ahead: frames 3 and 4 have no secret box, the box of frame 2 is carried (2 frames)."""
    detector = SecretDetector(miss={3, 4, 5})
    frames = [(k, scene(k)) for k in range(1, 6)]
    _, sender, _ = run_worker(mailbox_factory, stats_factory, detector, frames, tmp_path=tmp_path)
    shown = previews_of(sender)
    assert [secret_leaks(shown[k]) for k in range(1, 6)] == [False, False, False, False, True]


def test_recording_segments_keep_the_layout_and_clips_cut_from_them(tmp_path):
    """Names are the ms of each segment's first frame, a new segment every segment_seconds, each starting on a
    keyframe; a clip is cut from them like from copied packets."""
    writer = RedactedSegmentWriter(tmp_path / "video", segment_seconds=2.0)
    for k in range(25):
        frame = scene(k)
        frame[:8, :16] = k * 8  # the index, in a block that survives the codec
        assert writer.write(frame, 5000.0 + k * 0.25)
    writer.close()
    names = sorted(int(p.stem) for p in (tmp_path / "video").glob("*.ts"))
    assert names == [5000000, 5002000, 5004000, 5006000]
    for path in (tmp_path / "video").glob("*.ts"):
        with av.open(str(path)) as container:
            frames = list(container.decode(video=0))
        assert frames[0].key_frame and float(frames[0].time) == pytest.approx(0.0, abs=0.02)
        assert len(frames) == (8 if int(path.stem) < 5006000 else 1)
    first, last = cut_clip(segment_sources(tmp_path / "video", 5002.6, 5004.4), tmp_path / "clip.mp4", 5002.6,
                           5004.4)
    assert first == pytest.approx(5002.0) and last == pytest.approx(5004.25)  # from the keyframe at or before
    with av.open(str(tmp_path / "clip.mp4")) as container:
        indices = [round(f.to_ndarray(format="rgb24")[2:6, 2:14].mean() / 8) for f in container.decode(video=0)]
    assert indices == list(range(8, 18))


def test_a_frame_whose_redaction_fails_is_dropped_and_counted_never_let_out(mailbox_factory, stats_factory,
                                                                           tmp_path):
    """A NaN redaction box used to be the kind of thing that would pass a frame on raw: now its preview, its
    recording and its snapshot are dropped, counted and reported; its events still go out."""
    detector = SecretDetector(nan={2})
    rule = Rule(name="any", phrase="thing")
    alerts = {"cam": StreamAlerts("cam", "run", [], [], [rule], AlertSettings(directory=str(tmp_path / "cam")),
                                  live=True)}
    worker, sender, stats = run_worker(mailbox_factory, stats_factory, detector, [(2, scene(2))], tmp_path=tmp_path,
                                       alerts=alerts)
    assert previews_of(sender) == {}
    assert recorded(tmp_path / "video") == []
    assert not list((tmp_path / "cam").rglob("*.jpg"))
    assert stats.get("cam", "redaction_failed") == 1
    [error] = [e for e in sender.events if e["kind"] == "error"]
    assert error["error_type"] == "redaction_failed" and error["frame"] == 2
    assert [e["frame"] for e in sender.events if e["kind"] == "detections"] == [2]


def test_a_frame_the_detector_failed_on_leaves_nothing(mailbox_factory, stats_factory, tmp_path):
    """Before a frame is detected on there is nothing to redact with: such a frame is never written or shown."""
    detector = SecretDetector(fail={2})
    _, sender, stats = run_worker(mailbox_factory, stats_factory, detector, [(2, scene(2)), (3, scene(3))],
                                  tmp_path=tmp_path)
    assert sorted(previews_of(sender)) == [3]
    assert len(recorded(tmp_path / "video")) == 1
    assert stats.get("cam", "frames_redacted") == 1


def test_snapshots_are_made_of_redacted_frames(mailbox_factory, stats_factory, tmp_path):
    detector = SecretDetector()
    rule = Rule(name="any", phrase="thing")
    alerts = {"cam": StreamAlerts("cam", "run", [], [], [rule],
                                  AlertSettings(directory=str(tmp_path / "cam"), snapshot_crop=False), live=True)}
    worker, sender, _ = run_worker(mailbox_factory, stats_factory, detector, [(k, scene(k)) for k in (1, 2, 3)],
                                   tmp_path=tmp_path, alerts=alerts)
    fired = [e for e in sender.events if e["kind"] == "alert" and e.get("event") == "fired"]
    assert fired and fired[0]["has_snapshot"]
    picture = cv2.cvtColor(cv2.imread(fired[0]["snapshot"]), cv2.COLOR_BGR2RGB)
    assert not secret_leaks(picture)


def _config(tmp_path, **stream) -> dict:
    (tmp_path / "a.mp4").write_bytes(b"")
    return {"streams": [{"id": "a", "url": "a.mp4", "prompt": "person .", **stream}]}


def test_config_refuses_bad_redaction_settings_in_one_report(tmp_path):
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(tmp_path, redact=" . ", redact_mode="smudge", redact_padding=-1), base_dir=tmp_path)
    report = str(caught.value)
    assert "streams[0].redact: the prompt ' . ' has no words" in report
    assert "streams[0].redact_mode" in report and "streams[0].redact_padding" in report
    with pytest.raises(ConfigError, match=r"streams\[0\].redact: with the prompt, the prompt has \d+ tokens"):
        parse_config({**_config(tmp_path, redact="face . hat . coat . shoe . glove . scarf . bag . ring ."),
                      "model": {"max_prompt_tokens": 16}},
                     base_dir=tmp_path)
    config = parse_config(_config(tmp_path, redact="face ."), base_dir=tmp_path)
    assert config.streams[0].redact == "face ." and config.streams[0].redact_padding == 0.2


def test_a_recording_the_disk_refuses_is_reported_and_the_frames_go_on(mailbox_factory, stats_factory, tmp_path):
    """The redacted recording cannot be written (its folder is a file): a `record_failed` error, events and
    previews go on, and no picture is written anywhere else instead."""
    (tmp_path / "video").write_bytes(b"in the way")
    detector = SecretDetector()
    stream = helpers.stream_config("cam", True, "thing .")
    mailbox = mailbox_factory("cam", slots=4, width=WIDTH, height=HEIGHT)
    sender = Sender()
    from streamer.inference import build_redactions

    settings = RedactionSettings(phrases=("secret",), prompt="secret .", video_directory=str(tmp_path / "video"))
    worker = InferenceWorker(detector=detector, streams=[stream], mailboxes={"cam": mailbox},
                             stats=stats_factory(["cam"]), sender=sender,
                             tracker_factory=lambda: build_tracker(TrackerConfig()), batch_size=1,
                             redactions=build_redactions({"cam": settings}, sender))
    worker.prepare_prompts()
    for k in range(1, 4):
        mailbox.put(scene(k), frame_index=k, pts=k * 0.1, ts=1000.0 + k, live=True)
        worker.step()
        time.sleep(0.2)  # the recorder's thread meets the refusal; its message waits for the next frame
    worker.redactions["cam"].close()
    errors = [e for e in sender.events if e["kind"] == "error"]
    assert errors and errors[0]["error_type"] == "record_failed" and "cannot write redacted video" in errors[0][
        "message"]
    assert len([e for e in sender.events if e["kind"] == "detections"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["video"]


def test_a_clip_due_at_once_is_cut_from_the_frames_just_queued_for_the_recording(mailbox_factory, stats_factory,
                                                                                tmp_path):
    """On a loaded machine a frame is processed after its clip is already due: the clip used to be cut before the
    recorder's thread had written the frame ("no recorded video between ..."); now the queue is drained first."""
    detector = SecretDetector()
    rule = Rule(name="any", phrase="thing")
    settings = AlertSettings(directory=str(tmp_path / "cam"), video_directory=str(tmp_path / "video"),
                             pre_capture=1, post_capture=1)
    alerts = {"cam": StreamAlerts("cam", "run", [], [], [rule], settings, live=True)}
    stream = helpers.stream_config("cam", True, "thing .")
    mailbox = mailbox_factory("cam", slots=4, width=WIDTH, height=HEIGHT)
    sender = Sender()
    worker = InferenceWorker(detector=detector, streams=[stream], mailboxes={"cam": mailbox},
                             stats=stats_factory(["cam"]), sender=sender,
                             tracker_factory=lambda: build_tracker(TrackerConfig(min_hits=1)), batch_size=1,
                             redactions={"cam": redaction(tmp_path)}, alerts=alerts)
    worker.prepare_prompts()
    mailbox.put(scene(1), frame_index=1, pts=0.0, ts=time.time() - 60, live=True)  # decoded a minute ago
    worker.step()
    worker.redactions["cam"].close()
    ready = [e for e in sender.events if e["kind"] == "alert" and e.get("event") in ("clip_ready", "clip_failed")]
    assert [e["event"] for e in ready] == ["clip_ready"], ready
    [picture] = decode_all(ready[0]["clip"])
    assert not secret_leaks(picture)


def decode_all(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_a_second_run_over_a_redacted_file_keeps_the_first_runs_video_and_the_console_replays_each(tmp_path):
    """A redacted file stream's recording was named by media time (`0.ts`, `1000.ts`, ...) in one folder, so a
    second `groundwatch run` over the same file (here after the redact phrase was changed) replaced the first run's
    video, which that run's event log and clips refer to; and the console had no video to replay such a run (the
    raw file is never served). Each run keeps its own recording, and the console replays each run on it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from daemon_harness import Daemon

    from gdino.shapes import render_video
    from streamer.config import load_config
    from streamer.media import write_video
    from streamer.web.recordings import VideoCache, list_recordings
    from streamer.web.settings import build_web_settings

    frames, _ = render_video(4, 30, (120, 160), 10)
    write_video(tmp_path / "clip.mp4", frames, fps=10)
    recordings = tmp_path / "recordings"

    def run(redact: str, log_name: str) -> None:
        daemon = Daemon(tmp_path, f"""
[[streams]]
id = "clip"
url = "clip.mp4"
prompt = "red circle ."
redact = "{redact}"
record_video = true
""", """
[live]
segment_seconds = 1
[supervisor]
exit_when_done = true
shutdown_timeout_seconds = 120
""")
        daemon.start(log_name)
        try:
            assert daemon.wait_exit(300) == 0, daemon.log()
        finally:
            daemon.kill()

    run("blue square", "first.log")
    first = {path: path.read_bytes() for path in (recordings / "clip").rglob("*.ts")}
    assert len(first) >= 2
    run("green triangle", "second.log")
    assert {path: path.read_bytes() for path in first if path.is_file()} == first, "the first run's video changed"
    assert len(list((recordings / "clip").rglob("*.ts"))) >= 2 * len(first) - 1

    settings = build_web_settings(load_config(tmp_path / "config.toml"))
    [stream] = settings.streams
    assert stream.file is None  # the raw source is never served
    runs = list_recordings(settings)["clip"]
    assert len(runs) == 2 and all(item["video"] for item in runs), runs
    cache = VideoCache()
    try:
        for item in runs:
            video = cache.video_for(stream, item["id"])
            assert video.suffix == ".mp4" and Path(video).resolve() != (tmp_path / "clip.mp4").resolve()
            with av.open(str(video)) as container:
                times = [float(frame.time) for frame in container.decode(video=0)]
            assert len(times) == 30  # every frame of the file, once: a run's segments in one video
            assert times[0] < 0.05 and abs(times[-1] - 2.9) < 0.05  # on the file's clock (events align by pts)
    finally:
        cache.close()
