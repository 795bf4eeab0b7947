"""Cluster benchmark: the daemon on a local Ray cluster against the single-machine daemon, same streams.

1. End-to-end: frames/s of `groundwatch run --cluster` (decoder actors, a detector actor, frames through Ray's
   object store, events back through the driver) vs `groundwatch run` (decoder processes, shared-memory mailboxes,
   one worker) on the same streams with the same model, batch size and inference threads; steady-state rate
   (first to last `detections` event). Target: the Ray path >= 85% of the single-machine daemon. The difference in
   time per frame is the per-frame overhead of the cluster path. The paths run in turn, single first and last
   (single, Ray, single, Ray, ..., single: `--repeats` Ray runs); the ratio is the median Ray rate over the median
   single-machine rate, and every run is printed (one run of 120 frames is about 8 s of steady state: a single
   run's ratio swung between 84 % and 97 % on a quiet machine).
2. Transport: what one frame costs through Ray alone, one call after another, at 320x240 and 1920x1080 (no model):
   the daemon's way (the pixels a second return value of the decoder's call, owned by the driver, its ref handed on
   to a detector actor that reads it zero-copy) and the way before (`ray.put` in the decoder actor, the ref
   borrowed by the driver and the detector).

    python benchmarks/cluster.py [--short] [--streams 2] [--repeats 1] [--weights default|tiny] [--transport-only]

Starts its own Ray cluster (head + one worker node, 127.0.0.1, stopped by pid at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from ray_cluster import RayCluster  # noqa: E402  (tests/ray_cluster.py: nodes started and stopped by pid)

import _daemon  # noqa: E402

DEMO = REPO / "streamer" / "assets" / "demo.mp4"
PROMPT = "green star . black cross . purple square . black ring ."


def config_text(root: Path, streams: int, fps: float, weights: str, threads: int, batch: int,
                cluster: str | None, detector_cpus: int) -> str:
    return _daemon.config_text(
        [{"id": f"s{index}", "url": DEMO, "prompt": PROMPT, "fps": fps} for index in range(streams)],
        model={**_daemon.DEFAULT_MODEL, "weights": weights, "batch_size": batch, "threads": threads},
        tracker=_daemon.DEFAULT_TRACKER, endpoint=_daemon.loopback_endpoint(),
        control_endpoint=_daemon.loopback_endpoint(), record_directory=root / "recordings",
        supervisor={"shutdown_timeout_seconds": 60},
        cluster={"address": cluster, "detectors": 1, "detector_cpus": detector_cpus} if cluster else None)


def run_daemon(root: Path, text: str, timeout: float = 1800) -> dict:
    """Run `groundwatch run` to the end of its files; frames/s from the recorded `detections` events."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text(text)
    started = time.time()
    result = _daemon.run_to_end(config, cwd=root, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"daemon failed ({result.returncode}):\n{result.stderr[-3000:]}")
    walls, frames = [], 0
    for path in (root / "recordings").glob("*/events-*.jsonl"):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event["kind"] == "detections":
                walls.append(event["wall"])
                frames += 1
    walls.sort()
    # Steady state: from the first frame out to the last (model loading and actor start-up left out).
    steady = _daemon.steady_rate(walls) if len(walls) > 1 else 0.0
    return {"frames": frames, "fps": steady, "wall": time.time() - started}


def process_cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes have used so far, from /proc (0 for a process gone)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def transport(address: str, sizes: list[tuple[int, int]], frames: int, node_pids=lambda: []) -> dict:
    """Per-frame cost of the Ray path alone, one frame per call, the calls one after another (no model), both ways:

    - `put`: the way before (2026-11-28 morning): `ray.put` of each frame in the decoder actor, the ref returned
      to the driver (which borrows it) and handed nested to the detector actor (which borrows it and reads it);
    - `return`: the daemon's way now: the decoder's `take` returns the pixels as its second return value (one
      object per call, owned by the driver, Ray copying straight from the frame's memory), the driver reads only
      the first and hands the second's ref on; the detector reads it zero-copy.

    Each way gives the wall time per frame (the latency of the round trips) and the CPU time per frame of every
    process involved: this driver, both actors, and the cluster's own (raylets, GCS, agents: `node_pids()`) -
    what the Ray path takes from the model on a machine whose cores are all busy."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Source:
        def __init__(self, width: int, height: int) -> None:
            self.pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)

        def take(self) -> dict:
            return {"frame": 0, "pixels": ray.put(self.pixels)}

        def take_two(self) -> tuple[dict, list]:
            return {"frames": [{"frame": 0, "position": 0}]}, [self.pixels]

        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0)
    class Sink:
        def process(self, items: list[dict]) -> dict:
            total = 0
            for item in items:
                pixels = ray.get(item["pixels"])  # zero-copy view into the object store
                if "position" in item:
                    pixels = pixels[item["position"]]
                total += int(pixels[0, 0, 0])
            return {"events": [], "checksum": total}

        def pid(self) -> int:
            return os.getpid()

    out = {}
    try:
        sink = Sink.remote()
        for width, height in sizes:
            source = Source.remote(width, height)
            pids = sorted(set(ray.get([source.pid.remote(), sink.pid.remote()]) + list(node_pids())))

            def cpu_now() -> float:
                return time.process_time() + process_cpu_seconds(pids)

            def put_way() -> None:
                meta = ray.get(source.take.remote())
                ray.get(sink.process.remote([meta]))

            def return_way() -> None:
                meta_ref, pixels_ref = source.take_two.options(num_returns=2).remote()
                meta = ray.get(meta_ref)
                ray.get(sink.process.remote([{**meta["frames"][0], "pixels": pixels_ref}]))

            totals = {"put": [0.0, 0.0], "return": [0.0, 0.0]}
            for way in (put_way, return_way):  # warm both
                for _ in range(5):
                    way()
            rounds = 3  # alternating, so that a change of load falls on both ways alike
            for _ in range(rounds):
                for name, way in (("put", put_way), ("return", return_way)):
                    started, cpu = time.perf_counter(), cpu_now()
                    for _ in range(frames // rounds):
                        way()
                    totals[name][0] += time.perf_counter() - started
                    totals[name][1] += cpu_now() - cpu
            for name, (wall, cpu) in totals.items():
                count = frames // rounds * rounds
                out[f"{name} {width}x{height}"] = (wall / count * 1000, cpu / count * 1000)
            ray.kill(source)
    finally:
        ray.shutdown()
    return out


def print_transport(costs: dict) -> None:
    for size, (wall_ms, cpu_ms) in costs.items():
        how = ("ray.put in a decoder actor -> ref borrowed by the driver -> read in a detector actor, the way before"
               if size.startswith("put") else "second return value of the decoder's call -> ref handed on by the "
               "driver -> read in a detector actor, the daemon's way now")
        print(f"transport {size}: {wall_ms:.2f} ms per frame, {cpu_ms:.2f} ms CPU per frame of every process "
              f"({how})")


def transport_summary(costs: dict) -> str:
    return " / ".join(f"{size} {wall_ms:.2f} ms ({cpu_ms:.2f} ms CPU)" for size, (wall_ms, cpu_ms) in costs.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="fewer frames (fps 2 per stream): a quick check")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--weights", default="default")
    parser.add_argument("--threads", type=int, default=2, help="inference threads, both paths")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="Ray runs, each between two single-machine runs")
    parser.add_argument("--transport-only", action="store_true",
                        help="only part 2 (no model, no daemon): minutes instead of tens on a loaded machine")
    args = parser.parse_args()
    fps = 2 if args.short else 0
    root = Path(tempfile.mkdtemp(prefix="gw-cluster-bench-"))
    cpu = _daemon.cpu_model() or "?"
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), load average "
          f"{os.getloadavg()[0]:.1f} at start")
    cluster = RayCluster(root / "ray")

    def node_pids() -> list[int]:  # the cluster's own processes (raylets, GCS, agents, workers)
        return [pid for node in cluster.nodes for pid in node.pids()]

    try:
        cluster.start(head_cpus=args.streams + args.threads)
        cluster.add_node(cpus=1)
        cluster.use_in_this_process()  # the cluster's token, for the daemons and `transport` below
        if args.transport_only:
            costs = transport(cluster.address, [(320, 240), (1920, 1080)], 50 if args.short else 300,
                              node_pids)
            print_transport(costs)
            print(f"SUMMARY transport {transport_summary(costs)}, load average {os.getloadavg()[0]:.1f} at the end")
            return

        def one(path: str, on_cluster: bool) -> dict:
            name = f"{path}-{len(runs)}"
            result = run_daemon(root / name, config_text(root / name, args.streams, fps, args.weights, args.threads,
                                                         args.batch, cluster.address if on_cluster else None,
                                                         args.threads))
            runs.append((path, result))
            return result

        runs: list[tuple[str, dict]] = []
        one("single", False)
        for _ in range(max(1, args.repeats)):
            one("ray", True)
            one("single", False)
        costs = transport(cluster.address, [(320, 240), (1920, 1080)], 50 if args.short else 300, node_pids)
    finally:
        cluster.stop()
    singles = [r["fps"] for path, r in runs if path == "single"]
    rays = [r["fps"] for path, r in runs if path == "ray"]
    baseline, on_ray = float(np.median(singles)), float(np.median(rays))
    ratio = on_ray / baseline if baseline else 0.0
    overhead_ms = (1 / on_ray - 1 / baseline) * 1000 if on_ray and baseline else float("nan")
    print(f"\n{args.streams} streams of the bundled video ({'fps 2' if fps else 'every frame'}), weights "
          f"{args.weights}, batch {args.batch}, {args.threads} inference threads on both paths, runs in this order")
    print("| path | frames | frames/s (steady) | wall s |\n|---|---|---|---|")
    for path, r in runs:
        label = "Ray cluster" if path == "ray" else "single machine"
        print(f"| {label} | {r['frames']} | {r['fps']:.2f} | {r['wall']:.1f} |")
    print(f"median: single machine {baseline:.2f} frames/s ({len(singles)} runs), Ray {on_ray:.2f} "
          f"({len(rays)} runs); Ray runs / median single: {', '.join(f'{100 * f / baseline:.1f}%' for f in rays)}")
    print_transport(costs)
    print(f"\nSUMMARY cluster/single = {ratio * 100:.1f}% (medians, target >= 85%), per-frame overhead "
          f"{overhead_ms:.1f} ms, transport {transport_summary(costs)}")


if __name__ == "__main__":
    main()
