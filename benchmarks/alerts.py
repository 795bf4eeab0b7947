"""What zones, lines and rules cost the inference worker, and how that compares with supervision's zones.

The worker's per-frame path after the detector (tracker, detections and track events, JSON encoding of every
event) is timed with 100 moving tracks on 1920x1080 frames, without alerting and with 20 zones, 4 lines and 6
rules (and, separately, with best-frame snapshots too). The detector is a replay of the boxes (no model), so
the overhead is measured against the smallest worker time there is; the default model's time for one frame,
measured in the same run, gives the overhead against the worker's whole time per frame. Side by side:
supervision's `PolygonZone.trigger` x 20 and `LineZone.trigger` x 4 on the same boxes (what a supervision
pipeline pays for the same geometry, without events or rules).

    python benchmarks/alerts.py                   # 300 frames after 30 warm-up frames, 100 tracks, 20 zones
    python benchmarks/alerts.py --frames 100 --no-model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamer.alerts import AlertSettings, StreamAlerts  # noqa: E402
from streamer.config import StreamConfig  # noqa: E402
from streamer.events import pack_internal  # noqa: E402
from streamer.frames import Frame  # noqa: E402
from streamer.inference import InferenceWorker, build_tracker  # noqa: E402
from streamer.rules import Rule  # noqa: E402
from streamer.zones import Line, Zone  # noqa: E402
from tracker import TrackerConfig  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
PHRASES = ("person", "white van", "red car", "dog")


@dataclass
class Boxes:
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    phrases: list


class EncodingSender:
    """Encodes every event as the real sender does (the JSON is part of the worker's cost), then drops it."""

    def __init__(self) -> None:
        self.dropped = 0
        self.kinds: dict[str, int] = {}

    def send(self, event: dict) -> bool:
        pack_internal(event)
        self.kinds[event["kind"]] = self.kinds.get(event["kind"], 0) + 1
        return True


class NullStats:
    def add(self, *args) -> None:
        pass

    def set(self, *args) -> None:
        pass

    def get(self, *args) -> float:
        return 1.0


def moving_boxes(frames: int, tracks: int, seed: int = 0) -> list[Boxes]:
    """`tracks` boxes walking across the frame (bouncing at the edges), a little score noise."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(60, 160, (tracks, 2))
    position = rng.uniform([0, 0], [WIDTH - 160, HEIGHT - 160], (tracks, 2))
    velocity = rng.uniform(-6, 6, (tracks, 2))
    phrases = [PHRASES[k % len(PHRASES)] for k in range(tracks)]
    out = []
    for _ in range(frames):
        position += velocity
        bounce = (position < 0) | (position + size > [WIDTH, HEIGHT])
        velocity[bounce] *= -1
        position = np.clip(position, 0, [WIDTH, HEIGHT] - size)
        boxes = np.concatenate([position, position + size], axis=1).astype(np.float32)
        scores = np.clip(0.8 + rng.normal(0, 0.05, tracks), 0, 1).astype(np.float32)
        out.append(Boxes(boxes, scores, list(phrases)))
    return out


def zones_and_lines(count: int, seed: int = 1) -> tuple[list[Zone], list[Line]]:
    rng = np.random.default_rng(seed)
    zones = []
    for k in range(count):
        centre, radius = rng.uniform(0.15, 0.85, 2), rng.uniform(0.05, 0.2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(4, 9))))
        polygon = tuple((float(centre[0] + radius * np.cos(a)), float(centre[1] + radius * np.sin(a)))
                        for a in angles)
        zones.append(Zone(f"zone{k}", polygon, inertia=3, loitering_seconds=5.0,
                          phrases=None if k % 2 else frozenset({PHRASES[k % len(PHRASES)]})))
    lines = [Line(f"line{k}", (0.05, 0.2 + 0.2 * k), (0.95, 0.25 + 0.2 * k), direction=(0.0, 1.0))
             for k in range(4)]
    return zones, lines


RULES = [Rule("van_in_zone1", "white van", zone="zone1", min_seconds=2.0),
         Rule("person_in_zone3", "person", zone="zone3", cooldown_seconds=5.0),
         Rule("car_line0", "red car", line="line0"), Rule("dog_line1", "dog", line="line1", direction="in"),
         Rule("person_anywhere", "person", min_seconds=10.0, min_score=0.9),
         Rule("van_long", "white van", zone="zone5", min_seconds=30.0)]


def run_worker(detections: list[Boxes], warmup: int, alerts: StreamAlerts | None) -> tuple[list[float], dict]:
    """Per-frame seconds of the worker's path after the detector."""
    stream = StreamConfig(id="cam", url="cam.mp4", mode="file", prompt=" . ".join(PHRASES) + " .")
    sender = EncodingSender()
    worker = InferenceWorker(detector=None, streams=[stream], mailboxes={"cam": None}, stats=NullStats(),
                             sender=sender, tracker_factory=lambda: build_tracker(TrackerConfig(min_hits=2, max_age=30)),
                             alerts={"cam": alerts} if alerts is not None else {})
    state = worker.streams["cam"]
    pixels = np.full((HEIGHT, WIDTH, 3), 100, np.uint8)
    times = []
    for index, result in enumerate(detections):
        frame = Frame(slot=0, seq=index, frame_index=index, pts=index / 10, ts=index / 10, decoded_at=time.time(),
                      pixels=pixels)
        started = time.perf_counter()
        worker._emit_frame(state, frame, result, 0.0)
        elapsed = time.perf_counter() - started
        if index >= warmup:
            times.append(elapsed)
    return times, sender.kinds


def run_supervision(detections: list[Boxes], warmup: int, zones: list[Zone], lines: list[Line]) -> list[float] | None:
    try:
        import supervision as sv
    except ImportError:
        return None
    scale = np.array([WIDTH, HEIGHT])
    polygon_zones = [sv.PolygonZone(np.round(np.array(z.polygon) * scale).astype(np.int64)) for z in zones]
    line_zones = [sv.LineZone(sv.Point(*(np.array(l.start) * scale)), sv.Point(*(np.array(l.end) * scale)))
                  for l in lines]
    times = []
    for index, result in enumerate(detections):
        detections_sv = sv.Detections(xyxy=result.boxes_xyxy.astype(np.float64), confidence=result.scores,
                                      class_id=np.arange(len(result.scores)) % len(PHRASES),
                                      tracker_id=np.arange(len(result.scores)))
        started = time.perf_counter()
        for zone in polygon_zones:
            zone.trigger(detections_sv)
        for line in line_zones:
            line.trigger(detections_sv)
        elapsed = time.perf_counter() - started
        if index >= warmup:
            times.append(elapsed)
    return times


def model_seconds_per_frame(repeats: int = 3) -> float | None:
    """The default model's time for one 1920x1080 frame at the bundled config's resize (192 / 256)."""
    try:
        from streamer.inference import GdinoDetector

        detector = GdinoDetector(weights="default", short_side=192, max_side=256, box_threshold=0.3)
    except Exception as exc:  # no weights: report the overhead against the worker path only
        print(f"(no default model: {exc})")
        return None
    encoding = detector.encode(" . ".join(PHRASES) + " .")
    frame = np.full((HEIGHT, WIDTH, 3), 100, np.uint8)
    detector.detect([frame], encoding)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        detector.detect([frame], encoding)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--tracks", type=int, default=100)
    parser.add_argument("--zones", type=int, default=20)
    parser.add_argument("--no-model", action="store_true", help="skip timing the default model")
    args = parser.parse_args()

    import tracker

    tracker.warm_up()
    detections = moving_boxes(args.frames + args.warmup, args.tracks)
    zones, lines = zones_and_lines(args.zones)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        plain_settings = AlertSettings(directory=None)
        snapshot_settings = AlertSettings(directory=directory, clips=False)
        variants = {
            "tracker + events, no alerting": None,
            f"+ {args.zones} zones, {len(lines)} lines, {len(RULES)} rules":
                lambda: StreamAlerts("cam", "bench", zones, lines, RULES, plain_settings, live=False),
            "  ... and best-frame snapshots":
                lambda: StreamAlerts("cam", "bench", zones, lines, RULES, snapshot_settings, live=False),
        }
        # Interleaved repeats: a machine shared with other work slows both sides alike.
        for _ in range(3):
            for name, make in variants.items():
                times, kinds = run_worker(detections, args.warmup, make() if make else None)
                results.setdefault(name, []).append(statistics.median(times))
                results.setdefault(name + "#kinds", kinds)
    supervision_times = run_supervision(detections, args.warmup, zones, lines)
    model = None if args.no_model else model_seconds_per_frame()

    base = min(results["tracker + events, no alerting"])
    print(f"{args.tracks} tracks, {args.zones} zones, {len(lines)} lines, {len(RULES)} rules, {WIDTH}x{HEIGHT}, "
          f"{args.frames} frames (median per frame, best of 3 interleaved runs)")
    print(f"{'variant':44s} {'ms/frame':>9s} {'added ms':>9s} {'vs worker path':>15s}"
          + (f" {'vs worker + model':>18s}" if model else ""))
    for name in variants:
        value = min(results[name])
        added = value - base
        line = f"{name:44s} {value * 1e3:9.3f} {added * 1e3:9.3f} {added / base * 100:14.1f}%"
        if model:
            line += f" {added / (base + model) * 100:17.2f}%"
        print(line)
    kinds = results[f"+ {args.zones} zones, {len(lines)} lines, {len(RULES)} rules#kinds"]
    print("events per run with alerting:", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    if supervision_times is not None:
        ours = min(results[f"+ {args.zones} zones, {len(lines)} lines, {len(RULES)} rules"]) - base
        theirs = statistics.median(supervision_times)
        print(f"supervision PolygonZone x {args.zones} + LineZone x {len(lines)} (geometry only): "
              f"{theirs * 1e3:.3f} ms/frame; ours (geometry, rules and events): {ours * 1e3:.3f} ms/frame; "
              f"ratio {theirs / ours:.2f}x")
    if model:
        print(f"default model, one {WIDTH}x{HEIGHT} frame at 192/256: {model * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
