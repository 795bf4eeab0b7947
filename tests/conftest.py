"""Fixtures shared by several test modules (test modules never import one another)."""

from __future__ import annotations

import os
import random
import threading

import pytest

from streamer.frames import FrameMailbox
from streamer.stats import StreamStats


@pytest.fixture
def mailbox_factory():
    made = []

    def make(name, slots=3, width=32, height=24):
        mailbox = FrameMailbox.create(f"test-{name}-{random.random()}", slots, width, height, threading.Lock())
        made.append(mailbox)
        return mailbox

    yield make
    for mailbox in made:
        mailbox.close()
        mailbox.unlink()


@pytest.fixture
def stats_factory():
    made = []

    def make(stream_ids):
        path = f"/dev/shm/groundwatch-{os.getpid()}-teststats-{random.random()}"
        stats = StreamStats(path, stream_ids, _create=True)
        made.append(stats)
        return stats

    yield make
    for stats in made:
        stats.close()
        stats.unlink()
