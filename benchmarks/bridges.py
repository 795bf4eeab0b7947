"""Bridges benchmark: the MQTT bridge's throughput to Mosquitto, and what the bridges cost the pipeline.

1. Events through the MQTT bridge: a producer process publishes track events on a ZeroMQ PUB socket as the hub
   does; the bridge (its own process, as in the daemon, `update_seconds = 0` so that every event becomes a
   Frigate message) turns them into `<prefix>/events` messages for a local Mosquitto; a paho subscriber counts
   them. Side by side: paho-mqtt publishing the same number of ready-made messages straight to the same broker
   (the ceiling of the broker and the client library on this machine), and the ratio.
2. Pipeline frames/s with the bridges on vs off: `groundwatch run` on the bundled video (looped) with no
   bridge, with the MQTT bridge (Home Assistant discovery on), and with a webhook whose endpoint never answers
   (every detections and track event offered to it). Runs alternate (off, mqtt, hanging webhook, repeated) so
   that a shared machine's drifting load falls on each alike; the best run of each is compared. Target: >= 95%.

    python benchmarks/bridges.py [--events 50000] [--rounds 2] [--loops 4] [--weights default]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mqtt_broker import Mosquitto, free_port  # noqa: E402

from streamer.demo import DEMO_CONFIG, DEMO_VIDEO  # noqa: E402

# -- 1. events through the bridge ------------------------------------------------------------------------------


def _producer(endpoint: str, count: int, tracks: int, ready, go) -> None:
    import zmq

    from streamer.events import encode_payload, make_event, splice_header, topic

    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.setsockopt(zmq.SNDHWM, count + 10)
    socket.bind(endpoint)
    ready.set()
    while not go.is_set():  # until the bridge is seen passing events on: the measurement starts subscribed
        socket.send_multipart([topic("cam", "status"), splice_header(encode_payload(
            make_event("cam", "status", state="online", source="live")), 0)])
        go.wait(0.1)
    topic_frame = topic("cam", "track")
    for n in range(count):
        track_id = n % tracks + 1
        event = make_event("cam", "track", ts=n / 30, event="started" if n < tracks else "updated",
                           track_id=track_id, box=[10 + n % 50, 20, 60 + n % 50, 90], score=0.5 + (n % 7) / 20,
                           phrase="green star", age=n // tracks, hits=n // tracks)
        socket.send_multipart([topic_frame, splice_header(encode_payload(event), n + 1)])
    time.sleep(30)  # keep the socket until the bridge has read everything (the parent terminates us)


def _bridge_process(port: int, endpoint: str, stop) -> None:
    from streamer.config import MqttConfig
    from streamer.mqtt_bridge import MqttBridge

    bridge = MqttBridge(config=MqttConfig(port=port, update_seconds=0, queue_size=1_000_000),
                        prompts={"cam": "green star ."}, events_endpoint=endpoint, control_endpoint="tcp://127.0.0.1:1")
    bridge.run(stop)


class Counter:
    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.count, self.first, self.last = 0, None, None
        self.connected = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-counter-{os.getpid()}-{id(self)}")
        client.on_connect = lambda c, u, f, rc, p: (c.subscribe(topic, 0), self.connected.set())
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        self.connected.wait(10)

    def _on_message(self, client, userdata, message) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.count += 1

    def wait(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_seen, stalled_since = -1, time.monotonic()
        while self.count < count and time.monotonic() < deadline:
            if self.count != last_seen:
                last_seen, stalled_since = self.count, time.monotonic()
            elif time.monotonic() - stalled_since > 30:
                break
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bench_bridge(port: int, count: int, tracks: int = 100) -> tuple[float, int]:
    context = multiprocessing.get_context("spawn")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ready, go, stop = context.Event(), context.Event(), context.Event()
    producer = context.Process(target=_producer, args=(endpoint, count, tracks, ready, go))
    producer.start()
    ready.wait(30)
    bridge = context.Process(target=_bridge_process, args=(port, endpoint, stop))
    bridge.start()
    counter = Counter(port, "groundwatch/events")
    probe = Counter(port, "groundwatch/cam/status")
    deadline = time.monotonic() + 120
    while probe.count == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    probe.close()
    started = time.perf_counter()
    go.set()
    counter.wait(count, timeout=600)
    elapsed = (counter.last or time.perf_counter()) - started
    received = counter.count
    stop.set()
    bridge.join(20)
    producer.terminate()
    producer.join()
    counter.close()
    return received / elapsed, received


def bench_paho_direct(port: int, count: int) -> float:
    """The same number of Frigate-sized messages published by paho straight to the broker."""
    import paho.mqtt.client as mqtt

    from streamer.mqtt_bridge import BridgeState

    state = BridgeState(prefix="direct", streams={"cam": "green star ."}, update_seconds=0)
    base = {"stream": "cam", "kind": "track", "ts": 1.0, "wall": 2.0, "track_id": 1, "score": 0.5,
            "phrase": "green star", "age": 3, "hits": 3}
    state.handle(dict(base, event="started", box=[10, 20, 60, 90]))
    [payload] = [m.payload for m in state.handle(dict(base, event="updated", box=[12, 20, 62, 90]))
                 if m.topic == "direct/events"]  # a real Frigate update message
    counter = Counter(port, "direct/events")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-direct-{os.getpid()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(0.5)
    started = time.perf_counter()
    for _ in range(count):
        client.publish("direct/events", payload, qos=0)
    counter.wait(count, timeout=600)
    elapsed = (counter.last or time.perf_counter()) - started
    received = counter.count
    client.disconnect()
    client.loop_stop()
    counter.close()
    return received / elapsed


# -- 2. pipeline with the bridges on vs off -----------------------------------------------------------------------


class _Hang(BaseHTTPRequestHandler):
    release = threading.Event()

    def do_POST(self):  # noqa: N802
        self.release.wait(600)

    def log_message(self, *args):
        pass


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return None


def run_daemon(base: dict, extra: dict, work: Path, name: str) -> tuple[float, dict[str, float]]:
    """Frames/s of one daemon run, steady window from the recording (as benchmarks/pipeline.py), and the CPU
    seconds each child used (read from /proc until it exits): on a loaded machine the bridges' CPU next to the
    worker's is the steadier measure of what they cost."""
    from streamer.config import parse_config
    from streamer.daemon import Supervisor
    from streamer.recording import read_events

    data = json.loads(json.dumps(base))
    data.update(extra)
    data["publish"] = dict(data["publish"], endpoint=f"tcp://127.0.0.1:{free_port()}",
                           control_endpoint=f"tcp://127.0.0.1:{free_port()}")
    data["record"] = dict(data["record"], directory=str(work / name))
    config = parse_config(data, base_dir=DEMO_CONFIG.parent)
    supervisor = Supervisor(config)
    cpu: dict[str, float] = {}
    done = threading.Event()

    def sample(s: Supervisor) -> None:
        def loop():
            while not done.is_set():
                for child in s.children:
                    if child.process is not None and (seconds := _cpu_seconds(child.process.pid)) is not None:
                        cpu[child.name] = seconds
                time.sleep(0.2)

        threading.Thread(target=loop, daemon=True).start()

    code = supervisor.run(on_ready=sample)
    done.set()
    assert code == 0, supervisor.stop_reason
    detections = [e for e in read_events(supervisor.record_paths[config.streams[0].id]) if e["kind"] == "detections"]
    first_wall = detections[0]["wall"]
    after_first = [e for e in detections if e["wall"] > first_wall + 0.05]
    return len(after_first) / (detections[-1]["wall"] - first_wall), cpu


def main() -> None:
    import tomllib

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=2, help="daemon runs per configuration (alternating)")
    parser.add_argument("--loops", type=int, default=4, help="the bundled video repeated this often per run")
    parser.add_argument("--weights", default="default")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    print(f"# bridges benchmark: {platform.node()}, {os.cpu_count()} CPUs, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the broker (finally below)
    work = Path(tempfile.mkdtemp(prefix="groundwatch-bench-bridges-"))
    broker = Mosquitto(work / "broker").start()
    hanging = ThreadingHTTPServer(("127.0.0.1", 0), _Hang)
    hanging.daemon_threads = True
    threading.Thread(target=hanging.serve_forever, daemon=True).start()
    try:
        direct = bench_paho_direct(broker.port, args.events)
        rate, received = bench_bridge(broker.port, args.events)
        print(f"MQTT bridge: {rate:,.0f} events/s (track events on the bus -> Frigate messages at Mosquitto, "
              f"{received:,}/{args.events:,} received) vs paho publishing ready-made messages straight to the "
              f"broker {direct:,.0f} messages/s -> {rate / direct:.2f}x")
        if args.skip_pipeline:
            return
        video = work / "demo-long.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-stream_loop", str(args.loops - 1), "-i",
                        str(DEMO_VIDEO), "-c", "copy", str(video)], check=True)
        base = tomllib.loads(DEMO_CONFIG.read_text())
        base["model"]["weights"] = args.weights
        base["streams"][0]["url"] = str(video)
        base["web"] = {"enabled": False}  # the console's previews would cost every variant alike: measure bridges
        variants = {
            "off": {},
            "mqtt": {"mqtt": {"port": broker.port, "homeassistant": True}},
            "hanging webhook": {"webhooks": [{"url": f"http://127.0.0.1:{hanging.server_address[1]}/hook",
                                              "kinds": ["detections", "track"], "timeout_seconds": 300,
                                              "queue_size": 100}]},
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        shares: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            for name, extra in variants.items():
                fps, cpu = run_daemon(base, extra, work, f"{name.replace(' ', '-')}-{round_index}")
                results[name].append(fps)
                bridge_cpu = cpu.get("mqtt", 0.0) + cpu.get("webhooks", 0.0)
                shares[name].append(bridge_cpu / max(cpu.get("worker", 0.0), 1e-9))
                print(f"  round {round_index + 1} {name}: {fps:.2f} frames/s; CPU seconds "
                      + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())), flush=True)
        for name in ("mqtt", "hanging webhook"):
            print(f"  {name}: bridge CPU / worker CPU = {max(shares[name]):.2%} (worst round)")
        best = {name: max(values) for name, values in results.items()}
        print(f"pipeline ({args.weights} model, bundled video x{args.loops}, best of {args.rounds}): "
              f"off {best['off']:.2f} frames/s, MQTT bridge on {best['mqtt']:.2f} "
              f"({best['mqtt'] / best['off']:.1%}), webhook to a hanging endpoint {best['hanging webhook']:.2f} "
              f"({best['hanging webhook'] / best['off']:.1%}) (target >= 95%)")
    finally:
        _Hang.release.set()
        hanging.shutdown()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
