"""Live redaction benchmark: what `redact` costs the daemon's frames per second.

1. Pipeline frames/s of `groundwatch run` on the redaction scene (tests/redaction_scene.py: a red circle to hide,
   a blue square watched) with `record_video` and the web previews on, two ways in one run, interleaved `--repeats`
   times: without `redact` (the competitor: today's daemon) and with `redact = "red circle ."` (the redact phrase
   in the same detector pass, boxes carried and burnt in, previews and snapshots of the redacted copy, and every
   processed frame re-encoded with libx264 into the recording). A file source, so the worker is never idle and the
   figure is its throughput; frames/s from the daemon's own `detections` events (first to last, model loading
   excluded). Target: redact >= 80% of plain.
2. Load-independent costs per frame in the worker at 320x240 and 1280x720: the redaction (split, carry, blur) and
   the libx264 encode of the redacted recording.

    python benchmarks/live_redaction.py [--frames 150] [--repeats 2] [--weights default]
    python benchmarks/live_redaction.py --quick      # a short check: 40 frames, one repeat
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import redaction_scene as scene  # noqa: E402

import _daemon  # noqa: E402


def write_config(directory: Path, video: Path, *, redact: bool, weights: str) -> tuple[Path, str]:
    publish, control = _daemon.loopback_endpoint(), _daemon.loopback_endpoint()
    stream = {"id": "bench", "url": video, "prompt": scene.PROMPT, "record_video": True}
    if redact:
        stream["redact"] = scene.REDACT
    config = directory / f"config-{time.monotonic_ns()}.toml"
    config.write_text(_daemon.config_text(
        [stream], model={**_daemon.DEFAULT_MODEL, "weights": weights, "batch_size": 2}, endpoint=publish,
        control_endpoint=control, web=True,
        record_directory=directory / ("recordings-redact" if redact else "recordings-plain")))
    return config, publish


def run_pipeline(directory: Path, video: Path, *, redact: bool, weights: str) -> dict:
    config, publish = write_config(directory, video, redact=redact, weights=weights)
    listener = _daemon.DetectionStamps(publish, "bench", stamp=lambda event: time.perf_counter(), timeout=900)
    process = _daemon.start(config)
    try:
        listener.wait(900)
        process.wait(120)
    finally:
        _daemon.stop(process, 30)
    stamps = listener.stamps
    if len(stamps) < 2:
        raise RuntimeError("the daemon published fewer than two detections events")
    return {"frames": len(stamps), "fps": _daemon.steady_rate(stamps)}


def worker_costs() -> dict:
    """ms per frame: the redaction (split + carry + blur of two boxes) and the libx264 encode of the recording."""
    from dataclasses import dataclass

    from streamer.redaction import RedactedSegmentWriter, RedactionSettings, StreamRedaction

    @dataclass
    class Found:
        boxes_xyxy: np.ndarray
        scores: np.ndarray
        phrases: list

    costs = {}
    rng = np.random.default_rng(0)
    for width, height in ((320, 240), (1280, 720)):
        frame = (rng.random((height, width, 3)) * 40 + np.linspace(0, 200, width)[None, :, None]).astype(np.uint8)
        boxes = np.array([[0.2 * width, 0.2 * height, 0.35 * width, 0.4 * height],
                          [0.6 * width, 0.5 * height, 0.7 * width, 0.7 * height]], np.float32)
        found = Found(boxes, np.full(2, 0.8, np.float32), ["red circle", "blue square"])
        with tempfile.TemporaryDirectory() as folder:
            redaction = StreamRedaction(RedactionSettings(phrases=("red circle",), prompt="red circle ."))
            writer = RedactedSegmentWriter(Path(folder), 60.0)
            n = 60
            redact_s = encode_s = 0.0
            for k in range(n):
                started = time.perf_counter()
                _, hide, scores = redaction.split(found, "blue square .")
                picture = redaction.apply(frame, hide + k % 3, scores, k)
                middle = time.perf_counter()
                writer.write(picture, 1000.0 + k * 0.1)
                ended = time.perf_counter()
                if k >= 5:  # the encoder's start-up aside
                    redact_s += middle - started
                    encode_s += ended - middle
            writer.close()
        costs[f"{width}x{height}"] = {"redact_ms": redact_s / (n - 5) * 1000, "encode_ms": encode_s / (n - 5) * 1000}
    return costs


def machine() -> str:
    model = _daemon.cpu_model() or platform.processor()
    return f"{model}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--weights", default="default")
    parser.add_argument("--quick", action="store_true", help="40 frames, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.repeats = 40, 1
    from streamer.media import write_video

    print(machine(), flush=True)
    costs = worker_costs()
    for size, cost in costs.items():
        print(f"worker cost per frame at {size}: redaction {cost['redact_ms']:.2f} ms, libx264 encode "
              f"{cost['encode_ms']:.2f} ms", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        video = write_video(directory / "scene.mp4", scene.render(args.frames), fps=scene.FPS, gop=10)
        results: dict[str, list[float]] = {"plain": [], "redact": []}
        for repeat in range(args.repeats):
            for name in ("plain", "redact"):
                figure = run_pipeline(directory, video, redact=name == "redact", weights=args.weights)
                results[name].append(figure["fps"])
                print(f"repeat {repeat + 1} {name:6s}: {figure['fps']:.3f} frames/s over {figure['frames']} frames",
                      flush=True)
    plain, redacted = statistics.median(results["plain"]), statistics.median(results["redact"])
    print(f"\nmedian frames/s: without redact {plain:.3f}, with redact {redacted:.3f}: "
          f"{100 * redacted / plain:.1f}% (target >= 80%)")


if __name__ == "__main__":
    main()
