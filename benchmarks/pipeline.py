"""Pipeline benchmark: the whole daemon against its parts, each side by side with its competitor, in one run.

1. End-to-end: frames/s of `groundwatch run` on the bundled video (decode, shared memory, inference, tracking,
   publishing, recording) vs the inference stage alone (the same detector on the same, already decoded frames,
   same batch size). Target: the daemon reaches >= 90% of the inference stage.
2. Decode: our decoder process (PyAV -> RGB -> shared-memory mailbox) vs the `ffmpeg` command line decoding the
   same file to RGB (`-pix_fmt rgb24 -f null`). Target: >= 0.9x.
3. Events: events/s through the hub (JSON bodies from a producer process -> seq spliced in, PUB, recording), a
   subscriber process reading. Target: >= 50,000 events/s.
4. Frame transport between processes: the shared-memory mailbox vs ZeroMQ PUSH/PULL zero-copy over ipc://.

    python benchmarks/pipeline.py [--weights default|tiny|PATH] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _daemon import free_port  # noqa: E402
from streamer.demo import DEMO_CONFIG, DEMO_VIDEO  # noqa: E402


def decode_all(path: Path, short_side: int | None = None) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


# -- 1. end to end vs inference alone -------------------------------------------------------------------------


def _inference_alone(model, prompt: str, batch: int, video: str, result) -> None:
    from streamer.inference import build_detector

    frames = decode_all(Path(video))
    detector = build_detector(model)
    encoding = detector.encode(prompt)
    detector.detect(frames[:batch], encoding)  # warm-up: one-time kernel compilation, allocator
    started = time.perf_counter()
    for start in range(0, len(frames), batch):
        detector.detect(frames[start:start + batch], encoding)
    result.value = len(frames) / (time.perf_counter() - started)


def bench_inference_alone(config) -> float:
    """The detector on the decoded frames, in a fresh spawned process like the daemon's worker."""
    context = multiprocessing.get_context("spawn")
    result = context.Value("d", 0.0)
    process = context.Process(target=_inference_alone, args=(
        config.model, config.streams[0].prompt, config.model.batch_size,
        config.streams[0].url, result))
    process.start()
    process.join()
    return result.value


def bench_daemon(config) -> tuple[float, int, float, float]:
    """Frames/s from the first detections event to the last, as a subscriber sees them."""
    from streamer.client import subscribe
    from streamer.daemon import Supervisor

    walls: list[float] = []
    listening = threading.Event()

    def listen():
        listening.set()
        for event in subscribe(config.publish.endpoint, kind="detections", timeout=900):
            walls.append(time.time())

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    listening.wait()
    time.sleep(0.2)
    supervisor = Supervisor(config)
    cpu_seconds: dict[str, float] = {}
    sampling = threading.Event()

    def sample_cpu(s: Supervisor) -> None:
        """CPU time (user + system) of every process but the worker, read from /proc until they exit."""
        tick = os.sysconf("SC_CLK_TCK")

        def loop():
            while not sampling.is_set():
                for name, pid in [("supervisor", os.getpid())] + [(c.name, c.process.pid) for c in s.children
                                                                  if c.process is not None]:
                    try:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        cpu_seconds[name] = (int(fields[11]) + int(fields[12])) / tick
                    except (OSError, IndexError):
                        pass
                time.sleep(0.2)

        threading.Thread(target=loop, daemon=True).start()

    started = time.perf_counter()
    supervisor_cpu_at_start = sum(os.times()[:2])  # this process's CPU so far (the inference-alone run)
    code = supervisor.run(on_ready=sample_cpu)
    wall = time.perf_counter() - started
    sampling.set()
    assert code == 0, supervisor.stop_reason
    time.sleep(0.5)
    if len(walls) < 2:
        raise RuntimeError("the subscriber saw fewer than two frames")
    # Events of one batch go out together, so the steady-state window runs from the end of the first batch
    # (one-time costs: both sides exclude them; the inference side warms up first) to the end of the last.
    from streamer.recording import read_events

    detections = [e for e in read_events(supervisor.record_paths[config.streams[0].id]) if e["kind"] == "detections"]
    first_wall = detections[0]["wall"]
    after_first = [e for e in detections if e["wall"] > first_wall + 0.05]
    span = detections[-1]["wall"] - first_wall
    # How much of that window the worker spent inside the detector: the rest is the pipeline's own overhead.
    busy = sum(e["inference_ms"] for e in after_first) / 1000 / span
    # The supervisor's share includes this benchmark's subscriber thread: an upper bound.
    others = (sum(v for k, v in cpu_seconds.items() if k not in ("worker", "supervisor"))
              + cpu_seconds.get("supervisor", 0.0) - supervisor_cpu_at_start) / wall
    return len(after_first) / span, len(walls), busy, others


# -- 2. decode ------------------------------------------------------------------------------------------------


def _decoder_process(path: str, spec: dict, stats_spec: dict, endpoint: str, stop, parent_pid: int) -> None:
    from streamer.config import LiveConfig, StreamConfig
    from streamer.decoder import decoder_main

    decoder_main(stream=StreamConfig(id="bench", url=path, prompt="unused .", mode="file"), mailbox_spec=spec,
                 stats_spec=stats_spec, events_endpoint=endpoint,
                 live=LiveConfig(reconnect_initial_seconds=1, reconnect_max_seconds=1), video_directory=None,
                 stop=stop, parent_pid=parent_pid)


def bench_decode_ours(path: Path) -> tuple[float, int]:
    from streamer.frames import FrameMailbox
    from streamer.stats import StreamStats

    context = multiprocessing.get_context("spawn")
    mailbox = FrameMailbox.create("bench-decode", 6, 1920, 1080, context.Lock())
    stats = StreamStats.create(["bench"])
    stop = context.Event()
    runtime = tempfile.mkdtemp()
    process = context.Process(target=_decoder_process, args=(str(path), mailbox.spec(), stats.spec(),
                                                             f"ipc://{runtime}/events", stop, os.getpid()))
    process.start()
    first = last = None
    count = 0
    while not (mailbox.finished and not mailbox.pending()):
        frames = mailbox.take(live=False, limit=6)
        for frame in frames:
            first = frame.decoded_at if first is None else first
            last = frame.decoded_at
            count += 1
            mailbox.release(frame)
        if not frames:
            time.sleep(0.0005)
    process.join()
    mailbox.close(), mailbox.unlink(), stats.close(), stats.unlink()
    shutil.rmtree(runtime, ignore_errors=True)
    return (count - 1) / (last - first), count


def bench_decode_ffmpeg(path: Path, frames: int) -> float:
    """ffmpeg's rate with its start-up (process, probing, first frame) taken out, as ours is measured from
    the first decoded frame to the last."""
    command = ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-pix_fmt", "rgb24", "-f", "null", "-"]
    started = time.perf_counter()
    subprocess.run(command[:-3] + ["-frames:v", "1"] + command[-3:], check=True)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return (frames - 1) / (time.perf_counter() - started - startup)


def make_long_video(directory: Path, loops: int) -> Path:
    """The bundled video looped without re-encoding (same bytes, so the same decode work per frame)."""
    out = directory / "demo-long.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-stream_loop", str(loops - 1), "-i", str(DEMO_VIDEO),
                    "-c", "copy", str(out)], check=True)
    return out


# -- 3. events ------------------------------------------------------------------------------------------------


def _produce_events(endpoint: str, count: int) -> None:
    import zmq

    from streamer.events import make_event
    from streamer.process import EventSender

    sender = EventSender(endpoint, high_water_mark=count + 10)
    sender.socket.setsockopt(zmq.SNDBUF, 64 << 20)
    detections = [{"box": [10.5, 20.25, 60.0, 90.75], "score": 0.87, "phrase": "green star", "track_id": 3}]
    for index in range(count):
        sender.send(make_event("cam", "detections", ts=index / 10, frame=index, pts=index / 10, width=320,
                               height=240, prompt="green star .", detections=detections, inference_ms=12.5,
                               latency_ms=20.1))
    sender.close()


def _consume_events(endpoint: str, count: int, result, ready) -> None:
    from streamer.client import subscribe

    received = 0
    for event in subscribe(endpoint, timeout=30, high_water_mark=count + 10):
        if event["stream"] == "probe":
            ready.set()
            continue
        received += 1
        if received == count:
            break
    result.value = received


def bench_events(count: int) -> tuple[float, int]:
    from streamer.hub import Hub
    from streamer.recording import Recorder

    context = multiprocessing.get_context("spawn")
    runtime = Path(tempfile.mkdtemp())
    pull, pub = f"ipc://{runtime}/pull", f"tcp://127.0.0.1:{free_port()}"
    recorder = Recorder(runtime / "rec", ["cam"], 0.5, stamp="bench")
    hub = Hub(pull_endpoint=pull, pub_endpoint=pub, high_water_mark=count + 10, heartbeat_seconds=3600, stats=None,
              recorder=recorder, pull_high_water_mark=count + 10)
    received, ready = context.Value("q", 0), context.Event()
    consumer = context.Process(target=_consume_events, args=(pub, count, received, ready))
    consumer.start()
    while not ready.wait(0.05):  # publish probes until the subscriber is connected and subscribed
        hub.publish({"stream": "probe", "kind": "status", "ts": 0.0})
    # The producer queues every event first (its own JSON encoding is the worker's cost, not the hub's);
    # then the hub is timed publishing them all while the subscriber process reads them.
    producer = context.Process(target=_produce_events, args=(pull, count))
    producer.start()
    producer.join()
    time.sleep(0.5)
    published = 0
    started = time.perf_counter()
    while published < count:
        if hub.pull.poll(10_000) == 0:
            break
        published += hub.drain()
        hub.tick()
    elapsed = time.perf_counter() - started
    consumer.join(120)
    hub.close()
    shutil.rmtree(runtime, ignore_errors=True)
    return published / elapsed, received.value


# -- 4. frame transport ---------------------------------------------------------------------------------------


def _shm_producer(spec: dict, shape, count: int) -> None:
    from streamer.frames import FrameMailbox

    mailbox = FrameMailbox.attach(spec)
    image = np.random.default_rng(0).integers(0, 255, shape, np.uint8)

    class Never:
        def is_set(self):
            return False

    for index in range(count):
        mailbox.put(image, frame_index=index, pts=0, ts=0, live=False, stop=Never(), poll_seconds=0.0002)
    mailbox.finish(1)


def _zmq_producer(endpoint: str, shape, count: int) -> None:
    import zmq

    socket_ = zmq.Context.instance().socket(zmq.PUSH)
    socket_.setsockopt(zmq.SNDHWM, 4)
    socket_.connect(endpoint)
    image = np.random.default_rng(0).integers(0, 255, shape, np.uint8)
    tracker = None
    for index in range(count):
        tracker = socket_.send_multipart([index.to_bytes(8, "little"), image], copy=False, track=True)
    tracker.wait(30)  # zero-copy: the array must outlive the send
    socket_.close(linger=5000)


def bench_transport(shape, count: int) -> tuple[float, float]:
    import zmq

    from streamer.frames import FrameMailbox

    context = multiprocessing.get_context("spawn")
    mailbox = FrameMailbox.create(f"bench-{shape[1]}", 6, shape[1], shape[0], context.Lock())
    process = context.Process(target=_shm_producer, args=(mailbox.spec(), shape, count))
    process.start()
    seen = 0
    started = None
    checksum = 0
    while not (mailbox.finished and not mailbox.pending()):
        frames = mailbox.take(live=False, limit=6)
        for frame in frames:
            started = started or time.perf_counter()
            checksum += int(frame.pixels[::64, ::64, 0].sum())  # the consumer reads the pixels in place
            mailbox.release(frame)
            seen += 1
        if not frames:
            time.sleep(0.0002)
    shm_rate = (seen - 1) / (time.perf_counter() - started)
    process.join()
    mailbox.close(), mailbox.unlink()

    runtime = tempfile.mkdtemp()
    endpoint = f"ipc://{runtime}/frames"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    pull.bind(endpoint)
    process = context.Process(target=_zmq_producer, args=(endpoint, shape, count))
    process.start()
    started = None
    for index in range(count):
        _, payload = pull.recv_multipart(copy=False)
        started = started or time.perf_counter()
        pixels = np.frombuffer(payload.buffer, np.uint8).reshape(shape)
        checksum += int(pixels[::64, ::64, 0].sum())
    zmq_rate = (count - 1) / (time.perf_counter() - started)
    process.join()
    pull.close(linger=0)
    shutil.rmtree(runtime, ignore_errors=True)
    return shm_rate, zmq_rate


# -- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    import tomllib

    from streamer.config import parse_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="default", help="'default', 'tiny' (random) or a checkpoint path")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the (slow on a CPU) end-to-end part")
    parser.add_argument("--events", type=int, default=200_000, help="events for the publish benchmark")
    parser.add_argument("--loops", type=int, default=40, help="bundled video repeated this often for decoding")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    print(f"# pipeline benchmark: {platform.node()}, {os.cpu_count()} CPUs, commit {commit}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")

    work = Path(tempfile.mkdtemp(prefix="groundwatch-bench-"))
    try:
        if not args.skip_e2e:
            data = tomllib.loads(DEMO_CONFIG.read_text())
            data["model"]["weights"] = args.weights
            data["publish"].update(endpoint=f"tcp://127.0.0.1:{free_port()}",
                                   control_endpoint=f"tcp://127.0.0.1:{free_port()}")
            data["record"]["directory"] = str(work / "recordings")
            config = parse_config(data, base_dir=DEMO_CONFIG.parent)
            frames = decode_all(DEMO_VIDEO)
            # Inference alone before and after the daemon: on a shared machine the load drifts, and the mean
            # of the two brackets the daemon's run.
            alone_before = bench_inference_alone(config)
            daemon, seen, busy, others = bench_daemon(config)
            alone_after = bench_inference_alone(config)
            alone = (alone_before + alone_after) / 2
            print(f"end-to-end ({args.weights} model, {len(frames)} frames {frames[0].shape[1]}x{frames[0].shape[0]}, "
                  f"batch {config.model.batch_size}, short side {config.model.short_side}): "
                  f"daemon {daemon:.2f} frames/s ({seen} frames) vs inference alone {alone:.2f} frames/s "
                  f"(before {alone_before:.2f}, after {alone_after:.2f}) -> {daemon / alone:.1%} (target >= 90%); "
                  f"the worker spent {busy:.1%} of the steady window inside the detector, and every other process together "
                  f"(decoder, hub, supervisor) used {others:.1%} of one core")

        long_video = make_long_video(work, args.loops)
        ours, ffmpeg = [], []
        for _ in range(3):
            rate, count = bench_decode_ours(long_video)
            ours.append(rate)
            ffmpeg.append(bench_decode_ffmpeg(long_video, count))
        print(f"decode ({count} frames 320x240 H.264, best of 3): ours {max(ours):.0f} frames/s vs ffmpeg CLI "
              f"{max(ffmpeg):.0f} frames/s -> {max(ours) / max(ffmpeg):.2f}x (target >= 0.9x)")

        rate, received = bench_events(args.events)
        print(f"events: {rate:,.0f} events/s through the hub (producer process -> hub -> PUB + recording), "
              f"{received:,}/{args.events:,} received by a subscriber (target >= 50,000/s)")

        for shape in ((480, 640, 3), (1080, 1920, 3)):
            shm, zmq_rate = bench_transport(shape, 300 if shape[0] < 1000 else 100)
            print(f"frame transport {shape[1]}x{shape[0]}: shared-memory mailbox {shm:.0f} frames/s vs "
                  f"ZeroMQ zero-copy ipc {zmq_rate:.0f} frames/s -> {shm / zmq_rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
