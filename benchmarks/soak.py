"""Soak test: the real daemon on looped, realtime file streams for a long time; is anything growing?

Runs `groundwatch run` (a subprocess) on N copies of the bundled video with `loop = true` and `realtime = true`
(paced at 10 fps, as cameras), a subscriber reading every event, and samples every `--sample-seconds`:
the resident memory (RSS) of every daemon process, their open file descriptors, and the daemon's entries in
/dev/shm and the system temp directory. At the end it compares the first samples after a warm-up with the last
ones and checks: RSS flat within 5% per process, no growth of open files or shared memory, no lost events.

    python benchmarks/soak.py [--duration 600] [--streams 4] [--weights tiny] [--json out.json]

Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _daemon  # noqa: E402
from streamer.client import GapCounter, status, subscribe, wait_ready  # noqa: E402
from streamer.demo import DEMO_VIDEO  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid: int) -> float | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def open_files(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def write_config(root: Path, streams: int, weights: str, fps: float, publish: str, control: str) -> Path:
    config = root / "soak.toml"
    config.write_text(_daemon.config_text(
        [{"id": f"s{i}", "url": DEMO_VIDEO, "prompt": "green star . black cross . purple square . black ring .",
          "loop": True, "realtime": True, "fps": fps} for i in range(streams)],
        # a soak looks for leaks, not accuracy: a small input keeps up on a loaded CPU
        model={"weights": weights, "short_side": 96, "max_side": 128, "batch_size": 4},
        endpoint=publish, control_endpoint=control, publish={"heartbeat_seconds": 1.0},
        record_directory=root / "recordings", web=None, exit_when_done=False))
    return config


def summarise(samples: list[dict], warm_up: float) -> dict:
    """First and last windows (a tenth of the run after warm-up, at least one sample each) per process."""
    steady = [s for s in samples if s["t"] >= warm_up] or samples
    window = max(1, len(steady) // 10)
    first, last = steady[:window], steady[-window:]

    def mean(rows, key, name):
        values = [r[key][name] for r in rows if r[key].get(name) is not None]
        return sum(values) / len(values) if values else None

    processes = {}
    for name in samples[-1]["rss_mib"]:
        a, b = mean(first, "rss_mib", name), mean(last, "rss_mib", name)
        if a is None or b is None:
            continue
        processes[name] = {"rss_first_mib": round(a, 1), "rss_last_mib": round(b, 1),
                           "rss_growth_pct": round(100 * (b - a) / a, 2),
                           "rss_max_mib": round(max(r["rss_mib"].get(name) or 0 for r in steady), 1),
                           # a socket opened for one status request comes and goes: compare window maxima
                           "fds_first": max(r["fds"].get(name) or 0 for r in first),
                           "fds_last": max(r["fds"].get(name) or 0 for r in last),
                           "fds_max": max(r["fds"].get(name) or 0 for r in steady)}
    return {"processes": processes,
            "shm_first": max(r["shm"] for r in first), "shm_last": max(r["shm"] for r in last), "shm_max": max(r["shm"] for r in steady),
            "tmp_first": first[0]["tmp"], "tmp_last": last[-1]["tmp"],
            "total_rss_first_mib": round(sum(p["rss_first_mib"] for p in processes.values()), 1),
            "total_rss_last_mib": round(sum(p["rss_last_mib"] for p in processes.values()), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of soak after the model is ready")
    parser.add_argument("--streams", type=int, default=4, help="looped realtime file streams")
    parser.add_argument("--fps", type=float, default=2, help="per-stream fps cap (0: every frame, 10 fps)")
    parser.add_argument("--weights", default="tiny", help="model weights ('tiny' random, 'default', a path)")
    parser.add_argument("--sample-seconds", type=float, default=10, help="sampling period")
    parser.add_argument("--warm-up", type=float, default=60, help="seconds excluded from the comparison")
    parser.add_argument("--json", help="write samples and summary here")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    publish, control = _daemon.loopback_endpoint(), _daemon.loopback_endpoint()
    config = write_config(root, args.streams, args.weights, args.fps, publish, control)
    log = open(root / "daemon.log", "w")
    daemon = _daemon.start(config, log=log)
    counts = {"events": 0, "detections": 0, "errors": 0}
    gaps = GapCounter()
    stop_listening = threading.Event()

    def listen() -> None:
        for event in subscribe(publish, timeout=None, gaps=gaps, high_water_mark=1_000_000):
            counts["events"] += 1
            counts["detections"] += event["kind"] == "detections"
            counts["errors"] += event["kind"] == "error"
            if stop_listening.is_set():
                return

    samples: list[dict] = []
    code = 1
    try:
        wait_ready(control, timeout=300)
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        started = time.monotonic()
        print(f"soak: {args.streams} looped realtime streams for {args.duration:.0f} s, daemon pid {daemon.pid}",
              flush=True)
        while time.monotonic() - started < args.duration and daemon.poll() is None:
            reply = status(control, timeout=10)
            pids = {"supervisor": daemon.pid}
            pids.update({name: p["pid"] for name, p in reply["processes"].items() if p["pid"]})
            sample = {"t": round(time.monotonic() - started, 1),
                      "rss_mib": {name: rss_mib(pid) for name, pid in pids.items()},
                      "fds": {name: open_files(pid) for name, pid in pids.items()},
                      "shm": len([p for p in os.listdir("/dev/shm") if p.startswith(f"groundwatch-{daemon.pid}-")]),
                      "tmp": len([p for p in os.listdir(tempfile.gettempdir()) if p.startswith("groundwatch-")]),
                      "fps": round(sum(s["fps"] for s in reply["streams"].values()), 2),
                      "frames_processed": sum(s["frames_processed"] for s in reply["streams"].values()),
                      "restarts": sum(p["restarts"] for p in reply["processes"].values()),
                      "events_received": counts["events"]}
            samples.append(sample)
            print(f"soak: t={sample['t']:6.0f}s fps={sample['fps']:5.1f} frames={sample['frames_processed']:7d} "
                  f"rss={sum(v or 0 for v in sample['rss_mib'].values()):7.1f} MiB "
                  f"fds={sum(v or 0 for v in sample['fds'].values())} shm={sample['shm']} "
                  f"restarts={sample['restarts']}", flush=True)
            time.sleep(args.sample_seconds)
        alive = daemon.poll() is None
    finally:
        stop_listening.set()
        _daemon.stop(daemon, 60)
        log.close()
    leftover_shm = [p for p in os.listdir("/dev/shm") if p.startswith(f"groundwatch-{daemon.pid}-")]
    if len(samples) < 3:
        print(f"soak: too few samples ({len(samples)}); daemon log {root / 'daemon.log'}")
        return 1
    summary = summarise(samples, min(args.warm_up, samples[-1]["t"] / 3))
    worst = max(abs(p["rss_growth_pct"]) for p in summary["processes"].values())
    fds_grew = any((p["fds_last"] or 0) > (p["fds_first"] or 0) for p in summary["processes"].values())
    checks = {
        "daemon alive to the end": alive,
        "no process restarted": samples[-1]["restarts"] == 0,
        "RSS of every process flat within 5%": worst <= 5.0,
        "no growth of open files": not fds_grew,
        "no growth of /dev/shm entries": summary["shm_last"] <= summary["shm_first"],
        "no /dev/shm entry left after exit": not leftover_shm,
        "no event lost by the subscriber": gaps.lost == 0,
        "daemon exited 0 on SIGTERM": daemon.returncode == 0,
    }
    summary.update(duration_s=samples[-1]["t"], streams=args.streams, weights=args.weights,
                   frames_processed=samples[-1]["frames_processed"], events_received=counts["events"],
                   errors_received=counts["errors"], events_lost=gaps.lost, worst_rss_growth_pct=worst,
                   exit_code=daemon.returncode, checks=checks, machine=platform.processor() or platform.machine(),
                   cpus=os.cpu_count())
    print(f"\nsoak: {summary['duration_s']:.0f} s, {args.streams} streams, "
          f"{summary['frames_processed']} frames processed, {counts['events']} events received, "
          f"{gaps.lost} lost, {counts['errors']} error events")
    print(f"{'process':18s} {'RSS first':>10s} {'RSS last':>10s} {'growth':>8s} {'RSS max':>9s} {'fds':>9s}")
    for name, p in summary["processes"].items():
        print(f"{name:18s} {p['rss_first_mib']:8.1f}MB {p['rss_last_mib']:8.1f}MB {p['rss_growth_pct']:7.2f}% "
              f"{p['rss_max_mib']:7.1f}MB {p['fds_first']:>4}->{p['fds_last']:<4}")
    print(f"/dev/shm entries {summary['shm_first']} -> {summary['shm_last']} (after exit: {len(leftover_shm)}); "
          f"groundwatch-* temp folders of every user of the machine {summary['tmp_first']} -> {summary['tmp_last']}")
    for check, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {check}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))
    code = 0 if all(checks.values()) else 1
    return code


if __name__ == "__main__":
    sys.exit(main())
