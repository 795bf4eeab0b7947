"""Fakes shared by the streamer tests: a deterministic detector, an in-memory event sender, a stop flag, and a
worker built around them (the fixtures that make mailboxes and stats are in conftest.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from streamer.config import StreamConfig
from streamer.inference import InferenceWorker, build_tracker
from tracker import TrackerConfig


@dataclass
class FakeDetections:
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    phrases: list


class FakeDetector:
    """One box per frame that moves 2 px right each frame (x from the frame's mean red value), phrase 'thing'."""

    def __init__(self) -> None:
        self.encoded: list[str] = []
        self.batches: list[int] = []

    def encode(self, prompt):
        self.encoded.append(prompt)
        return {"prompt": prompt}

    def detect(self, frames, encoding):
        self.batches.append(len(frames))
        out = []
        for frame in frames:
            x = float(frame[0, 0, 0]) * 2
            out.append(FakeDetections(np.array([[x, 10, x + 20, 30]], np.float32), np.array([0.9], np.float32),
                                      [encoding["prompt"].split(" .")[0]]))
        return out


class ListSender:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.dropped = 0

    def send(self, event):
        self.events.append(event)
        return True


class FlagEvent:
    def __init__(self) -> None:
        self.flag = False

    def is_set(self):
        return self.flag

    def set(self):
        self.flag = True

    def wait(self, timeout):
        time.sleep(min(timeout, 0.01))
        return self.flag


def frame_with_value(value: int, height=24, width=32) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def stream_config(id: str, live: bool, prompt: str) -> StreamConfig:
    """The frozen `StreamConfig` the supervisor hands the worker (the file need not exist here)."""
    return StreamConfig(id=id, url=f"rtsp://127.0.0.1/{id}" if live else f"{id}.mp4", prompt=prompt,
                        mode="live" if live else "file")


def make_worker(mailbox_factory, stats_factory, streams, batch_size=4):
    """`streams`: {"id", "live", "prompt"} dicts, turned into the `StreamConfig`s the worker takes."""
    streams = [stream_config(s["id"], s["live"], s["prompt"]) for s in streams]
    mailboxes = {s.id: mailbox_factory(s.id, slots=8) for s in streams}
    stats = stats_factory([s.id for s in streams])
    detector, sender = FakeDetector(), ListSender()
    tracker_config = TrackerConfig(min_hits=2, max_age=3)
    worker = InferenceWorker(detector=detector, streams=streams, mailboxes=mailboxes, stats=stats, sender=sender,
                             tracker_factory=lambda: build_tracker(tracker_config), batch_size=batch_size)
    return worker, mailboxes, detector, sender, stats
