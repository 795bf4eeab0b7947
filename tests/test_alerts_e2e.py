"""End-to-end alerting: the real daemon (`groundwatch run`), the bundled default model, a shapes-world video with
known trajectories (tests/alerts_scene.py), real ZeroMQ, real files on disk.

Counts are compared exactly with what the scene was built to do: entries, exits and loitering in a zone, line
crossings (two objects at once, one coming back, one jittering on the line), an object jittering on a zone's
edge, rules firing once per presence with a cooldown, a rule added at run time taking effect on the next frame,
snapshots showing the object, clips cut from the file, and bad run-time input refused with the daemon unhurt.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import alerts_scene as scene  # noqa: E402
from daemon_harness import Collector, Daemon, loopback_endpoint  # noqa: E402

import gdino  # noqa: E402
from streamer.client import request, set_rules, set_zones, status  # noqa: E402
from streamer.media import write_video  # noqa: E402
from streamer.recording import read_events  # noqa: E402

DEFAULT = Path(gdino.__file__).parent / "assets" / "default" / "model.safetensors"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEFAULT.is_file(), reason="default weights not shipped")]

RULES_TOML = """
[[rules]]
name = "circle_on_pad"
phrase = "red circle"
stream = "yard"
zone = "pad"
min_seconds = 0.5

[[rules]]
name = "square_gate"
phrase = "blue square"
line = "gate"
cooldown_seconds = 30

[[rules]]
name = "triangle_in"
phrase = "green triangle"
line = "gate"
direction = "in"

[[rules]]
name = "star_forever"
phrase = "yellow star"
min_seconds = 100
"""
RULES = [
    {"name": "circle_on_pad", "phrase": "red circle", "stream": "yard", "zone": "pad", "min_seconds": 0.5},
    {"name": "square_gate", "phrase": "blue square", "line": "gate", "cooldown_seconds": 30},
    {"name": "triangle_in", "phrase": "green triangle", "line": "gate", "direction": "in"},
    {"name": "star_forever", "phrase": "yellow star", "min_seconds": 100},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("alerts")
    frames, truth = scene.render()
    write_video(root / "yard.mp4", frames, fps=scene.FPS, gop=10)
    write_video(root / "short.mp4", frames[:6], fps=scene.FPS)
    publish, control = loopback_endpoint(), loopback_endpoint()
    daemon = Daemon(root, publish=publish, control=control, config_text=f"""
[[streams]]
id = "yard"
url = "yard.mp4"
prompt = "{scene.PROMPT}"
{scene.ZONES_TOML}

[[streams]]
id = "short"
url = "short.mp4"
prompt = "red circle ."

[[streams.zones]]
name = "far_away"
coordinates = "pixels"
polygon = [[1000, 1000], [1100, 1000], [1100, 1100]]

[model]
weights = "default"
short_side = 192
max_side = 256
box_threshold = 0.3
batch_size = 2
threads = 2

[tracker]
min_hits = 2
max_age = 5

[publish]
endpoint = "{publish}"
control_endpoint = "{control}"
heartbeat_seconds = 0.3

[record]
directory = "recordings"

[clips]
pre_capture = 1
post_capture = 1

[metrics]
enabled = false

[web]
enabled = false

[supervisor]
exit_when_done = false
{RULES_TOML}
""")
    collector = Collector(publish)
    daemon.start()
    try:
        daemon.wait_ready(300)  # a daemon that exits at start-up (a bad config) fails here at once, with its log
        # A rule added while the video plays (every other rule unchanged, so they keep their state).
        collector.wait_for(900, stream="yard", kind="detections", frame=20)
        reply = set_rules(control, RULES + [{"name": "cross_anywhere", "phrase": "purple cross", "stream": "yard"}])
        assert reply["ok"], reply
        collector.wait_for(900, stream="yard", kind="status", reason="end_of_file")
        collector.wait_for(60, stream="short", kind="status", reason="end_of_file")
        time.sleep(1.0)  # the hub's flush period
        [log_path] = (root / "recordings" / "yard").glob("events-*.jsonl")
        yield {"root": root, "control": control, "collector": collector, "events": list(read_events(log_path)),
               "truth": truth, "process": daemon.process, "set_rules_reply": reply}
    finally:
        daemon.stop(30)
        collector.close()


def of(events, kind, **fields):
    return [e for e in events if e["kind"] == kind and all(e.get(k) == v for k, v in fields.items())]


def test_every_object_is_one_track(run):
    """The scene's five objects are five tracks for the whole video (else the counts below mean nothing)."""
    started = of(run["events"], "track", event="started")
    assert sorted(e["phrase"] for e in started) == sorted(scene.OBJECTS)
    ended = of(run["events"], "track", event="ended")
    assert {e["reason"] for e in ended} == {"end_of_stream"}
    ids = {e["id"] for e in started}
    assert len(ids) == 5 and all(i.startswith("yard-") for i in ids)


def test_zone_entries_exits_and_loitering_are_exact(run):
    events = run["events"]
    entered = of(events, "zone", zone="pad", event="entered")
    assert [e["phrase"] for e in entered] == ["red circle", "red circle"]  # and never the edge-jittering cross
    left = of(events, "zone", zone="pad", event="left")
    assert [e.get("reason") for e in left] == [None, "track_ended"]  # walked out once; in it at the end
    loitering = of(events, "zone", zone="pad", event="loitering")
    assert [e["phrase"] for e in loitering] == ["red circle", "red circle"]  # once per presence
    # Built into the scene (alerts_scene.py): first inside on frames 6 and 49, inertia 3 -> entered 8 and 51.
    assert [e["frame"] for e in entered] == [8, 51]
    assert [e["frame"] for e in left][0] == 36
    assert [e["frame"] for e in loitering] == [18, 61]
    circle = [e for e in of(events, "track", phrase="red circle") if e["frame"] == 20][0]
    assert circle["current_zones"] == ["pad"] and circle["entered_zones"] == ["pad"]
    outside = [e for e in of(events, "track", phrase="red circle") if e["frame"] == 40][0]
    assert outside["current_zones"] == [] and outside["entered_zones"] == ["pad"]


def test_line_crossings_are_exact(run):
    crossings = of(run["events"], "line", line="gate")
    got = sorted((e["phrase"], e["direction"], e["frame"]) for e in crossings)
    assert got == [("blue square", "in", 10), ("blue square", "out", 39), ("green triangle", "in", 10)]
    assert crossings[-1]["counts"] == scene.EXPECTED["gate"]


def test_rules_fire_once_per_presence_with_their_cooldown(run):
    fired = of(run["events"], "alert", event="fired")
    by_rule = {}
    for alert in fired:
        by_rule.setdefault(alert["rule"], []).append(alert["frame"])
    # circle: 0.5 s after each entry (frames 8 and 51); square: in at 10, out at 39 inside the 30 s cooldown;
    # triangle: in only; star: never (100 s); cross: added at run time (see the next test)
    assert by_rule["circle_on_pad"] == [13, 56]
    assert by_rule["square_gate"] == [10]
    assert by_rule["triangle_in"] == [10]
    assert "star_forever" not in by_rule
    assert all(a["zone"] == "pad" for a in fired if a["rule"] == "circle_on_pad")


def test_a_rule_added_at_run_time_fires_on_the_next_frame(run):
    events = run["events"]
    [changed] = of(events, "status", reason="rules_changed")
    position = events.index(changed)
    next_frame = [e for e in events[position:] if e["kind"] == "detections"][0]["frame"]
    cross = of(events, "alert", rule="cross_anywhere", event="fired")
    assert [a["frame"] for a in cross] == [next_frame]
    assert run["set_rules_reply"]["warnings"] == []


def test_snapshots_decode_and_show_the_object(run):
    alert = of(run["events"], "alert", rule="circle_on_pad", event="fired")[0]
    assert alert["has_snapshot"] and Path(alert["snapshot"]).is_file()
    full = cv2.imread(alert["snapshot"])
    assert full.shape == (scene.HEIGHT, scene.WIDTH, 3)
    crop = cv2.imread(alert["snapshot"].replace(".jpg", "-crop.jpg"))
    h, w = crop.shape[:2]
    middle = crop[h // 2 - 3:h // 2 + 3, w // 2 - 3:w // 2 + 3].reshape(-1, 3).mean(0)[::-1]  # RGB
    assert np.abs(middle - np.array(scene.COLOURS["red"])).max() < 30, middle
    ended = of(run["events"], "track", event="ended")
    for event in ended:  # every track has its best picture, with the object's colour in the crop's middle
        assert event["has_snapshot"], event
        crop = cv2.imread(event["snapshot"].replace(".jpg", "-crop.jpg"))
        h, w = crop.shape[:2]
        colour = scene.COLOURS[event["phrase"].split()[0]]
        middle = crop[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2].reshape(-1, 3).mean(0)[::-1]
        if event["phrase"] not in ("purple cross", "yellow star"):  # thin shapes: the middle may be background
            assert np.abs(middle - np.array(colour)).max() < 40, (event["phrase"], middle)


def test_clips_decode_start_within_a_gop_and_last_as_asked(run):
    fired = of(run["events"], "alert", event="fired")
    ready = {e["alert_id"]: e for e in of(run["events"], "alert", event="clip_ready")}
    assert set(ready) == {a["alert_id"] for a in fired}
    for alert in fired:
        clip = ready[alert["alert_id"]]
        assert clip["has_clip"] and clip["clip"] == alert["clip"]
        with av.open(clip["clip"]) as container:
            times = [frame.time for frame in container.decode(video=0)]
        wanted_start, wanted_end = max(0.0, alert["ts"] - 1.0), min(alert["ts"] + 1.0, (scene.FRAMES - 1) / 10)
        assert wanted_start - 1.0 < clip["clip_start"] <= wanted_start + 1e-6  # GOP of 10 frames = 1 s
        assert clip["clip_end"] == pytest.approx(wanted_end, abs=0.11)
        duration = times[-1] - times[0] + 0.1
        assert duration == pytest.approx(clip["clip_end"] - clip["clip_start"] + 0.1, abs=0.11)


def test_heartbeats_carry_zone_and_line_counts(run):
    beats = run["collector"].select(stream="yard", kind="heartbeat")
    assert any(b.get("zones") == {"pad": 1} for b in beats)
    assert beats[-1]["lines"] == {"gate": scene.EXPECTED["gate"]}


def test_zone_outside_the_frame_is_an_error_event(run):
    errors = run["collector"].select(stream="short", kind="error")
    assert [e["error_type"] for e in errors] == ["zone_outside_frame"]
    assert "far_away" in errors[0]["message"] and errors[0]["fatal"] is False


def test_bad_run_time_input_is_refused_and_the_daemon_goes_on(run):
    control = run["control"]
    reply = set_zones(control, "yard", [{"name": "bow", "polygon": [[0, 0], [1, 1], [1, 0], [0, 1]]}], [])
    assert not reply["ok"] and "intersects itself" in reply["error"]
    reply = set_zones(control, "yard", [{"name": "flat", "polygon": [[0, 0], [0.5, 0], [1, 0]]}], [])
    assert not reply["ok"] and "degenerate" in reply["error"]
    reply = set_zones(control, "nowhere", [], [])
    assert not reply["ok"] and "no stream 'nowhere'" in reply["error"]
    reply = set_zones(control, "yard", [], [])  # the rules still need zone "pad" and line "gate"
    assert not reply["ok"] and "no zone 'pad'" in reply["error"]
    reply = set_rules(control, [{"name": "r", "phrase": "x", "stream": "garage"}])
    assert not reply["ok"] and "no stream 'garage'" in reply["error"]
    reply = set_rules(control, [{"name": "r", "phrase": "a unicorn", "zone": "pad", "stream": "yard"}])
    assert reply["ok"] and "'a unicorn' is not in the prompt" in reply["warnings"][0]
    reply = request(control, {"cmd": "set_rules", "rules": "not a list"})
    assert not reply["ok"] and "rules" in reply["error"]
    assert run["process"].poll() is None
    assert status(control)["processes"]["worker"]["alive"]


def test_cli_changes_zones_and_rules_and_reports_problems(run, tmp_path, capsys):
    from streamer import cli

    control = run["control"]
    zones = tmp_path / "zones.toml"
    zones.write_text('[[zones]]\nname = "left"\npolygon = [[0, 0], [0.5, 0], [0.5, 1], [0, 1]]\n')
    assert cli.main(["zones", "short", str(zones), "--control", control]) == 0
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "r"\nphrase = "red circle"\nstream = "short"\nzone = "nowhere"\n')
    assert cli.main(["rules", str(rules), "--control", control]) == 1
    assert "no zone 'nowhere' in stream 'short'" in capsys.readouterr().out
    rules.write_text('[[rules]]\nname = "r"\nphrase = "red circle"\nstream = "short"\nzone = "left"\n')
    assert cli.main(["rules", str(rules), "--control", control]) == 0
    rules.write_text('[[rulez]]\nname = "r"\n')
    assert cli.main(["rules", str(rules), "--control", control]) == 2
    assert "unknown tables ['rulez']" in capsys.readouterr().err
    assert run["process"].poll() is None
