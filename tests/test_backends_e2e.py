"""The daemon end to end on the bundled video (streamer/assets/demo.mp4, the default model) with each backend.

The real `groundwatch run` (a subprocess per backend) writes its events to disk; every frame's detections must
be those of the torch backend: the same phrases, boxes within 0.5% of the frame (the float32 backends differ by
~1e-5 before rounding), at least 99% matched over the video. Frames per second are printed (`-s`) from the
worker's own inference times.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from detection_match import match_detections  # noqa: E402
from daemon_harness import Daemon  # noqa: E402

from streamer.recording import read_events  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "streamer" / "assets" / "demo.mp4"
PROMPT = "green star . black cross . purple square . black ring ."


class _Found:
    def __init__(self, event: dict):
        self.boxes_xyxy = [d["box"] for d in event["detections"]]
        self.phrases = [d["phrase"] for d in event["detections"]]


def run_daemon(root: Path, backend: str, cache: Path) -> list[dict]:
    root.mkdir(parents=True)
    daemon = Daemon(root, f"""
[[streams]]
id = "demo"
url = "{DEMO}"
prompt = "{PROMPT}"
""", f"""
[model]
weights = "default"
backend = "{backend}"
cache_dir = "{cache}"
threads = 2
box_threshold = 0.3
text_threshold = 0.25
batch_size = 4
short_side = 192
max_side = 256
[metrics]
enabled = false
[supervisor]
exit_when_done = true
""")
    daemon.start()
    try:
        assert daemon.wait_exit(780) is not None, f"still running after 780 s; log:\n{daemon.log()[-3000:]}"
    finally:
        daemon.kill()
    [path] = sorted((root / "recordings" / "demo").glob("events-*.jsonl"))
    detections = [e for e in read_events(path) if e["kind"] == "detections"]
    assert detections, daemon.log()[-3000:]
    return detections


@pytest.mark.slow
@pytest.mark.timeout(2400)  # three daemons on the default model, two of them exporting on first use
def test_daemon_gives_the_same_detections_on_every_backend(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    cache = tmp_path / "cache"
    runs = {backend: run_daemon(tmp_path / backend, backend, cache)
            for backend in ("torch", "onnxruntime", "openvino")}
    reference = runs["torch"]
    assert len(reference) == 60 and sum(len(e["detections"]) for e in reference) >= 60
    for backend, events in runs.items():
        assert [e["frame"] for e in events] == [e["frame"] for e in reference], backend
        matched = total = 0
        for ours, theirs in zip(events, reference):
            hits, count = match_detections(_Found(theirs), _Found(ours), ours["height"], ours["width"],
                                           box_tolerance=0.005)
            matched, total = matched + hits, total + count
        fps = 1000.0 / (sum(e["inference_ms"] for e in events) / len(events))
        print(f"{backend}: {len(events)} frames, {total} detections, {matched / total:.1%} matched torch, "
              f"{fps:.1f} frames/s (worker inference)")
        assert matched / total >= 0.99, f"{backend}: {matched} of {total} detections match the torch backend"
