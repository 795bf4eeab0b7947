"""`groundwatch demo`: the main job on an embedded default.

Runs the bundled shapes video (streamer/assets/demo.mp4) through the daemon with the default model, subscribes
to its events while it runs, then draws the recording over the video, and prints where everything is.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from streamer.config import parse_config

ASSETS = Path(__file__).parent / "assets"
DEMO_VIDEO = ASSETS / "demo.mp4"
DEMO_CONFIG = ASSETS / "demo.toml"
# The bundled video is gdino.shapes.render_video(DEMO_SEED, DEMO_FRAMES, DEMO_SIZE, DEMO_FPS) written with
# streamer.media.write_video(path, frames, fps=DEMO_FPS, options={"crf": "28"}): 6 s at 320x240, H.264.
DEMO_SEED, DEMO_FRAMES, DEMO_SIZE, DEMO_FPS = 7, 60, (240, 320), 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _web_port(preferred: int = 8080) -> int:
    """The console's usual port when it is free, else any free one (a daemon may already hold 8080)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return _free_port()


def demo_config(output_directory: str | Path = "runs/demo", weights: str = "default", stay: bool = False):
    """The demo's daemon config: the bundled video and model, free ports, recordings under `output_directory`."""
    import tomllib

    data = tomllib.loads(DEMO_CONFIG.read_text())
    # Free ports, so the demo runs next to a daemon that already holds the defaults.
    data["publish"].update(endpoint=f"tcp://127.0.0.1:{_free_port()}",
                           control_endpoint=f"tcp://127.0.0.1:{_free_port()}")
    data["record"]["directory"] = str(Path(output_directory).resolve() / "recordings")
    # The demo deletes nothing: `-o runs` puts its recordings beside a real daemon's (runs/recordings), whose
    # files the default expiry (7 days of video, a 1 GB free-disk floor) would otherwise remove.
    data["record"]["retain"] = {"days": {"events": 0, "segments": 0, "snapshots": 0, "clips": 0},
                                "max_gigabytes": 0, "min_free_gigabytes": 0}
    data["model"]["weights"] = weights
    data.setdefault("web", {})["port"] = _web_port()
    if stay:  # keep the daemon, and so the console, up after the video until Ctrl-C
        data.setdefault("supervisor", {})["exit_when_done"] = False
    return parse_config(data, source=str(DEMO_CONFIG), base_dir=ASSETS)


def run_demo(output_directory: str | Path = "runs/demo", weights: str = "default", stay: bool = False) -> int:
    from streamer.daemon import Supervisor
    from streamer.recording import read_events
    from streamer.replay import replay

    output_directory = Path(output_directory).resolve()
    config = demo_config(output_directory, weights, stay)
    stream = config.streams[0]

    from streamer.client import subscribe

    counts: Counter = Counter()
    ready = threading.Event()

    def listen() -> None:
        ready.set()
        for event in subscribe(config.publish.endpoint, timeout=600):
            counts[event["kind"] if event["kind"] != "track" else f"track {event['event']}"] += 1
            if event["kind"] == "status" and event.get("state") == "offline":
                break

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait()
    print(f"groundwatch demo: {stream.url} through the {weights!r} model, prompt {stream.prompt!r}", flush=True)
    print(f"groundwatch demo: events on {config.publish.endpoint} "
          f"(watch them: groundwatch subscribe {config.publish.endpoint})", flush=True)
    supervisor = Supervisor(config)
    supervisor.install_signal_handlers()

    def announce(s: Supervisor) -> None:
        if s.web_url:
            after = "until Ctrl-C" if stay else "while the video runs (--stay keeps it up afterwards)"
            print(f"groundwatch demo: console at {s.web_url} (open it in a browser; up {after})", flush=True)

    started = time.perf_counter()
    code = supervisor.run(on_ready=announce)
    elapsed = time.perf_counter() - started
    listener.join(2)
    if code != 0:
        print(f"groundwatch demo: the daemon failed ({supervisor.stop_reason})", flush=True)
        return code
    events_path = Path(supervisor.record_paths[stream.id])
    if not stay and supervisor.stop_reason in ("SIGINT", "SIGTERM", "SIGHUP"):
        # Stopped before the video ended: no replay or summary pretending the demo ran (with --stay, Ctrl-C is
        # how it ends).
        print(f"groundwatch demo: interrupted ({supervisor.stop_reason}); the events so far: {events_path}",
              flush=True)
        return 130
    detections = [e for e in read_events(events_path) if e["kind"] == "detections"]
    replay_path = output_directory / "demo-replay.mp4"
    summary = replay(stream.url, events_path, replay_path, progress=True)
    boxes = sum(len(e["detections"]) for e in detections)
    summary_path = output_directory / "summary.json"
    summary_path.write_text(json.dumps({
        "video": stream.url, "prompt": stream.prompt, "weights": weights, "frames": len(detections),
        "boxes": boxes, "events_received": dict(counts), "seconds": round(elapsed, 2),
        "recording": str(events_path), "replay": str(replay_path)}, indent=2))
    print(f"groundwatch demo: {len(detections)} frames in {elapsed:.1f} s, {boxes} boxes, "
          f"events received by a subscriber: {dict(sorted(counts.items()))}")
    print(f"groundwatch demo: recording  {events_path}")
    print(f"groundwatch demo: replay     {summary.output} ({summary.frames} frames with overlays and trails)")
    print(f"groundwatch demo: summary    {summary_path}")
    return 0
