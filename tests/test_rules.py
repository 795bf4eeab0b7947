"""Rules in words (streamer.rules) driven through StreamAlerts with the real tracker, and their config checks."""

from __future__ import annotations

import numpy as np
import pytest

import tracker
from streamer.alerts import AlertSettings, StreamAlerts
from streamer.config import ConfigError, parse_config, parse_places, parse_rules, rule_warnings
from streamer.rules import Rule
from streamer.zones import Zone

W, H = 200, 100


def walk(a: float, b: float, frames: int) -> list[float]:
    """Anchor x positions walking from a to b (small steps: the tracker keeps the same id)."""
    return np.linspace(a, b, frames).tolist()
SQUARE = Zone("yard", ((0.25, 0.2), (0.75, 0.2), (0.75, 0.8), (0.25, 0.8)), inertia=2)


class Run:
    """A stream at 10 frames/s: boxes in, events out, through the real tracker and StreamAlerts."""

    def __init__(self, rules, zones=(SQUARE,), lines=(), settings=None) -> None:
        self.tracker = tracker.Tracker(tracker.TrackerConfig(min_hits=2, max_age=3))
        self.alerts = StreamAlerts("cam", "run1", list(zones), list(lines), list(rules),
                                   settings or AlertSettings(directory=None), live=False)
        self.frame = 0
        self.events: list[tuple[str, dict]] = []
        self.track_fields: dict[int, dict] = {}

    def step(self, anchors: list[tuple[float, float]], phrase: str = "white van", score: float = 0.9):
        boxes = np.array([[x - 10, y - 20, x + 10, y] for x, y in anchors], dtype=np.float64).reshape(-1, 4)
        update = self.tracker.update(boxes, np.full(len(anchors), score), [phrase] * len(anchors), self.frame)
        pixels = np.zeros((H, W, 3), np.uint8)
        events, fields = self.alerts.on_frame(update, pixels, self.frame / 10)
        for track in update.ended_tracks:
            ended_events, _ = self.alerts.on_track_end(track.id, track.label, self.frame / 10)
            events += ended_events
        self.events += events
        self.track_fields.update(fields)
        self.frame += 1

    def walk(self, xs, y: float = 50):
        for x in xs:
            self.step([(x, y)])

    def alerts_fired(self) -> list[dict]:
        return [f for kind, f in self.events if kind == "alert" and f["event"] == "fired"]


def test_rule_fires_once_per_presence_after_min_seconds():
    run = Run([Rule("van_in_yard", "white van", zone="yard", min_seconds=1.0)])
    for _ in range(25):  # 2.5 s in the yard
        run.step([(100, 50)])
    fired = run.alerts_fired()
    assert len(fired) == 1
    # entered on the 2nd confirmed frame inside (inertia 2) at t=0.2; fires at t >= 1.2
    assert fired[0]["zone"] == "yard" and fired[0]["presence_start"] == pytest.approx(0.2)
    assert run.events.index(("alert", fired[0])) > 0
    assert fired[0]["id"] == "cam-run1-1" and fired[0]["rule"] == "van_in_yard"


def test_leaving_and_returning_is_a_new_presence():
    run = Run([Rule("van_in_yard", "white van", zone="yard", min_seconds=0.5)])
    # the same track: in the yard (x in 50..150), out to the left, back in
    run.walk([100] * 10 + walk(100, 20, 15) + [20] * 4 + walk(20, 100, 15) + [100] * 10)
    assert len(run.alerts_fired()) == 2
    assert len({f["track_id"] for f in run.alerts_fired()}) == 1


def test_cooldown_delays_a_presence_that_is_still_there():
    """Two vans arrive 0.5 s apart; cooldown 2 s: the first fires at once, the second when the cooldown ends."""
    run = Run([Rule("van", "white van", cooldown_seconds=2.0)], zones=())
    for frame in range(40):
        anchors = [(40, 50)] + ([(160, 50)] if frame >= 5 else [])
        run.step(anchors)
    fired = run.alerts_fired()
    assert len(fired) == 2
    times = [run.events.index(("alert", f)) for f in fired]
    assert times[0] < times[1]
    assert fired[1]["track_id"] != fired[0]["track_id"]
    frame_of = [f["presence_start"] for f in fired]
    assert frame_of[0] == pytest.approx(0.1)  # confirmed on its 2nd frame


def test_cooldown_counts_time_from_the_last_firing():
    run = Run([Rule("van", "white van", zone="yard", cooldown_seconds=5.0)])
    firing_frames = []
    lap = [100] * 5 + walk(100, 20, 10) + walk(20, 100, 10)  # 2.5 s: in, out, back in (the same track)
    for frame, x in enumerate(lap * 4):
        before = len(run.alerts_fired())
        run.step([(x, 50)])
        if len(run.alerts_fired()) > before:
            firing_frames.append(frame)
    entries = [f for k, f in run.events if k == "zone" and f["event"] == "entered"]
    assert len(entries) == 5
    # The yard is x in 50..150. The track is confirmed on frame 1 and enters on frame 2 (inertia 2). Each
    # 25-frame lap: inside, walk out (left on frame 12 of the lap), walk back (entered on frame 20). Presences
    # begin on frames 2, 20, 45, 70, 95. The first fires; the 5 s cooldown runs to frame 52; the presence 20-37
    # ends inside it (lost), the one from 45 is still there at frame 52 and fires then; the next cooldown runs
    # past the rest.
    assert firing_frames == [2, 52], firing_frames


def test_min_score_and_phrase_must_match():
    run = Run([Rule("sure_van", "White Van", min_score=0.8)], zones=())
    for _ in range(5):
        run.step([(100, 50)], phrase="white van", score=0.7)
    assert run.alerts_fired() == []
    for _ in range(3):
        run.step([(100, 50)], phrase="red car", score=0.95)
    assert run.alerts_fired() == []
    run2 = Run([Rule("sure_van", "White Van", min_score=0.8)], zones=())
    for _ in range(3):
        run2.step([(100, 50)], phrase="white van", score=0.85)
    assert len(run2.alerts_fired()) == 1


def test_rule_changed_at_run_time_takes_effect_on_the_next_frame():
    run = Run([], zones=())
    for _ in range(5):
        run.step([(100, 50)])
    assert run.alerts_fired() == []
    run.alerts.set_rules([Rule("van", "white van")])
    run.step([(100, 50)])
    assert len(run.alerts_fired()) == 1
    run.alerts.set_rules([])
    run.alerts.set_rules([Rule("van", "white van")])  # a changed rule set starts afresh: fires again
    run.step([(100, 50)])
    assert len(run.alerts_fired()) == 2


def test_track_fields_carry_zones_scores_and_a_unique_id():
    run = Run([])
    for x in walk(30, 100, 12):
        run.step([(x, 50)], score=0.8)
    fields = run.track_fields[1]
    assert fields["id"] == "cam-run1-1"
    assert fields["current_zones"] == ["yard"] and fields["entered_zones"] == ["yard"]
    assert fields["start_time"] == pytest.approx(0.1) and fields["top_score"] == pytest.approx(0.8)


def test_zone_changed_at_run_time_takes_effect_on_the_next_frame():
    run = Run([Rule("in_left", "white van", zone="left")], zones=())
    for _ in range(3):
        run.step([(30, 50)])
    run.alerts.set_places([Zone("left", ((0, 0), (0.5, 0), (0.5, 1), (0, 1)), inertia=1)], [])
    run.step([(30, 50)])
    assert [f["zone"] for f in run.alerts_fired()] == ["left"]
    assert [(f["event"], f["zone"]) for k, f in run.events if k == "zone"] == [("entered", "left")]


# -- configuration and run-time validation --------------------------------------------------------------------


def stream(**extra) -> dict:
    return {"id": "door", "url": "rtsp://camera/1", "prompt": "a person . white van .", **extra}


@pytest.mark.parametrize("zone, message", [
    ({"name": "bow", "polygon": [[0, 0], [1, 1], [1, 0], [0, 1]]}, "intersects itself"),
    ({"name": "flat", "polygon": [[0, 0], [0.5, 0], [1, 0]]}, "degenerate"),
    ({"name": "off", "polygon": [[0, 0], [1.5, 0], [1, 1]]}, "outside the frame"),
    ({"name": "neg", "polygon": [[-5, 0], [100, 0], [100, 100]], "coordinates": "pixels"}, "outside the frame"),
])
def test_bad_zones_are_clear_errors(zone, message):
    with pytest.raises(ConfigError) as raised:
        parse_config({"streams": [stream(zones=[zone])]})
    assert f"streams[0].zones[0]: zone '{zone['name']}'" in str(raised.value)
    assert message in str(raised.value)


def test_rules_naming_unknown_streams_zones_or_lines_are_errors_all_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        parse_config({"streams": [stream(zones=[{"name": "yard", "polygon": [[0, 0], [1, 0], [1, 1]]}])],
                      "rules": [{"name": "a", "phrase": "a person", "stream": "garage"},
                                {"name": "b", "phrase": "a person", "zone": "drive"},
                                {"name": "c", "phrase": "a person", "stream": "door", "line": "gate"}]})
    text = str(raised.value)
    assert "no stream 'garage'" in text and "no zone 'drive'" in text and "no line 'gate' in stream 'door'" in text


def test_rule_phrase_not_in_the_prompt_is_a_warning_not_an_error():
    config = parse_config({"streams": [stream()], "rules": [{"name": "dog", "phrase": "a dog"},
                                                            {"name": "van", "phrase": "White van"}]})
    warnings = rule_warnings(config.rules, {"door": "a person . white van ."})
    assert len(warnings) == 1 and "'a dog' is not in the prompt" in warnings[0]


def test_run_time_updates_are_validated_like_the_config():
    with pytest.raises(ConfigError) as raised:
        parse_places({"zones": [{"name": "z", "polygon": [[0, 0], [1, 1], [1, 0], [0, 1]]}], "colour": "red"})
    assert "intersects itself" in str(raised.value) and "colour: unknown key" in str(raised.value)
    places = parse_places({"zones": [{"name": "z", "polygon": [[0, 0], [1, 0], [1, 1]]}]})
    with pytest.raises(ConfigError, match="no zone 'y'"):
        parse_rules({"rules": [{"name": "r", "phrase": "x", "zone": "y"}]}, {"door": places})
    assert parse_rules({"rules": [{"name": "r", "phrase": "x", "zone": "z"}]}, {"door": places}).rules[0].zone == "z"


def test_run_time_updates_are_bounded():
    """One set_zones request with thousands of zones (each checked for self-intersection) could hold the
    supervisor for seconds; the lists are bounded like the config's."""
    many = [{"name": f"z{k}", "polygon": [[0, 0], [1, 0], [1, 1]]} for k in range(300)]
    with pytest.raises(ConfigError, match="at most 256"):
        parse_places({"zones": many})
    with pytest.raises(ConfigError, match="at most 64"):
        parse_places({"zones": [{"name": "z", "polygon": [[k / 100, (k % 2) / 100] for k in range(65)]}]})
