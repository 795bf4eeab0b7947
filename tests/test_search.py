"""`groundwatch search`: time ranges of what words describe, on generated videos with known appearance intervals.

The videos are drawn here from the shapes world's painter: a red star shown during known intervals (the ground
truth comes from the generator, never from the detector), with a blue star, a red circle, a green triangle and a
yellow square moving the whole time. The default model at the default threshold does the detecting.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gdino import shapes, world
from streamer.media import write_video

FPS = 10.0
SIZE = (192, 256)  # the default model's input scale: no resize, cheap to decode
ASSET = Path(shapes.__file__).parent / "assets" / "default" / "model.safetensors"

pytestmark = pytest.mark.skipif(not ASSET.is_file(), reason="default weights not shipped")


def _sprite(shape: str, extent: float, angle: float, colour: str):
    pad = int(math.ceil(extent)) + 4
    alpha = shapes.coverage(shape, ((pad - 1) / 2, (pad - 1) / 2), extent, angle, pad, pad)
    return alpha.astype(np.float32)[..., None] / 255.0, np.asarray(shapes.COLOURS[colour], np.float32)


def _blend(image: np.ndarray, sprite, x: float, y: float) -> None:
    alpha, rgb = sprite
    h, w = alpha.shape[:2]
    x0, y0 = int(round(x - w / 2)), int(round(y - h / 2))
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, image.shape[1]), min(y0 + h, image.shape[0])
    if xa < xb and ya < yb:
        region = image[ya:yb, xa:xb]
        image[ya:yb, xa:xb] = region + (rgb - region) * alpha[ya - y0:yb - y0, xa - x0:xb - x0]


def render(seconds: float, intervals, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, 3) uint8 frames at FPS and (T,) bool: the red star is on screen in frame t.

    The star appears and disappears at once (no entry from an edge), so its true start is the first frame of
    an interval and its end the frame after the last; the distractors bounce in the right half the whole time.
    """
    rng = np.random.default_rng(seed)
    height, width = SIZE
    side = min(SIZE)
    background = world.background(rng, "texture", height, width).astype(np.float32)
    grain = [rng.normal(0, 2.0, size=(height, width, 1)).astype(np.float32) for _ in range(7)]
    movers = []
    for shape, colour, fraction in (("star", "blue", 0.17), ("circle", "red", 0.16), ("triangle", "green", 0.17),
                                    ("square", "yellow", 0.15)):
        extent = fraction * side
        position = np.array([rng.uniform(width / 2 + extent / 2, width - extent / 2),
                             rng.uniform(extent / 2, height - extent / 2)])
        heading = rng.uniform(0, 2 * np.pi)
        velocity = np.array([math.cos(heading), math.sin(heading)]) * rng.uniform(6, 14) / FPS
        movers.append((_sprite(shape, extent, float(rng.uniform(-20, 20)), colour), extent, position, velocity))
    target = _sprite("star", 0.17 * side, 8.0, "red")
    count = int(round(seconds * FPS))
    frames = np.empty((count, height, width, 3), np.uint8)
    truth = np.zeros(count, bool)
    for index in range(count):
        t = index / FPS
        image = background.copy()
        for sprite, extent, position, velocity in movers:
            for axis, (low, high) in enumerate(((width / 2 + extent / 2, width - extent / 2),
                                                (extent / 2, height - extent / 2))):
                if not low <= position[axis] + velocity[axis] <= high:
                    velocity[axis] = -velocity[axis]
            position += velocity
            _blend(image, sprite, position[0], position[1])
        if any(a <= index < b for a, b in intervals):
            _blend(image, target, width * 0.25 + 0.08 * width * math.sin(t * 0.7),
                   height * 0.5 + 0.22 * height * math.cos(t * 0.5))
            truth[index] = True
        frames[index] = np.clip(image + grain[index % len(grain)], 0, 255).astype(np.uint8)
    return frames, truth


def true_intervals(truth: np.ndarray) -> list[tuple[float, float]]:
    """[start, end) seconds of each run of frames showing the star."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], truth.astype(np.int8), [0]])))
    return [(start / FPS, end / FPS) for start, end in zip(edges[::2], edges[1::2])]


@pytest.fixture(scope="module")
def model():
    import torch

    import gdino

    torch.set_num_threads(2)
    return gdino.load("default")


# Frame intervals [a, b) of the red star in the two-minute video: long and short stays, odd start times.
LONG_INTERVALS = ((83, 231), (403, 557), (712, 741), (950, 1103))


@pytest.fixture(scope="module")
def two_minutes(tmp_path_factory):
    frames, truth = render(120.0, LONG_INTERVALS)
    path = write_video(tmp_path_factory.mktemp("search") / "two_minutes.mp4", frames, fps=FPS, gop=20)
    return path, true_intervals(truth)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~270 detections: minutes on a quiet 2-core machine, an hour on a badly overloaded one
def test_every_interval_of_a_two_minute_video_is_found_within_half_a_second(model, two_minutes, tmp_path):
    """The issue's check: default fps, model and threshold; each true interval found with start and end within
    0.5 s, and no range where the red star never is (the blue star and the red circle are look-alikes)."""
    from streamer.editing.search import SearchOptions, Searcher

    path, truth = two_minutes
    searcher = Searcher(model, cache_dir=tmp_path / "cache")
    result = searcher.search([path], "red star", SearchOptions())
    found = [(r.start, r.end) for r in result.ranges]
    print("true", truth, "found", found)
    for start, end in found:
        assert any(start < b and a < end for a, b in truth), f"range {start:.2f}-{end:.2f} s has no red star"
    errors = []
    for a, b in truth:
        matches = [(s, e) for s, e in found if s < b and a < e]
        assert len(matches) == 1, f"true interval {a}-{b} s matched by {matches}"
        s, e = matches[0]
        errors.append((s - a, e - b))
        assert abs(s - a) <= 0.5 and abs(e - b) <= 0.5, (a, b, s, e)
    print("start/end errors (s):", errors)
    assert all(r.phrase == "red star" and r.start_refined and r.end_refined for r in result.ranges)
    detected = searcher.frames_detected

    # A second search with the same prompt is answered from the cache: the detector does not run at all.
    again = searcher.search([path], "red star", SearchOptions())
    assert searcher.frames_detected == detected
    assert [(r.start, r.end, r.score) for r in again.ranges] == [(r.start, r.end, r.score) for r in result.ranges]
    assert again.files[0].status == "cached"
    # ... also from a new process's point of view: a fresh Searcher on the same cache folder.
    fresh = Searcher(model, cache_dir=tmp_path / "cache")
    fresh.search([path], "red star", SearchOptions())
    assert fresh.frames_detected == 0 and fresh.frames_decoded == 0

    # --top 2: the two best-scoring ranges, in time order, ranked; the contact sheet shows one tile each.
    import cv2

    from streamer.editing.search import write_results

    best = searcher.search([path], "red star", SearchOptions(top=2))
    assert searcher.frames_detected == detected
    scores = sorted((r.score for r in result.ranges), reverse=True)
    assert sorted(r.score for r in best.ranges) == sorted(scores[:2])
    assert sorted(r.rank for r in best.ranges) == [1, 2]
    assert [r.start for r in best.ranges] == sorted(r.start for r in best.ranges)
    write_results(best, tmp_path / "top.json", tmp_path / "top.png")
    assert len(json.loads((tmp_path / "top.json").read_text())["ranges"]) == 2
    assert cv2.imread(str(tmp_path / "top.png")).shape[1] == 2 * 320


def test_a_new_prompt_reuses_the_sampled_frames_and_gives_the_same_answer(model, tmp_path):
    """Decoded sampled frames are stored at the model's scale: a new prompt on the same file decodes nothing
    in its sampling pass, and answers as a search without any cache does."""
    from streamer.editing.search import SearchOptions, Searcher

    frames, truth = render(6.0, ((15, 45),), seed=5)
    path = write_video(tmp_path / "short.mp4", frames, fps=FPS, gop=20)
    options = SearchOptions(refine=False)
    cached = Searcher(model, cache_dir=tmp_path / "cache")
    cached.search([path], "red star", options)
    decoded = cached.frames_decoded
    assert decoded == 12  # 6 s at 2 fps
    reused = cached.search([path], "blue star", options)
    assert cached.frames_decoded == decoded, "the second prompt decoded the video again"
    plain = Searcher(model, use_cache=False).search([path], "blue star", options)
    assert [(r.start, r.end, round(r.score, 4)) for r in reused.ranges] == \
        [(r.start, r.end, round(r.score, 4)) for r in plain.ranges]
    assert reused.ranges, "the blue star is on screen the whole time"


def test_an_interrupted_search_resumes_where_it_stopped(model, tmp_path, monkeypatch):
    """Ctrl-C during a file keeps what was detected: the rerun detects only the frames after it."""
    from streamer.editing import search as search_module

    frames, _ = render(4.0, ((10, 30),), seed=6)
    path = write_video(tmp_path / "short.mp4", frames, fps=FPS, gop=20)
    options = search_module.SearchOptions(refine=False, batch_size=2)
    real_call = search_module.Detector.__call__
    calls = []

    def interrupted(self, batch, scale):
        calls.append(len(batch))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, batch, scale)

    monkeypatch.setattr(search_module.Detector, "__call__", interrupted)
    first = search_module.Searcher(model, cache_dir=tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        first.search([path], "red star", options)
    monkeypatch.setattr(search_module.Detector, "__call__", real_call)
    second = search_module.Searcher(model, cache_dir=tmp_path / "cache")
    resumed = second.search([path], "red star", options)
    assert second.frames_detected == 8 - 4  # 4 s at 2 fps, 2 batches of 2 were done
    whole = search_module.Searcher(model, use_cache=False).search([path], "red star", options)
    assert [(r.start, r.end) for r in resumed.ranges] == [(r.start, r.end) for r in whole.ranges]
    assert resumed.files[0].samples == 8


def _run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "streamer.cli", "search", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=1700)


@pytest.mark.timeout(3600)  # two model loads in subprocesses: seconds on a quiet machine, many minutes on a loaded one
def test_cli_searches_a_recordings_folder_with_wall_clock_times(tmp_path):
    """A recordings folder (<dir>/<stream>/video/<unix ms>.ts): ranges carry the stream and wall-clock times;
    the JSON and the contact sheet are written; a second run is answered from the cache."""
    import cv2

    frames, truth = render(8.0, ((25, 55),), seed=7)
    began = 1_764_000_000_000  # ms, the segments' names
    video = tmp_path / "recordings" / "gate" / "video"
    write_video(video / f"{began}.ts", frames[:40], fps=FPS, gop=10)
    write_video(video / f"{began + 4000}.ts", frames[40:], fps=FPS, gop=10)
    (tmp_path / "recordings" / "gate" / "events-x.jsonl").write_text("")  # the event log is not a video
    output = tmp_path / "out" / "found.json"
    output.parent.mkdir()
    done = _run_cli(tmp_path / "recordings", "--prompt", "red star", "-o", output, "--cache-dir", tmp_path / "c",
                    "--quiet")
    assert done.returncode == 0, done.stderr
    data = json.loads(output.read_text())
    ranges = data["ranges"]
    assert ranges and all(r["stream"] == "gate" and r["phrase"] == "red star" for r in ranges)
    # Frames 25..54 span both segments: one range per segment, wall-clock times meeting at the cut, each edge
    # within a frame (refined at the full frame rate). MPEG-TS seeks used to land past the asked time (or past
    # the last frame), so the full-rate frames were never seen and both ends stopped at the last sample.
    wall = sorted((r["wall_start"] - began / 1000, r["wall_end"] - began / 1000) for r in ranges)
    assert len(wall) == 2, wall
    for (start, end), (true_start, true_end) in zip(wall, [(2.5, 4.0), (4.0, 5.5)]):
        assert abs(start - true_start) <= 0.15 and abs(end - true_end) <= 0.15, wall
    assert data["contact_sheet"] == str(output.with_suffix(".jpg"))
    sheet = cv2.imread(str(output.with_suffix(".jpg")))
    assert sheet is not None and sheet.shape[1] >= 320
    assert not list(output.parent.glob("*.part"))
    again = _run_cli(tmp_path / "recordings", "--prompt", "red star", "-o", output, "--cache-dir", tmp_path / "c",
                     "--quiet")
    assert again.returncode == 0, again.stderr
    assert {f["status"] for f in json.loads(output.read_text())["files"]} == {"cached"}
    assert "from the cache" in again.stderr


def test_cli_refuses_an_empty_prompt_before_anything_runs(tmp_path):
    frames, _ = render(1.0, ())
    path = write_video(tmp_path / "v.mp4", frames, fps=FPS)
    done = _run_cli(path, "--prompt", "  . ", "-o", tmp_path / "out.json")
    assert done.returncode == 2
    assert "no words" in done.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.jpg").exists()


def test_cli_refuses_a_video_that_cannot_be_decoded(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    done = _run_cli(broken, "--prompt", "red star", "-o", tmp_path / "out.json", "--cache-dir", tmp_path / "c")
    assert done.returncode == 2
    assert "broken.mp4" in done.stderr and "decode" in done.stderr
    assert not (tmp_path / "out.json").exists()
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.part"))


def test_cli_refuses_an_output_it_cannot_write_before_searching(tmp_path):
    frames, _ = render(1.0, ())
    path = write_video(tmp_path / "v.mp4", frames, fps=FPS)
    done = _run_cli(path, "--prompt", "red star", "-o", tmp_path / "missing" / "out.json")
    assert done.returncode == 2
    assert "cannot write" in done.stderr and "missing" in done.stderr
    (tmp_path / "taken.json").mkdir()
    done = _run_cli(path, "--prompt", "red star", "-o", tmp_path / "taken.json")
    assert done.returncode == 2 and "is a folder" in done.stderr


def test_cli_refuses_an_output_that_is_a_searched_video(tmp_path):
    """`groundwatch search clip.mp4 -o clip.mp4` replaced the video with the JSON of ranges (and `--sheet` could do
    the same with the contact sheet): a recording lost to a typo. Both are refused before anything runs."""
    frames, _ = render(1.0, ())
    folder = tmp_path / "recordings"
    folder.mkdir()
    path = write_video(folder / "v.mp4", frames, fps=FPS)
    before = path.read_bytes()
    os.link(path, tmp_path / "alias.mp4")  # another name for the same file
    (tmp_path / "old.json").write_text("{}")  # an existing output of an earlier search is fine to replace
    for extra in (["-o", path], ["-o", tmp_path / "out.json", "--sheet", path],
                  ["-o", tmp_path / "recordings" / ".." / "recordings" / "v.mp4"],
                  ["-o", tmp_path / "old.json", "--sheet", tmp_path / "alias.mp4"]):
        done = _run_cli(folder, "--prompt", "red star", *extra)
        assert done.returncode == 2, done.stderr
        assert "would overwrite the searched video" in done.stderr
        assert path.read_bytes() == before
    assert not (tmp_path / "out.json").exists()
    # The results and the contact sheet in one file (-o out.jpg: the sheet defaults to out.jpg): one would be lost.
    done = _run_cli(folder, "--prompt", "red star", "-o", tmp_path / "out.jpg")
    assert done.returncode == 2 and "the same file" in done.stderr, done.stderr


def test_a_failed_write_leaves_the_previous_results_whole(tmp_path, monkeypatch):
    """Results go to a temporary name and are renamed: a write that fails half-way (disk full) leaves the old
    file as it was and no temporary file behind."""
    from streamer.editing import search as search_module

    result = search_module.SearchResult("red star .", search_module.SearchOptions(), "model")
    output = tmp_path / "out.json"
    output.write_text('{"old": true}\n')
    real_write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(search_module.SearchError, match="No space left"):
        search_module.write_results(result, output, None)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert json.loads(output.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_group_ranges_needs_two_sampled_hits_and_merges_short_gaps():
    """A one-sample sighting is no range by default; a missed sample inside a stay does not split it."""
    from streamer.editing.search import group_ranges

    box = (10.0, 10.0, 40.0, 40.0)
    times = [i * 0.5 for i in range(12)]
    hits = [[] for _ in times]
    hits[1] = [(*box, 0.8, "red star")]  # alone: a glitch
    for i in (5, 6, 8, 9):  # sample 7 missed
        hits[i] = [(box[0] + i, box[1], box[2] + i, box[3], 0.7 + i / 100, "red star")]
    spans = group_ranges(times, hits, fps=2.0, merge_gap=1.0, min_hits=2)
    assert [(s.phrase, s.first, s.last, s.hits) for s in spans] == [("red star", 5, 9, 4)]
    assert spans[0].best[0] == pytest.approx(0.79)
    assert len(group_ranges(times, hits, fps=2.0, merge_gap=1.0, min_hits=1)) == 2
    assert len(group_ranges(times, hits, fps=2.0, merge_gap=0.0, min_hits=1)) == 3


# -- awkward files and caches (a stand-in detector: these are about decoding and caching, not the model) --------


def _flat_video(path: Path, values, height: int, width: int) -> Path:
    """A 10 fps video whose frame k is a flat grey of values[k]."""
    return write_video(path, np.stack([np.full((height, width, 3), v, np.uint8) for v in values]), fps=FPS)


class _WholeFrameDetector:
    """Stands in for search.Detector: one box over each whole frame, in the original frame's pixels; records the
    size of every frame it was given."""

    shapes: list = []

    def __init__(self, model, prompt, box_threshold, text_threshold):
        from types import SimpleNamespace

        self.encoding = SimpleNamespace(prompt=prompt)
        self.frames_detected = 0

    def __call__(self, frames, scales):
        scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(frames)
        self.frames_detected += len(frames)
        _WholeFrameDetector.shapes.extend(f.shape for f in frames)
        return [[(0.0, 0.0, f.shape[1] / s, f.shape[0] / s, 0.9, "box")] for f, s in zip(frames, scales)]


@pytest.fixture
def stand_in_searcher(monkeypatch):
    """A Searcher at the default model's input scale (192 / 320) whose detector is `_WholeFrameDetector`."""
    from types import SimpleNamespace

    from streamer.editing import search as search_module

    monkeypatch.setattr(search_module, "Detector", _WholeFrameDetector)
    _WholeFrameDetector.shapes = []
    model = SimpleNamespace(config=SimpleNamespace(input_short_side=192, input_max_side=320))
    return lambda cache_dir: search_module.Searcher(model, cache_dir=cache_dir, model_id="stand-in")


def test_sampling_goes_on_after_timestamps_jump_back(tmp_path):
    """Two MPEG-TS files joined with `cat` start again at zero at the join: sampling used to stop there (8
    samples of a 7 s file, reported as 4 s long). Times must go on past the join, and seeking into the second
    part must find its frames."""
    from streamer.editing.search import VideoFile

    first = _flat_video(tmp_path / "a.ts", [v * 5 for v in range(40)], 48, 64)
    second = _flat_video(tmp_path / "b.ts", [250 - v * 5 for v in range(30)], 48, 64)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    video = VideoFile(joined)
    assert video.duration == pytest.approx(7.0, abs=0.15)
    times = [when for when, _ in video.sample(2.0)]
    assert np.allclose(times, np.arange(14) * 0.5, atol=0.06)
    assert abs(int(video.frame_at(5.0)[0, 0, 0]) - (250 - 10 * 5)) <= 4  # frame 10 of the second file
    assert len(video.between(4.5, 5.5)) == 9


def test_a_file_whose_resolution_changes_is_searched_and_each_frame_scaled_by_its_own_size(tmp_path,
                                                                                            stand_in_searcher):
    """Recordings joined with ffmpeg's concat demuxer can change size part-way: the frame cache's np.stack
    used to fail (a traceback from `groundwatch search`), and the smaller frames were reduced by the first
    frame's factor, so the model saw them at half its scale."""
    import av

    large = _flat_video(tmp_path / "large.ts", [100] * 20, 384, 512)  # reduced by 0.5 to the model's scale
    small = _flat_video(tmp_path / "small.ts", [150] * 20, 192, 256)  # already at the model's scale
    path = tmp_path / "changes.ts"
    with av.open(str(path), "w") as output:
        out_stream = None
        for part, shift in ((large, 0.0), (small, 2.0)):
            with av.open(str(part)) as source:
                stream = source.streams.video[0]
                out_stream = out_stream or output.add_stream_from_template(stream)
                for packet in source.demux(stream):
                    if packet.dts is not None:
                        packet.pts += int(shift / stream.time_base)
                        packet.dts += int(shift / stream.time_base)
                        packet.stream = out_stream
                        output.mux(packet)
    from streamer.editing.search import SearchOptions

    result = stand_in_searcher(tmp_path / "cache").search([path], "box", SearchOptions(refine=False))
    assert result.files[0].status == "searched" and result.files[0].samples == 8
    assert set(_WholeFrameDetector.shapes) == {(192, 256, 3)}
    [found] = result.ranges
    assert found.best_box_xyxy == [0.0, 0.0, 512.0, 384.0]


def test_a_damaged_frame_cache_is_a_miss_and_is_written_whole(tmp_path, stand_in_searcher, monkeypatch):
    """A frame cache left empty or cut short (a power cut after the rename) used to end every later search of
    the file in EOFError / BadZipFile: it must count as a miss and be replaced. The cache is flushed to disk
    before it is renamed into place."""
    from streamer.editing.search import SearchOptions

    path = _flat_video(tmp_path / "v.mp4", [60] * 20, 48, 64)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    searcher = stand_in_searcher(tmp_path / "cache")
    searcher.search([path], "box", SearchOptions(refine=False))
    [store] = (tmp_path / "cache" / "frames").glob("*.npz")
    whole = store.read_bytes()
    with np.load(store) as stored:
        frames = stored["frames"]
    for damaged, prompt in ((b"", "a box"), (whole[: len(whole) // 2], "the box")):
        store.write_bytes(damaged)
        decoded = searcher.frames_decoded
        result = searcher.search([path], prompt, SearchOptions(refine=False))
        assert result.files[0].status == "searched" and result.files[0].samples == 4
        assert searcher.frames_decoded == decoded + 4  # decoded again
        with np.load(store) as stored:  # and stored again
            assert np.array_equal(stored["frames"], frames)
    assert any(".npz." in name and name.endswith(".part") for name in synced)  # the temporary, before its rename
