"""Leak rate of `groundwatch redact` on shapes-world videos with ground truth: tracked vs per-frame detections.

    python benchmarks/redaction_leak.py [--videos 48] [--frames 40] [--drop 0.1] [--first-seed S]

The default model's real detections on held-out shapes videos (objects moving, crossing, entering and leaving),
with every detection of a random 10 % of frames dropped on top of the detector's own misses. A (frame, object)
pair leaks when the object's ground-truth box is not wholly inside the union of redacted boxes. Prints the
per-frame-only figure (the competitor: detections alone), the offline tracked planner (what `groundwatch
redact` does) and the causal live planner, side by side, with the ratio, and what each costs: the mean fraction
of the frame it redacts (over-redaction).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/, whose tracker.py would shadow the tracker package

import torch  # noqa: E402

import gdino  # noqa: E402
from gdino import shapes  # noqa: E402
from streamer.editing.leak import shapes_leak  # noqa: E402
from streamer.editing.planner import PlannerConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=48,
                        help="videos (a leaked pair is 1/800 of six videos' pairs: fewer measure little)")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--drop", type=float, default=0.1, help="fraction of frames whose detections are dropped")
    parser.add_argument("--padding", type=float, default=0.2)
    parser.add_argument("--first-seed", type=int, default=shapes.EVAL_SEED_OFFSET + 500_000)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    model = gdino.load("default")
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.videos)
    report = shapes_leak(model, seeds, num_frames=args.frames, drop_fraction=args.drop, padding=args.padding,
                         config=PlannerConfig())
    elapsed = time.perf_counter() - started
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = platform.processor() or platform.machine()
    try:  # the CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"), as the other benchmarks print it
        machine = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine {machine}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, commit {commit}, {elapsed:.0f} s")
    print(f"{args.videos} videos x {args.frames} frames (192x256), {report.dropped_frames} of {report.frames} frames' "
          f"detections dropped, {report.pairs} (frame, object) pairs, padding {args.padding}")
    per_frame = report.rate("per_frame")
    for name in ("per_frame", "tracked", "live"):
        rate = report.rate(name)
        ratio = f"{per_frame / rate:.1f}x fewer leaks than per-frame" if name != "per_frame" and rate else ""
        print(f"  {name:10s} leaked {report.leaked[name]:4d} / {report.pairs}  = {100 * rate:6.2f} %  "
              f"frame area redacted {100 * report.area(name):5.1f} %  {ratio}")
    print(f"  (ground-truth boxes cover {100 * report.truth_area / report.frames:.1f} % of the frame)")


if __name__ == "__main__":
    main()
