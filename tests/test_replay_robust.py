"""`groundwatch replay` against hostile or mismatched inputs (issue 11, defect 8).

Each test reproduces what used to be a traceback or a wrong picture: bad lines in the event log, a log from a
video of another size or length, and an output path equal to the input.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from streamer import cli
from streamer.media import write_video
from streamer.replay import ReplayError, replay

BOX = [10, 10, 40, 40]


def detection_line(frame: int, width: int = 96, height: int = 64, box=BOX, **extra) -> dict:
    line = {"v": 1, "seq": frame + 2, "stream": "s", "kind": "detections", "frame": frame, "ts": frame / 10,
            "width": width, "height": height,
            "detections": [{"box": list(box), "score": 0.9, "phrase": "box", "track_id": 1}]}
    line.update(extra)
    return line


def write_log(path: Path, lines: list) -> Path:
    """Lines are dicts (written as JSON) or raw bytes (written as they are)."""
    status = {"v": 1, "seq": 1, "stream": "s", "kind": "status", "state": "online", "source": "file", "ts": 0}
    body = json.dumps(status).encode() + b"\n"
    for line in lines:
        body += (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
    path.write_bytes(body)
    return path


@pytest.fixture
def video(tmp_path) -> Path:
    return write_video(tmp_path / "in.mp4", np.zeros((6, 64, 96, 3), np.uint8))


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def box_edge_drawn(image: np.ndarray, box=BOX, scale: float = 1.0) -> bool:
    x1, y1, _, y2 = (int(round(v * scale)) for v in box)
    return image[y1 + 2: y2 - 2, x1: x1 + 2].max() > 100


@pytest.mark.parametrize("bad", [
    b"\x00" * 40,  # a NUL-filled line (what a crash on some filesystems leaves): UnicodeDecodeError
    b"[1, 2, 3]",  # a JSON list: AttributeError
    b"42",  # a JSON number: AttributeError
    json.dumps({"v": 1, "kind": "detections", "ts": 0.1, "detections": []}).encode(),  # no frame: KeyError
    json.dumps(detection_line(1, detections=None)).encode(),  # detections null: TypeError
    json.dumps(detection_line(1, detections=[{"box": "x"}])).encode(),  # a box that is not four numbers
    json.dumps({**detection_line(1), "frame": "one"}).encode(),  # a frame index that is not an integer
    # nested deeper than the parser's recursion limit: RecursionError
    pytest.param(b"[" * 200_000, id="deeply-nested"),
    # a frame width that is not an integer: unhashable list
    pytest.param(json.dumps(detection_line(1, width=[1])).encode(), id="width-a-list"),
    # finite but beyond int32: cv2.error, from the box and from its track's trail
    pytest.param(json.dumps(detection_line(1, box=[1e300, 1, 2, 3])).encode(), id="box-1e300"),
    pytest.param(json.dumps(detection_line(1, box=[1e12, 1, 1e12, 3])).encode(), id="trail-1e12"),
    # integers no float holds: OverflowError in the checks, then in the track's colour
    pytest.param(json.dumps(detection_line(1, box=[1, 1, 2, 10 ** 400])).encode(), id="box-10e400"),
    pytest.param(json.dumps(detection_line(1, detections=[{"box": BOX, "score": 1, "track_id": 10 ** 400}]))
                 .encode(), id="track-id-10e400"),
])
def test_bad_lines_are_skipped_and_counted(tmp_path, video, bad):
    """Each of these lines used to end replay with a traceback (the last six were found by a second audit: only
    ValueError was caught around the parser, width was used as a dict key, a finite box of 1e300 passed the checks
    and broke cv2); it must be skipped, counted, and the rest drawn."""
    log = write_log(tmp_path / "events.jsonl", [detection_line(0), bad, detection_line(2)])
    summary = replay(video, log, tmp_path / "out.mp4", progress=False)
    assert summary.bad_lines == 1
    assert summary.frames == 6 and summary.frames_with_events == 2
    frames = decoded(tmp_path / "out.mp4")
    assert box_edge_drawn(frames[0]) and box_edge_drawn(frames[2])


def test_frames_without_events_are_drawn_bare(tmp_path, video):
    """The last event's boxes used to stay on every later frame (1,740 of 1,800 in the report): a frame of a
    file recording with no event of its own shows no boxes."""
    log = write_log(tmp_path / "events.jsonl", [detection_line(0), detection_line(1)])
    summary = replay(video, log, tmp_path / "out.mp4", progress=False)
    frames = decoded(tmp_path / "out.mp4")
    assert box_edge_drawn(frames[0]) and box_edge_drawn(frames[1])
    assert not any(box_edge_drawn(image) for image in frames[2:])
    assert summary.frames_with_events == 2
    assert any("4 of 6 frames have no events" in warning for warning in summary.warnings)


def test_fps_capped_recording_holds_boxes_until_the_next_event(tmp_path, video):
    """With `fps` capping a file, events come every k-th frame; the boxes stay for those k frames only."""
    log = write_log(tmp_path / "events.jsonl", [detection_line(0), detection_line(2)])
    replay(video, log, tmp_path / "out.mp4", progress=False)
    drawn = [box_edge_drawn(image) for image in decoded(tmp_path / "out.mp4")]
    assert drawn == [True, True, True, True, False, False]


def test_log_of_a_smaller_video_is_scaled_with_a_warning(tmp_path):
    """A 320x240 log over a 640x480 video used to put every box in the top-left quarter. Same aspect ratio
    (the daemon scales large frames down to `max_width`): boxes are scaled to the video, with a warning."""
    video = write_video(tmp_path / "big.mp4", np.zeros((3, 128, 192, 3), np.uint8))
    log = write_log(tmp_path / "events.jsonl", [detection_line(i) for i in range(3)])
    summary = replay(video, log, tmp_path / "out.mp4", progress=False)
    assert any("96x64" in warning and "192x128" in warning for warning in summary.warnings)
    first = decoded(tmp_path / "out.mp4")[0]
    assert box_edge_drawn(first, scale=2.0) and not box_edge_drawn(first, scale=1.0)


def test_log_of_another_shape_is_refused(tmp_path, video):
    """A log whose frames have another aspect ratio belongs to another video: refused with a message."""
    log = write_log(tmp_path / "events.jsonl", [detection_line(i, width=64, height=64) for i in range(3)])
    with pytest.raises(ReplayError, match="64x64.*96x64"):
        replay(video, log, tmp_path / "out.mp4", progress=False)
    assert not (tmp_path / "out.mp4").exists()
    summary = replay(video, log, tmp_path / "out.mp4", progress=False, force=True)
    assert summary.frames == 6


def test_a_file_that_is_no_event_log_is_refused(tmp_path, video):
    """A video given as --events (an easy slip: both are in the recording folder) drew a box-free copy and exited 0
    with only "N bad lines skipped" (found by the new-user audit): a file without one event is refused."""
    with pytest.raises(ReplayError, match="holds no events"):
        replay(video, video, tmp_path / "out.mp4", progress=False)
    assert not (tmp_path / "out.mp4").exists()


def test_log_longer_than_the_video_is_refused(tmp_path, video):
    """Events for frames the video does not have mean the log belongs to another (longer) video."""
    log = write_log(tmp_path / "events.jsonl", [detection_line(i) for i in (0, 1, 50)])
    with pytest.raises(ReplayError, match="frame 50.*6 frames"):
        replay(video, log, tmp_path / "out.mp4", progress=False)


def test_output_equal_to_input_is_refused(tmp_path, video):
    """`-o` equal to the video used to overwrite the source recording."""
    log = write_log(tmp_path / "events.jsonl", [detection_line(0)])
    before = video.read_bytes()
    for output in (video, tmp_path / "." / "in.mp4", log):
        with pytest.raises(ReplayError, match="overwrite"):
            replay(video, log, output, progress=False)
    assert video.read_bytes() == before


def test_cli_replay_reports_refusals_and_skipped_lines(tmp_path, video, capsys):
    log = write_log(tmp_path / "events.jsonl", [detection_line(0), b"\x00\x00", detection_line(9)])
    assert cli.main(["replay", str(video), "--events", str(log), "-o", str(video), "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert cli.main(["replay", str(video), "--events", str(log), "-o", str(tmp_path / "o.mp4"), "--quiet"]) == 2
    assert "frame 9" in capsys.readouterr().err
    assert cli.main(["replay", str(video), "--events", str(log), "-o", str(tmp_path / "o.mp4"), "--quiet",
                     "--force"]) == 0
    captured = capsys.readouterr()
    assert "1 bad line skipped" in captured.err and "6 frames" in captured.out


def test_an_interrupted_replay_leaves_the_previous_output_whole(tmp_path, video, monkeypatch):
    """The replay was written in place: Ctrl-C (or a decode error) half-way still finished the file, so a shortened
    replay played as if complete, and the previous file at that path was already gone (found by an audit). It is
    now written under a temporary name and renamed when whole."""
    import streamer.replay as replay_module

    frames = np.zeros((80, 64, 96, 3), np.uint8)
    frames[:, :, :, 1] = np.arange(80, dtype=np.uint8)[:, None, None] * 3  # frames that differ: real packets
    video = write_video(tmp_path / "long.mp4", frames)
    log = write_log(tmp_path / "events.jsonl", [detection_line(i) for i in range(80)])
    output = tmp_path / "out.mp4"
    replay(video, log, output, progress=False)
    before = output.read_bytes()
    drawn = {"frames": 0}
    real_draw = replay_module.draw_overlay

    def interrupted(*args, **kwargs):
        drawn["frames"] += 1
        if drawn["frames"] == 70:  # past the encoder's look-ahead: packets of this run were written
            raise KeyboardInterrupt
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(replay_module, "draw_overlay", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replay(video, log, output, progress=False)
    assert output.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["events.jsonl", "in.mp4", "long.mp4", "out.mp4"])


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for index in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_unreadable_or_videoless_files_are_refused_with_a_message(tmp_path, video, capsys):
    """A 0-byte or cut-short MP4 ended `groundwatch replay` with av's InvalidDataError traceback (or an
    AttributeError, when the cut left a stream without a codec), and an audio-only file with an IndexError (found by
    an audit). Each is a ReplayError naming the file, one line from the CLI, and nothing is left at the output."""
    log = write_log(tmp_path / "events.jsonl", [detection_line(0)])
    output = tmp_path / "out.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ReplayError, match="empty.mp4"):
        replay(empty, log, output, progress=False)
    with pytest.raises(ReplayError, match="audio.mp4 has no video stream"):
        replay(audio_only(tmp_path / "audio.mp4"), log, output, progress=False)
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    for size in range(0, len(data), max(1, len(data) // 40)):  # every kind of cut: no moov, half a moov, no mdat
        cut.write_bytes(data[:size])
        try:
            replay(cut, log, output, progress=False)
        except ReplayError as exc:
            assert "cut.mp4" in str(exc), (size, exc)
    assert not output.exists() or decoded(output)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial output left
    assert cli.main(["replay", str(empty), "--events", str(log), "-o", str(output), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("groundwatch replay: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_boxes_scaled_far_beyond_the_frame_are_drawn_clipped():
    """Box and trail coordinates beyond int32 (a log of a tiny frame size scaled up to a large video) broke cv2 and
    numpy; they are clipped: what shows in the frame is the same, and nothing raises."""
    from collections import deque

    from streamer.replay import draw_overlay

    image = np.zeros((64, 96, 3), np.uint8)
    detection = {"box": [-3e9, 10, 3e9, 40], "score": 0.9, "phrase": "box", "track_id": 1}
    assert draw_overlay(image, [detection], {1: deque([(-3e9, 20), (3e9, 20)])}) == 1
    assert image[40, 10:90].max() > 100 and image[20, 10:90].max() > 100  # the bottom edge and the trail
