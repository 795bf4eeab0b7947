"""groundwatch redact on real video files: frame count, timestamps and audio kept; bad input refused, nothing
half-written left behind. The detector is replaced by a fixed one here (the real one: test_redact_leak.py)."""

from pathlib import Path

import av
import numpy as np
import pytest

from streamer.cli import main as cli_main
from streamer.editing.redact import RedactError, redact_video, write_redacted
from streamer.editing.planner import FramePlan

FPS = 10
SAMPLE_RATE = 16000


def write_video_with_audio(path: Path, frames: np.ndarray, audio: bool = True) -> Path:
    """H.264 video plus (optionally) a 440 Hz sine tone in AAC, as a phone or a camera with a microphone writes."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = container.add_stream("aac", rate=SAMPLE_RATE) if audio else None
        if sound is not None:
            sound.layout = "mono"
        samples = np.arange(int(SAMPLE_RATE * len(frames) / FPS)) / SAMPLE_RATE
        tone = (0.3 * np.sin(2 * np.pi * 440 * samples)).astype(np.float32)
        per_frame = SAMPLE_RATE // FPS
        for index, image in enumerate(frames):
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
            if sound is not None:
                chunk = av.AudioFrame.from_ndarray(tone[None, index * per_frame:(index + 1) * per_frame],
                                                   format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = SAMPLE_RATE, index * per_frame
                for packet in sound.encode(chunk):
                    container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if sound is not None:
            for packet in sound.encode(None):
                container.mux(packet)
    return path


def frame_times(path: Path) -> list:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.pts * stream.time_base for frame in container.decode(stream)]


def audio_packets(path: Path) -> list[tuple[bytes, int]]:
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return []
        stream = container.streams.audio[0]
        return [(bytes(p), p.pts * stream.time_base) for p in container.demux(stream) if p.dts is not None]


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


BOX = np.array([[20.0, 16.0, 60.0, 56.0]])


def fixed_detector(frames):
    """A white square at BOX on every frame but the 4th and 5th (missed)."""
    fixed_detector.calls += len(frames)
    out = []
    for _ in frames:
        index = len(fixed_detector.seen)
        fixed_detector.seen.append(index)
        missed = index in (3, 4)
        out.append((BOX[:0] if missed else BOX, np.array([] if missed else [0.9]), [] if missed else ["square"]))
    return out


@pytest.fixture
def video(tmp_path) -> Path:
    frames = np.full((16, 96, 128, 3), 90, np.uint8)
    frames[:, 20:52, 24:56] = 255  # a white square inside BOX
    return write_video_with_audio(tmp_path / "in.mp4", frames)


@pytest.fixture(autouse=True)
def reset_detector():
    fixed_detector.calls, fixed_detector.seen = 0, []


def test_same_frames_timestamps_and_audio(video, tmp_path):
    out = tmp_path / "out.mp4"
    summary = redact_video(None, video, out, "square .", mode="fill", detect=fixed_detector)
    assert summary.frames == 16 and summary.audio_streams == 1
    assert frame_times(out) == frame_times(video)
    audio_in, audio_out = audio_packets(video), audio_packets(out)
    assert audio_in and audio_out == audio_in, "the audio was not copied packet for packet"
    pixels = decoded(out)
    # Filled black on every frame, the two missed ones included (the track bridges them).
    assert pixels[:, 24:48, 28:52].max() < 40, "the square shows through on some frame"
    assert abs(int(pixels[:, 80:, 100:].mean()) - 90) <= 3, "outside the box the picture changed"
    assert not list(tmp_path.glob(".out.partial-*")), "a temporary file was left behind"


def test_an_undecodable_video_is_a_clear_error_and_writes_nothing(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    out = tmp_path / "out.mp4"
    with pytest.raises(RedactError, match="cannot decode"):
        redact_video(None, broken, out, "face .", detect=fixed_detector)
    assert list(tmp_path.iterdir()) == [broken]
    assert cli_main(["redact", str(broken), "--prompt", "face .", "-o", str(out), "--quiet"]) == 2
    assert list(tmp_path.iterdir()) == [broken]


def test_an_unwritable_output_is_refused_before_any_work(video, tmp_path, capsys):
    for output, message in ((tmp_path / "missing" / "out.mp4", "does not exist"),
                            (tmp_path, "is a directory"),
                            (video, "would overwrite the input"),
                            (tmp_path / "out.gif", "use a .mp4")):
        with pytest.raises(RedactError, match=message):
            redact_video(None, video, output, "face .", detect=fixed_detector)
    assert fixed_detector.calls == 0
    assert cli_main(["redact", str(video), "--prompt", "face .", "-o", str(tmp_path / "no" / "o.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_report_named_after_the_video_is_written_and_bad_report_paths_are_refused(video, tmp_path, capsys):
    """`--report in.json` beside `in.mp4` was refused with "the output in.mp4 would overwrite the input in.mp4":
    the report path was checked as if it were a video, by swapping its suffix for .mp4. A report is now refused
    only where it would overwrite the input or the output, or cannot be written; nothing is written then."""
    import json

    out = tmp_path / "out.mp4"
    report = video.with_suffix(".json")
    assert cli_main(["redact", str(video), "--prompt", "square .", "-o", str(out), "--quiet",
                     "--report", str(report)]) == 0
    assert json.loads(report.read_text())["settings"]["video"] == str(video)
    for bad, message in ((video, "would overwrite the input"), (out, "would overwrite the output"),
                         (tmp_path / "missing" / "r.json", "does not exist"), (tmp_path, "is a directory")):
        other = tmp_path / "other.mp4"
        assert cli_main(["redact", str(video), "--prompt", "square .", "-o", str(other if bad != out else out),
                         "--quiet", "--report", str(bad)]) == 2
        assert message in capsys.readouterr().err, bad
        assert not other.exists()


def test_a_read_only_directory_is_refused(video, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(RedactError, match="no permission"):
        redact_video(None, video, locked / "out.mp4", "face .", detect=fixed_detector)


@pytest.mark.parametrize("prompt", ["", "   ", " . . "])
def test_an_empty_prompt_is_refused(video, tmp_path, prompt, capsys):
    out = tmp_path / "out.mp4"
    if not prompt.strip():
        with pytest.raises(RedactError, match="prompt is empty"):
            redact_video(None, video, out, prompt, detect=fixed_detector)
    assert cli_main(["redact", str(video), "--prompt", prompt, "-o", str(out), "--quiet"]) == 2
    assert "prompt" in capsys.readouterr().err
    assert not out.exists()


def test_weights_that_cannot_be_loaded_are_a_clear_error(video, tmp_path, capsys):
    """The offline counterpart of a redact prompt on a stream whose detector is not loaded."""
    out = tmp_path / "out.mp4"
    code = cli_main(["redact", str(video), "--prompt", "face .", "-o", str(out), "--quiet",
                     "--weights", str(tmp_path / "no-such-weights")])
    assert code == 2
    assert "cannot load the detector" in capsys.readouterr().err
    assert not out.exists()


def test_a_failure_while_writing_leaves_no_output_and_no_temporary_file(video, tmp_path):
    """Nothing half-written may be left as if complete: the output appears only by the final rename."""
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an earlier, complete redaction")
    plans = [FramePlan(detected=[BOX[0]]) for _ in range(16)]
    calls = []

    def failing_inpainter(frame, boxes):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("out of memory in the middle of the video")
        return frame

    with pytest.raises(RuntimeError, match="out of memory"):
        write_redacted(video, out, plans, mode="inpaint", inpainter=failing_inpainter)
    assert out.read_bytes() == b"an earlier, complete redaction"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_a_video_without_audio_and_of_odd_size(tmp_path):
    frames = np.full((5, 45, 61, 3), 120, np.uint8)
    source = write_video_with_audio(tmp_path / "odd.mp4", frames[:, :44, :60], audio=False)
    out = tmp_path / "out.mkv"
    summary = redact_video(None, source, out, "thing .", mode="pixelate",
                           detect=lambda batch: [(np.zeros((0, 4)), np.zeros(0), []) for _ in batch])
    assert summary.frames == 5 and summary.audio_streams == 0
    assert decoded(out).shape == (5, 44, 60, 3)
    assert frame_times(out) == frame_times(source)
