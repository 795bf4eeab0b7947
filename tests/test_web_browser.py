"""The operator's console in a real browser: Debian's chromium driven by Playwright (nothing downloaded), a real
daemon (`groundwatch run`, a subprocess) with the default model at its small size, on the bundled demo video and
on the real RTSP server (GStreamer's moving-ball test pattern, which the default model finds as "white circle").

The tests assert what a person sees: pixels on the canvases, boxes where the `detections` events say, the lists
on the page, the words of a reply. One daemon serves the module (starting one costs seconds on 2 cores); the
tests run in file order.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from daemon_harness import REPO, Collector, Daemon, loopback_endpoint  # noqa: E402
from rtsp_server import RtspServer, free_port, gstreamer_available  # noqa: E402

from streamer.client import status  # noqa: E402
from streamer.demo import DEMO_VIDEO  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium not installed (scripts/setup.sh does)"),
    pytest.mark.skipif(not gstreamer_available(), reason="GStreamer RTSP server not installed (scripts/setup.sh)"),
]


def expected_color(key) -> np.ndarray:
    """The box colour the page promises for a track id (docs: golden-ratio hue, saturation 220/255, value 1)."""
    import colorsys

    hue = (key * 0.618033988749895) % 1.0
    return np.round(np.array(colorsys.hsv_to_rgb(hue, 220 / 255, 1.0)) * 255)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    server = RtspServer(width=160, height=120, fps=10)
    server.start()
    publish, control, web_port = loopback_endpoint(), loopback_endpoint(), free_port()
    runner = Daemon(root, publish=publish, control=control, config_text=f"""
[[streams]]
id = "cam"
url = "{server.url}"
prompt = "white circle ."
record_video = true
fps = 3

[[streams]]
id = "demo"
url = "{DEMO_VIDEO}"
prompt = "green star . black cross . purple square . black ring ."
fps = 1  # 6 frames: the file must end within the tests even on a loaded 2-core machine

[model]
weights = "default"
box_threshold = 0.3
batch_size = 2
short_side = 192
max_side = 256

[tracker]
high_score = 0.3
new_track_score = 0.3
low_score = 0.1

[live]
open_timeout_seconds = 3
read_timeout_seconds = 2
reconnect_initial_seconds = 0.3
reconnect_max_seconds = 1.0
segment_seconds = 2

[publish]
endpoint = "{publish}"
control_endpoint = "{control}"
heartbeat_seconds = 0.5

[record]
directory = "recordings"

[metrics]
enabled = false

[supervisor]
exit_when_done = false
restart_initial_seconds = 0.3

[web]
port = {web_port}
""")
    collector = Collector(publish)
    runner.start()
    state = {"runner": runner, "root": root, "server": server, "control": control, "collector": collector}
    try:
        runner.wait_ready(180)
        url = status(control)["web"]
        assert url == f"http://127.0.0.1:{web_port}/"
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            state.update(url=url, browser=browser)
            yield state  # a test may restart the daemon (the same `runner`, on the same config)
            browser.close()
    finally:
        runner.stop(30)
        collector.close()
        server.kill()


@pytest.fixture
def page(daemon):
    context = daemon["browser"].new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def canvas_capture(page, selector: str) -> dict:
    """What one canvas shows now, atomically: its pixels (PNG) and the frame/boxes it says it shows."""
    return page.evaluate("""(selector) => {
        const c = document.querySelector(selector);
        return {png: c.toDataURL('image/png'), frame: Number(c.dataset.frame ?? -1),
                boxes: Number(c.dataset.boxes ?? -1), width: c.width, height: c.height};
    }""", selector)


def pixels(capture: dict) -> np.ndarray:
    import cv2

    data = base64.b64decode(capture["png"].split(",", 1)[1])
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return bgr[:, :, ::-1].astype(np.int32)  # (H, W, 3) RGB


def assert_box_drawn(image: np.ndarray, detection: dict, event: dict) -> None:
    """The box's colour must be on the canvas along a vertical and a horizontal edge of the box, where the event
    puts them (the left and bottom edges, or the right and top ones when those are off the canvas)."""
    height, width = image.shape[:2]
    sx, sy = width / event["width"], height / event["height"]
    x1, y1, x2, y2 = (round(v * s) for v, s in zip(detection["box"], (sx, sy, sx, sy)))
    color = expected_color(detection["track_id"]) if detection["track_id"] is not None else None
    x_edge = x1 if x1 >= 2 else x2
    y_edge = y2 if y2 <= height - 3 else y1
    mid_y, mid_x = (max(y1, 0) + min(y2, height)) // 2, (max(x1, 0) + min(x2, width)) // 2
    vertical = image[max(0, mid_y - 1):mid_y + 2, max(0, x_edge - 2):x_edge + 2].reshape(-1, 3)
    horizontal = image[max(0, y_edge - 2):y_edge + 2, max(0, mid_x - 1):mid_x + 2].reshape(-1, 3)
    for name, patch in (("vertical", vertical), ("horizontal", horizontal)):
        assert patch.size, f"the {name} edge of {detection} is off the canvas"
        if color is not None:
            distance = np.abs(patch - color).max(axis=1).min()
            assert distance <= 12, f"no box colour {color} at the {name} edge of {detection} (closest {distance})"
        else:  # an untracked box's colour comes from its phrase; it must at least be a saturated stroke
            assert (patch.max(axis=1) - patch.min(axis=1)).max() > 100, f"no box at the {name} edge of {detection}"


def test_grid_shows_live_video_that_changes(daemon, page):
    """The first thing an operator sees: every stream, each with live pictures that keep changing."""
    page.goto(daemon["url"])
    page.wait_for_selector("article[data-card='cam'] canvas[data-frame]", timeout=60_000)
    assert page.locator("article[data-card]").count() == 2
    first = canvas_capture(page, "article[data-card='cam'] canvas")
    image = pixels(first)
    assert image.std() > 5 and image.max() > 200, "the live canvas is blank"
    deadline = time.monotonic() + 30
    while True:
        later = canvas_capture(page, "article[data-card='cam'] canvas")
        if later["frame"] > first["frame"] and np.abs(pixels(later) - image).max() > 50:
            break
        assert time.monotonic() < deadline, "the live canvas stopped changing"
        time.sleep(0.3)
    page.wait_for_function("document.querySelector(\"[data-badge='cam']\")?.dataset.state === 'online'")
    figures = page.locator("[data-figures='cam']").inner_text()
    assert "fps" in figures and "on screen" in figures and " ms" in figures  # decode-to-screen latency shown


def test_boxes_drawn_where_the_detections_events_say(daemon, page):
    """Boxes are drawn from the `detections` event of the very frame on screen, at that event's coordinates."""
    collector = daemon["collector"]
    page.goto(daemon["url"] + "#/stream/cam")
    page.wait_for_selector(".stream-page canvas[data-frame]", timeout=60_000)
    checked = 0
    deadline = time.monotonic() + 60
    while checked < 3:
        assert time.monotonic() < deadline, f"only {checked} frames with boxes checked"
        capture = canvas_capture(page, ".stream-page canvas")
        events = collector.select("cam", "detections", frame=capture["frame"])
        if not events or not events[0]["detections"] or capture["boxes"] != len(events[0]["detections"]):
            time.sleep(0.2)
            continue
        image = pixels(capture)
        for detection in events[0]["detections"]:
            assert_box_drawn(image, detection, events[0])
        checked += 1


def test_live_events_list_grows(daemon, page):
    """The events list fills from what happened before the page opened, then grows live, and filters apply."""
    from streamer.client import set_prompt

    page.goto(daemon["url"] + "#/events")
    page.wait_for_selector("tbody.events tr", timeout=60_000)  # the stream came online before we opened it
    before = page.locator("tbody.events tr").count()
    prompt = status(daemon["control"])["streams"]["demo"]["prompt"]
    assert set_prompt(daemon["control"], "demo", prompt)["ok"]  # a status event (prompt_changed) now
    page.wait_for_function(f"document.querySelectorAll('tbody.events tr').length > {before}", timeout=30_000)
    assert "prompt changed" in page.locator("tbody.events tr").first.inner_text()
    page.select_option("select[name=kind]", "heartbeat")
    shown = page.locator("tbody.events tr").count()
    page.wait_for_function(f"document.querySelectorAll('tbody.events tr').length > {shown}", timeout=30_000)
    page.select_option("select[name=stream]", "demo")
    page.fill("input[name=phrase]", "no such phrase")
    assert page.locator("tbody.events tr").count() == 0  # filters apply


def test_prompt_change_from_the_page(daemon, page):
    """The prompt box changes what later `detections` events are run with, and shows the reply in words."""
    collector = daemon["collector"]
    page.goto(daemon["url"] + "#/stream/cam")
    box = page.locator("form.prompt input[name=prompt]")
    box.fill("")
    page.click("form.prompt button")
    page.wait_for_function("document.querySelector('.reply').textContent.includes('empty')")
    assert "error" in page.locator(".reply").get_attribute("class")
    box.fill("a ball . " * 1250)  # 10,000 characters
    page.click("form.prompt button")
    page.wait_for_function("document.querySelector('.reply').textContent.includes('at most')")
    box.fill("a ball .")
    page.click("form.prompt button")
    page.wait_for_function("document.querySelector('.reply').textContent.includes('encoded in')", timeout=60_000)
    assert "a ball ." in page.locator(".reply").inner_text()
    changed = collector.wait_for(30, "cam", "status", reason="prompt_changed", prompt="a ball .")[-1]
    later = collector.wait_for(30, "cam", "detections", predicate=lambda e: e["wall"] > changed["wall"])[-1]
    assert later["prompt"] == "a ball ."
    assert all(e["prompt"] == "a ball ." for e in collector.select("cam", "detections")
               if e["wall"] > changed["wall"])
    page.wait_for_function("document.querySelector(\"[data-prompt='cam']\").textContent === 'a ball .'")
    timeline = page.locator(".timeline").inner_text()
    assert "prompt changed" in timeline


def test_bad_input_gets_clear_errors_and_the_daemon_is_unaffected(daemon):
    url = daemon["url"].rstrip("/")
    before = status(daemon["control"])
    with httpx.Client(base_url=url, timeout=30) as client:
        reply = client.get("/no/such/page")
        assert reply.status_code == 404 and reply.json()["error"] == "no route GET /no/such/page"
        reply = client.post("/api/streams/cam/prompt", content=b"{not json", headers={"content-type": "application/json"})
        assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]
        reply = client.post("/api/streams/cam/prompt", content=b"prompt=x",
                            headers={"content-type": "application/x-www-form-urlencoded"})
        assert reply.status_code == 415
        reply = client.post("/api/streams/cam/prompt", json={"prompt": 42})
        assert reply.status_code == 422 and "string" in reply.json()["error"]
        reply = client.post("/api/streams/cam/prompt", json={"prompt": "x" * 10_000})
        assert reply.status_code == 422 and "10000 characters" in reply.json()["error"]
        reply = client.post("/api/streams/cam/prompt", content=b"x" * 1_000_000,
                            headers={"content-type": "application/json"})
        assert reply.status_code == 413
        reply = client.post("/api/streams/nope/prompt", json={"prompt": "a cat ."})
        assert reply.status_code == 404 and "no stream 'nope'" in reply.json()["error"]
        assert client.get("/api/live", params={"previews": "nope"}).status_code == 404
        assert client.get("/api/recordings/nope/x/events").status_code == 404
        assert client.get("/api/recordings/cam/..%2F..%2Fetc/video").status_code == 404
        assert client.get("/api/recordings/demo/20990101T000000Z-1/events").status_code == 404
        assert client.get("/api/events", params={"limit": "many"}).status_code == 422
        assert client.get("/api/streams", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
        assert client.get("/api/streams").status_code == 200
    after = status(daemon["control"])
    assert after["processes"]["web"]["pid"] == before["processes"]["web"]["pid"]
    assert all(p["restarts"] == before["processes"][name]["restarts"] for name, p in after["processes"].items())
    assert after["streams"]["cam"]["prompt"] == before["streams"]["cam"]["prompt"]


def test_offline_stream_says_so(daemon, page):
    """A finished file and a camera that went away: the grid says which state each is in, and why."""
    daemon["collector"].wait_for(300, "demo", "status", state="offline", reason="end_of_file")
    page.goto(daemon["url"])
    page.wait_for_function("document.querySelector(\"[data-badge='demo']\")?.dataset.state === 'offline'")
    assert "end_of_file" in page.locator("[data-reason='demo']").inner_text()
    server = daemon["server"]
    server.kill()
    try:
        page.wait_for_function("document.querySelector(\"[data-badge='cam']\")?.dataset.state === 'reconnecting'",
                               timeout=30_000)
        assert "attempt" in page.locator("[data-reason='cam']").inner_text()
    finally:
        server.start()
    page.wait_for_function("document.querySelector(\"[data-badge='cam']\")?.dataset.state === 'online'",
                           timeout=60_000)


def test_recording_replays_with_its_overlays(daemon, page):
    """The demo file's run replays in the browser with its recorded boxes drawn over it, also after seeking."""
    page.goto(daemon["url"] + "#/recordings")
    page.wait_for_selector("table[data-recordings='demo'] a", timeout=30_000)
    page.wait_for_selector("table[data-recordings='cam'] a", timeout=30_000)  # the camera's segments too
    page.click("table[data-recordings='demo'] a")
    page.wait_for_selector("video[data-replay]")
    page.wait_for_function("document.querySelector('video').readyState >= 2", timeout=30_000)
    log = next((daemon["root"] / "recordings" / "demo").glob("events-*.jsonl"))
    recorded = {e["frame"]: e for e in map(json.loads, log.read_text().splitlines()) if e["kind"] == "detections"}
    with_boxes = [e for e in recorded.values() if e["detections"]]
    assert with_boxes, "the default model found nothing in the demo video"
    for target in (with_boxes[-1], with_boxes[0]):  # seek forwards, then back
        page.evaluate("(t) => { const v = document.querySelector('video'); v.pause(); v.currentTime = t; }",
                      target["pts"] + 0.01)
        page.wait_for_function(f"document.querySelector('canvas[data-replay-overlay]')?.dataset.frame == "
                               f"{target['frame']}", timeout=15_000)
        capture = canvas_capture(page, "canvas[data-replay-overlay]")
        assert capture["boxes"] == len(target["detections"])
        image = pixels(capture)
        for detection in target["detections"]:
            assert_box_drawn(image, detection, target)
    # It plays: the overlay follows the video on its own.
    page.evaluate("(() => { const v = document.querySelector('video'); v.currentTime = 0; v.play(); })()")
    page.wait_for_function(f"document.querySelector('canvas[data-replay-overlay]')?.dataset.frame > {min(recorded)}",
                           timeout=15_000)


def test_screenshot_for_the_readme(daemon, page):
    """docs/console.png, which the README shows, is what this test sees."""
    page.goto(daemon["url"])
    page.wait_for_function("[...document.querySelectorAll('canvas[data-boxes]')].some(c => Number(c.dataset.boxes) > 0)",
                           timeout=60_000)
    time.sleep(1.0)
    target = REPO / "docs" / "console.png"
    page.screenshot(path=str(target))
    assert target.stat().st_size > 10_000


def test_web_process_crash_is_restarted_and_the_page_reconnects(daemon, page):
    """The web process dies: the supervisor restarts it on the same address, the daemon never stops, and the
    open page reconnects by itself and shows live video again."""
    page.goto(daemon["url"])
    page.wait_for_selector("article[data-card='cam'] canvas[data-frame]", timeout=60_000)
    before = status(daemon["control"])
    os.kill(before["processes"]["web"]["pid"], signal.SIGKILL)
    page.wait_for_function("document.getElementById('connection')?.dataset.state !== 'live'", timeout=15_000)
    page.wait_for_function("document.getElementById('connection')?.dataset.state === 'live'", timeout=60_000)
    frame = canvas_capture(page, "article[data-card='cam'] canvas")["frame"]
    page.wait_for_function(f"Number(document.querySelector(\"article[data-card='cam'] canvas\")?.dataset.frame) > {frame}",
                           timeout=30_000)
    after = status(daemon["control"])
    assert after["processes"]["web"]["restarts"] == before["processes"]["web"]["restarts"] + 1
    assert after["pid"] == before["pid"] and daemon["runner"].process.poll() is None
    assert after["processes"]["worker"]["restarts"] == before["processes"]["worker"]["restarts"]


def test_the_page_reconnects_after_a_daemon_restart(daemon, page):
    """The daemon stops and starts again (an upgrade, a reboot): the open page says it lost the daemon, then
    comes back by itself, with live pictures, without a reload."""
    page.goto(daemon["url"])
    page.wait_for_selector("article[data-card='cam'] canvas[data-frame]", timeout=60_000)
    page.evaluate("window.__same_page = true")
    runner = daemon["runner"]
    assert runner.stop(60) == 0
    page.wait_for_function("document.getElementById('connection').dataset.state !== 'live'", timeout=15_000)
    runner.start("daemon-restarted.log")
    runner.wait_ready(180)
    page.wait_for_function("document.getElementById('connection').dataset.state === 'live'", timeout=60_000)
    frame = canvas_capture(page, "article[data-card='cam'] canvas")["frame"]
    # Frame indices start again at 0 in the new run: any newly drawn frame differs from the last one.
    page.wait_for_function(f"Number(document.querySelector(\"article[data-card='cam'] canvas\")?.dataset.frame)"
                           f" !== {frame}", timeout=60_000)
    assert page.evaluate("window.__same_page") is True  # it reconnected; nobody reloaded it
