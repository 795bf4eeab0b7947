"""GPU memory and hangs, on the CPU by injection (issue 11, "Missing").

A CUDA out-of-memory error used to cost its whole batch and, ten times in a row, the worker; a detector call that
never returned stalled every stream forever. Out of memory now halves the batch size (the same frames run again),
skips only a frame that does not fit alone, and grows back after a quiet period; a call longer than
`model.watchdog_seconds` gets the worker killed and restarted by the supervisor.
"""

from __future__ import annotations

import json
import multiprocessing
import time

import numpy as np
import pytest
import torch

from streamer.client import status, subscribe
from streamer.media import write_video
from streamer.watchdog import BatchSizer, DetectorWatchdog, FaultInjection, is_out_of_memory

from fakes import frame_with_value, make_worker
from daemon_harness import Daemon, loopback_endpoint


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fill(mailbox, first: int, count: int) -> None:
    for value in range(first, first + count):
        mailbox.put(frame_with_value(value), frame_index=value, pts=value / 10, ts=value / 10, live=False)


def test_out_of_memory_halves_the_batch_and_loses_no_frame(mailbox_factory, stats_factory):
    """Memory for 1 frame only: the batch of 4 fails, 2 fails, 1 fits; every frame is processed, in order,
    without an error event; the batch size stays at 1 until a quiet period has passed, then doubles back."""
    streams = [{"id": "a", "live": False, "prompt": "thing ."}]
    worker, mailboxes, detector, sender, _ = make_worker(mailbox_factory, stats_factory, streams, batch_size=4)
    worker.detector = FaultInjection(detector, {"fault": "oom", "fits": 1})
    clock = FakeClock()
    worker.sizer.clock = clock
    fill(mailboxes["a"], 0, 6)
    while mailboxes["a"].pending():
        worker.step()
    assert [e["frame"] for e in sender.events if e["kind"] == "detections"] == list(range(6))
    assert not [e for e in sender.events if e["kind"] == "error"]
    assert worker.batch_size == 1 and worker.sizer.shrinks == 2
    assert detector.batches == [1] * 6  # the fake's own calls: only those that fit reached it

    worker.detector = detector  # memory is back
    clock.now += 30
    fill(mailboxes["a"], 6, 2)
    while mailboxes["a"].pending():
        worker.step()
    assert worker.batch_size == 1  # not quiet for long enough yet
    clock.now += 31
    fill(mailboxes["a"], 8, 4)
    while mailboxes["a"].pending():
        worker.step()
    assert worker.batch_size == 2
    clock.now += 61
    fill(mailboxes["a"], 12, 2)
    while mailboxes["a"].pending():
        worker.step()
    assert worker.batch_size == 4  # the next gather takes 4 again
    fill(mailboxes["a"], 14, 4)
    while mailboxes["a"].pending():
        worker.step()
    assert max(detector.batches) == 4
    assert [e["frame"] for e in sender.events if e["kind"] == "detections"] == list(range(18))


def test_out_of_memory_at_batch_size_one_skips_the_frame(mailbox_factory, stats_factory):
    """A frame that does not fit even alone is skipped with an `out_of_memory` error event; the next frames,
    which fit, are processed."""
    streams = [{"id": "a", "live": False, "prompt": "thing ."}]
    worker, mailboxes, detector, sender, _ = make_worker(mailbox_factory, stats_factory, streams, batch_size=2)
    worker.detector = FaultInjection(detector, {"fault": "oom", "after_calls": 0, "calls": 3})  # 3 calls fail
    fill(mailboxes["a"], 0, 4)
    while mailboxes["a"].pending():
        worker.step()
    errors = [e for e in sender.events if e["kind"] == "error"]
    assert [(e["error_type"], e["frame"], e["fatal"]) for e in errors] == [("out_of_memory", 0, False),
                                                                          ("out_of_memory", 1, False)]
    assert [e["frame"] for e in sender.events if e["kind"] == "detections"] == [2, 3]
    assert mailboxes["a"].pending() == 0


def test_other_errors_are_not_taken_for_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(RuntimeError("out of memory"))  # a message is no proof: inference_failed
    assert not is_out_of_memory(ValueError("out of memory"))


def test_batch_sizer_halves_to_one_and_recovers():
    clock = FakeClock()
    sizer = BatchSizer(8, recover_seconds=10, clock=clock)
    assert [sizer.shrink() for _ in range(5)] == [4, 2, 1, 1, 1]
    clock.now = 9
    assert sizer.maybe_grow() == 1
    for expected in (2, 4, 8, 8):
        clock.now += 10
        assert sizer.maybe_grow() == expected


def _hang_in_detect(stamp) -> None:
    watchdog = DetectorWatchdog(stamp)
    watchdog.end()  # the first call (compilation) is not watched; this one is
    watchdog.begin()
    time.sleep(600)


def test_watchdog_sees_an_overrunning_call():
    """The supervisor's side: a stamp older than the limit in a live process is an overrun."""
    context = multiprocessing.get_context("spawn")
    stamp = context.Value("d", 0.0, lock=False)
    assert DetectorWatchdog.overrun(stamp, 1.0) is None
    process = context.Process(target=_hang_in_detect, args=(stamp,), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + 60
        while not stamp.value:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert DetectorWatchdog.overrun(stamp, 1.0) is None
        assert DetectorWatchdog.overrun(stamp, 1.0, now=stamp.value + 1.5) == pytest.approx(1.5)
        assert DetectorWatchdog.overrun(stamp, 0, now=stamp.value + 99) is None  # 0: off
    finally:
        process.kill()
        process.join(5)


@pytest.mark.slow
def test_hung_detector_gets_the_worker_restarted(tmp_path):
    """A real daemon whose detector hangs (injected: its 4th call sleeps 10 minutes) used to stall every stream
    for good. With `watchdog_seconds = 15` the supervisor kills the worker, says why (`detector_hung`), restarts
    it, and detections resume."""
    write_video(tmp_path / "v.mp4", np.zeros((10, 48, 64, 3), np.uint8), fps=10)
    fault = tmp_path / "fault.json"
    fault.write_text(json.dumps({"fault": "sleep", "after_calls": 3, "seconds": 600}))
    publish, control = loopback_endpoint(), loopback_endpoint()
    daemon = Daemon(tmp_path, publish=publish, control=control, env={"GROUNDWATCH_FAULT_FILE": str(fault)},
                    config_text=f"""
[[streams]]
id = "cam"
url = "v.mp4"
prompt = "a thing ."
loop = true
realtime = true

[model]
weights = "tiny"
short_side = 64
max_side = 96
batch_size = 2
watchdog_seconds = 15

[publish]
endpoint = "{publish}"
control_endpoint = "{control}"

[record]
directory = "recordings"

[metrics]
enabled = false

[supervisor]
exit_when_done = false
restart_initial_seconds = 0.2
""")
    daemon.start()
    try:
        daemon.wait_ready(180)
        first_pid = status(control)["processes"]["worker"]["pid"]
        seen = {"detector_hung": None, "process_crashed": None, "after": 0}
        for event in subscribe(publish, stream="cam", timeout=120):
            if event["kind"] == "error" and event["error_type"] in seen:
                seen[event["error_type"]] = event
            if event["kind"] == "detections" and seen["process_crashed"] is not None:
                seen["after"] += 1
                if seen["after"] >= 3:
                    break
        assert seen["detector_hung"] is not None and "watchdog_seconds" in seen["detector_hung"]["message"]
        assert "worker" in seen["process_crashed"]["message"]
        assert seen["after"] >= 3, daemon.log()[-3000:]
        worker = status(control)["processes"]["worker"]
        assert worker["restarts"] >= 1 and worker["pid"] != first_pid and worker["alive"]
        assert not fault.exists()  # one-shot: the restarted worker runs clean
    finally:
        daemon.stop(60)


def test_memory_that_never_comes_back_gets_the_worker_restarted(mailbox_factory, stats_factory):
    """Out of memory on every single frame: after `max_consecutive_failures` skipped frames in a row the worker
    gives up (the supervisor restarts it with a fresh CUDA context) instead of skipping frames forever."""
    streams = [{"id": "a", "live": False, "prompt": "thing ."}]
    worker, mailboxes, detector, sender, _ = make_worker(mailbox_factory, stats_factory, streams, batch_size=1)
    worker.detector = FaultInjection(detector, {"fault": "oom"})
    worker.max_consecutive_failures = 3
    fill(mailboxes["a"], 0, 6)
    with pytest.raises(torch.OutOfMemoryError):
        for _ in range(6):
            worker.step()
    assert len([e for e in sender.events if e["kind"] == "error" and e["error_type"] == "out_of_memory"]) == 2
