"""Web console benchmark: what the console costs the pipeline, and how fresh its pictures are.

1. Pipeline frames/s of `groundwatch run` on a file (the bundled video, looped to `--frames`), three ways in one
   run, interleaved `--repeats` times: the web console off (no previews encoded), on with no viewer, and on with
   20 concurrent viewers (headless clients, in their own process, each reading `/api/live` with the stream's
   previews, as the page does). Target: both "on" figures >= 95% of "off".
   Frames/s is measured from the daemon's own `detections` events (first to last), so model loading is excluded.
2. Decode-to-screen latency of the previews in a real browser (Debian's chromium, the console's grid page) on a
   live RTSP source (tests/rtsp_server.py): now - the frame's `decoded_at`, taken when the picture is drawn,
   p50 and p95; and the same at the 20 headless viewers (decode-to-receipt).
3. Load-independent costs: the worker's time to encode one preview (downscale + JPEG, once per preview whatever
   the number of viewers), and the CPU the web process used while serving the 20 viewers.

    python benchmarks/web.py [--frames 120] [--repeats 2] [--weights default] [--skip-latency]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
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

from rtsp_server import RtspServer, gstreamer_available  # noqa: E402

import _daemon  # noqa: E402
from streamer.client import status  # noqa: E402
from streamer.demo import DEMO_VIDEO  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "green star . black cross . purple square . black ring ."


def looped_video(directory: Path, frames: int) -> Path:
    import av

    from streamer.media import write_video

    with av.open(str(DEMO_VIDEO)) as container:
        source = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    looped = np.stack([source[i % len(source)] for i in range(frames)])
    return write_video(directory / f"bench-{frames}.mp4", looped, fps=10, options={"crf": "28"})


def write_config(directory: Path, url: str, *, web: bool, weights: str, live: bool = False) -> tuple[Path, str, str]:
    """The config file, its event and its control endpoints."""
    publish, control = _daemon.loopback_endpoint(), _daemon.loopback_endpoint()
    config = directory / f"config-{time.monotonic_ns()}.toml"
    stream = {"id": "bench", "url": url, "prompt": PROMPT if not live else "white circle ."}
    config.write_text(_daemon.config_text(
        [stream], model={**_daemon.DEFAULT_MODEL, "weights": weights, "batch_size": 1 if live else 4},
        tracker=_daemon.DEFAULT_TRACKER, endpoint=publish, control_endpoint=control,
        record_directory=directory / "recordings", web=web, exit_when_done=not live))
    return config, publish, control


def _viewers(url: str, count: int, seconds: float, result) -> None:
    """`count` concurrent SSE clients reading the previews, as many pages would; reports what they received."""
    import httpx

    async def one(client: httpx.AsyncClient, stats: dict) -> None:
        try:
            async with client.stream("GET", url + "api/live?previews=bench") as reply:
                event = None
                async for line in reply.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        if event == "preview":
                            stats["previews"] += 1
                            # The header comes before the JPEG: read decoded_at without parsing the base64.
                            decoded_at = float(line.split('"decoded_at":', 1)[1].split(",", 1)[0])
                            stats["latency_ms"].append((time.time() - decoded_at) * 1000)
                        else:
                            stats["events"] += 1
                        event = None
        except (httpx.HTTPError, asyncio.CancelledError):
            pass

    async def main() -> list[dict]:
        stats = [{"previews": 0, "events": 0, "latency_ms": []} for _ in range(count)]
        limits = httpx.Limits(max_connections=count + 5)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
            tasks = [asyncio.create_task(one(client, s)) for s in stats]
            await asyncio.sleep(seconds)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return stats

    result.put(asyncio.run(main()))


def wait_for_web(control: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = status(control, timeout=2)
            if reply.get("web"):
                return reply["web"]
        except TimeoutError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the daemon did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def encode_cost() -> dict:
    """ms per preview in the worker: 320x240 (the bundled video) and 1920x1080 (a camera) to short side 360."""
    from streamer.web.preview import encode_jpeg

    rng = np.random.default_rng(0)
    costs = {}
    for height, width in ((240, 320), (1080, 1920)):
        frame = (rng.random((height, width, 3)) * 40 + np.linspace(0, 200, width)[None, :, None]).astype(np.uint8)
        encode_jpeg(frame, 360, 75)
        started = time.perf_counter()
        for _ in range(50):
            encode_jpeg(frame, 360, 75)
        costs[f"{width}x{height}"] = (time.perf_counter() - started) / 50 * 1000
    return costs


def run_pipeline(directory: Path, video: Path, *, web: bool, viewers: int, weights: str) -> dict:
    config, publish, control = write_config(directory, str(video), web=web, weights=weights)
    listener = _daemon.DetectionStamps(publish, "bench", stamp=lambda event: event["wall"], timeout=600)
    process = _daemon.start(config)
    viewer_process, results, web_pid, web_cpu = None, None, None, None
    try:
        if web:
            url = wait_for_web(control)
            web_pid = status(control)["processes"]["web"]["pid"]
        if viewers:
            results = multiprocessing.get_context("spawn").Queue()
            viewer_process = multiprocessing.get_context("spawn").Process(
                target=_viewers, args=(url, viewers, 10_000.0, results), daemon=True)
            viewer_process.start()
        listener.wait(1800)
        if web_pid is not None:
            web_cpu = cpu_seconds(web_pid)
        process.wait(60)
    finally:
        _daemon.stop(process, 30)
        if viewer_process is not None:
            viewer_process.kill()
            viewer_process.join()
    return {"fps": _daemon.steady_rate(listener.stamps), "frames": len(listener.stamps), "web_cpu": web_cpu}


def run_latency(directory: Path, weights: str, seconds: float, viewers: int) -> dict:
    from playwright.sync_api import sync_playwright

    server = RtspServer(width=320, height=240, fps=10)
    server.start()
    config, _, control = write_config(directory, server.url, web=True, weights=weights, live=True)
    process = _daemon.start(config)
    try:
        url = wait_for_web(control)
        from streamer.client import wait_ready

        wait_ready(control, timeout=300)
        results = multiprocessing.get_context("spawn").Queue()
        viewer_process = multiprocessing.get_context("spawn").Process(
            target=_viewers, args=(url, viewers, seconds + 5, results), daemon=True)
        viewer_process.start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.wait_for_selector("canvas[data-frame]", timeout=120_000)
            page.evaluate("window.groundwatch.state.latency.clear()")
            samples: list[float] = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:  # the page keeps the last 100; read them before they roll over
                time.sleep(5)
                samples.extend(page.evaluate(
                    "(() => { const s = window.groundwatch.state.latency.get('bench') || []; "
                    "const copy = [...s]; s.length = 0; return copy; })()"))
            browser.close()
        viewer_stats = results.get(timeout=60)
        viewer_process.join(10)
    finally:
        _daemon.stop(process, 30)
        server.kill()
    headless = [ms for s in viewer_stats for ms in s["latency_ms"]]
    return {"browser": samples, "headless": headless, "viewer_previews": [s["previews"] for s in viewer_stats]}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def machine() -> str:
    return f"{os.cpu_count()} CPUs, {_daemon.cpu_model() or platform.processor()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--weights", default="default")
    parser.add_argument("--latency-seconds", type=float, default=30)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at start")
    for size, ms in encode_cost().items():
        print(f"preview encoding in the worker, {size} -> short side 360: {ms:.2f} ms per preview "
              f"({ms * 5 / 10:.2f}% of one core at 5 previews/s per stream)")
    with tempfile.TemporaryDirectory(prefix="gw-web-bench-") as tmp:
        directory = Path(tmp)
        video = looped_video(directory, args.frames)
        modes = [("web off", False, 0), ("web on, no viewer", True, 0), (f"web on, {args.viewers} viewers", True,
                                                                         args.viewers)]
        figures: dict[str, list[float]] = {name: [] for name, _, _ in modes}
        for repeat in range(args.repeats):
            for name, web, viewers in modes:
                result = run_pipeline(directory, video, web=web, viewers=viewers, weights=args.weights)
                figures[name].append(result["fps"])
                cpu = f", web process {result['web_cpu']:.1f} CPU s" if result["web_cpu"] is not None else ""
                print(f"  run {repeat + 1} {name:>22}: {result['fps']:.2f} frames/s ({result['frames']} frames{cpu})",
                      flush=True)
        base = statistics.median(figures["web off"])
        print(f"\npipeline, {args.frames} frames, median of {args.repeats}:")
        for name, _, _ in modes:
            value = statistics.median(figures[name])
            print(f"  {name:>22}: {value:.2f} frames/s  ({value / base:.1%} of web off)")
        if not args.skip_latency and gstreamer_available() and Path("/usr/bin/chromium").exists():
            latency = run_latency(directory, args.weights, args.latency_seconds, args.viewers)
            print(f"\ndecode-to-screen latency (live RTSP 320x240 10 fps, {len(latency['browser'])} pictures in "
                  f"chromium): p50 {percentile(latency['browser'], 50):.0f} ms, "
                  f"p95 {percentile(latency['browser'], 95):.0f} ms")
            print(f"decode-to-receipt at {args.viewers} headless viewers ({len(latency['headless'])} previews, "
                  f"{min(latency['viewer_previews'])}-{max(latency['viewer_previews'])} per viewer): "
                  f"p50 {percentile(latency['headless'], 50):.0f} ms, p95 {percentile(latency['headless'], 95):.0f} ms")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
