"""Alerting inside the inference worker and the hub: track fields, zone/line/alert events, a prompt change that
keeps a phrase's tracks, run-time zone and rule changes, live counts in heartbeats."""

from __future__ import annotations

import time

import numpy as np
import zmq

from streamer.alerts import AlertSettings, StreamAlerts
from tracker import TrackerConfig
from streamer.events import COUNTS_KIND, decode_payload, pack_internal, make_event
from streamer.hub import Hub
from streamer.inference import InferenceWorker, build_tracker
from streamer.rules import Rule
from streamer.zones import Line, Zone
from fakes import FakeDetections, ListSender, frame_with_value, stream_config


class TwoPhraseDetector:
    """One box per phrase of the prompt, side by side, moving 2 px down per frame (y from the frame's value)."""

    def __init__(self) -> None:
        self.encoded = []

    def encode(self, prompt):
        self.encoded.append(prompt)
        return [p.strip() for p in prompt.split(".") if p.strip()]

    def detect(self, frames, phrases):
        out = []
        for frame in frames:
            y = float(frame[0, 0, 0]) * 2
            boxes = np.array([[10 + 40 * k, y, 30 + 40 * k, y + 20] for k in range(len(phrases))], np.float32)
            out.append(FakeDetections(boxes.reshape(-1, 4), np.full(len(phrases), 0.9, np.float32), list(phrases)))
        return out


def make(mailbox_factory, stats_factory, prompt, zones=(), lines=(), rules=()):
    streams = [stream_config("cam", False, prompt)]
    mailboxes = {"cam": mailbox_factory("cam", slots=8, width=160, height=120)}
    stats = stats_factory(["cam"])
    sender = ListSender()
    alerts = {"cam": StreamAlerts("cam", "run7", list(zones), list(lines), list(rules),
                                  AlertSettings(directory=None), live=False)}
    worker = InferenceWorker(detector=TwoPhraseDetector(), streams=streams, mailboxes=mailboxes, stats=stats,
                             sender=sender, tracker_factory=lambda: build_tracker(TrackerConfig(min_hits=2, max_age=3)),
                             alerts=alerts)
    return worker, mailboxes["cam"], sender


def feed(worker, mailbox, values):
    for value in values:
        mailbox.put(frame_with_value(value, 120, 160), frame_index=value, pts=value / 10, ts=value / 10, live=False)
        worker.step()


def test_prompt_change_keeps_the_tracks_of_kept_phrases(mailbox_factory, stats_factory):
    """A prompt change used to end every track; now only the tracks of phrases that left the prompt end."""
    worker, mailbox, sender = make(mailbox_factory, stats_factory, "person . dog .")
    feed(worker, mailbox, range(4))
    ids = {e["phrase"]: e["track_id"] for e in sender.events if e["kind"] == "track" and e["event"] == "started"}
    worker.set_prompt("cam", "person . cat .")
    ended = [e for e in sender.events if e["kind"] == "track" and e["event"] == "ended"]
    assert [(e["phrase"], e["reason"]) for e in ended] == [("dog", "prompt_changed")]
    feed(worker, mailbox, range(4, 7))
    person_updates = [e for e in sender.events if e["kind"] == "track" and e["phrase"] == "person"]
    assert {e["track_id"] for e in person_updates} == {ids["person"]}
    assert person_updates[-1]["frame"] == 6 and person_updates[-1]["id"] == f"cam-run7-{ids['person']}"
    assert person_updates[-1]["start_time"] == person_updates[0]["start_time"]


def test_worker_publishes_zone_line_and_alert_events_with_track_fields(mailbox_factory, stats_factory):
    # The "person" box (x 10..30) walks down 2 px a frame: its bottom centre is on y = 40 at frame 10 (on the
    # zone's edge: inside; on the line: no side), below it from frame 11. Zone inertia 2: entered on frame 11;
    # line min_frames 2: the crossing counts on frame 12.
    zone = Zone("lower", ((0, 40), (160, 40), (160, 120), (0, 120)), normalized=False, inertia=2)
    line = Line("gate", (0, 40), (160, 40), direction=(0, 1), normalized=False, min_frames=2)
    rule = Rule("person_below", "person", zone="lower")
    worker, mailbox, sender = make(mailbox_factory, stats_factory, "person .", [zone], [line], [rule])
    feed(worker, mailbox, range(16))
    zone_events = [e for e in sender.events if e["kind"] == "zone"]
    line_events = [e for e in sender.events if e["kind"] == "line"]
    alerts = [e for e in sender.events if e["kind"] == "alert"]
    assert [(e["event"], e["zone"], e["frame"]) for e in zone_events] == [("entered", "lower", 11)]
    assert [(e["direction"], e["frame"], e["counts"]) for e in line_events] == [
        ("in", 12, {"person": {"in": 1, "out": 0}})]
    assert [(a["rule"], a["zone"], a["frame"]) for a in alerts] == [("person_below", "lower", 11)]
    track = [e for e in sender.events if e["kind"] == "track"][-1]
    assert track["current_zones"] == ["lower"] and track["entered_zones"] == ["lower"]
    assert track["has_snapshot"] is False and track["top_score"] == 0.9
    counts = [e for e in sender.events if e["kind"] == COUNTS_KIND]
    assert counts[-1]["zones"] == {"lower": 1} and counts[-1]["lines"] == {"gate": {"person": {"in": 1, "out": 0}}}


def test_set_zones_and_rules_through_the_worker_control(mailbox_factory, stats_factory):
    worker, mailbox, sender = make(mailbox_factory, stats_factory, "person .")
    feed(worker, mailbox, range(3))
    reply = worker.set_alerting("set_zones", {"stream": "cam", "zones": [
        Zone("all", ((0, 0), (160, 0), (160, 120), (0, 120)), normalized=False, inertia=1)], "lines": []})
    assert reply == {"stream": "cam", "zones": 1, "lines": 0}
    worker.set_alerting("set_rules", {"rules": [Rule("anyone", "person", zone="all")]})
    feed(worker, mailbox, [3])
    assert [(e["kind"], e["frame"]) for e in sender.events if e["kind"] in ("zone", "alert")] == [
        ("zone", 3), ("alert", 3)]


def test_heartbeat_carries_the_live_zone_and_line_counts(tmp_path, stats_factory):
    stats = stats_factory(["cam"])
    pull, pub = f"ipc://{tmp_path}/pull", f"ipc://{tmp_path}/pub"
    hub = Hub(pull_endpoint=pull, pub_endpoint=pub, high_water_mark=100, heartbeat_seconds=0.05, stats=stats,
              recorder=None)
    context = zmq.Context.instance()
    push = context.socket(zmq.PUSH)
    push.connect(pull)
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub)
    time.sleep(0.2)
    push.send_multipart(pack_internal(make_event("cam", COUNTS_KIND, zones={"yard": 2}, lines={})))
    deadline = time.monotonic() + 5
    heartbeats, others = [], []
    while time.monotonic() < deadline and not any("zones" in h for h in heartbeats):
        hub.drain()
        hub.tick()
        if sub.poll(20):
            event = decode_payload(sub.recv_multipart()[1])
            (heartbeats if event["kind"] == "heartbeat" else others).append(event)
    assert heartbeats[-1]["zones"] == {"yard": 2}
    assert others == []  # the counts themselves are never published
    for socket in (push, sub):
        socket.close(linger=0)
    hub.close()
