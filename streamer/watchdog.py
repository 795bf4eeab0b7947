"""Keeping the inference worker alive and useful when the accelerator misbehaves.

`BatchSizer`: a CUDA out-of-memory error in a batch halves the worker's batch size and the same frames are run
again in smaller batches; at batch size 1 the frame that still does not fit is skipped with an `error` event
(`error_type: out_of_memory`). After `recover_seconds` without another, the batch size doubles again, up to the
configured one (memory is often short only while something else holds it).

`DetectorWatchdog`: the worker stamps the monotonic time at which a detector call began into a shared double;
the supervisor kills a worker whose call has run longer than `model.watchdog_seconds` (a hung driver, a
deadlocked kernel) and restarts it like any crashed child, as Frigate's detector watchdog does. The first call
of a worker is not watched: it compiles kernels and may take long on a loaded machine.

`FaultInjection`: for tests and drills, a one-shot fault file (`GROUNDWATCH_FAULT_FILE`) makes the worker's
detector raise out-of-memory or hang; the file is removed when read, so a restarted worker runs clean.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("groundwatch.watchdog")

FAULT_FILE_VARIABLE = "GROUNDWATCH_FAULT_FILE"


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class since torch 2.5), checked by name
    so that nothing here imports torch. Other errors, whatever their message, stay `inference_failed`."""
    return any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)


class BatchSizer:
    """The worker's current batch size: halved on out-of-memory, doubled back after a quiet period."""

    def __init__(self, maximum: int, recover_seconds: float = 60.0, clock=time.monotonic) -> None:
        self.maximum, self.recover_seconds, self.clock = maximum, recover_seconds, clock
        self.size = maximum
        self.last_change = clock()
        self.shrinks = 0

    def shrink(self) -> int:
        self.size = max(1, self.size // 2)
        self.last_change = self.clock()
        self.shrinks += 1
        return self.size

    def maybe_grow(self) -> int:
        if self.size < self.maximum and self.clock() - self.last_change >= self.recover_seconds:
            self.size = min(self.maximum, self.size * 2)
            self.last_change = self.clock()
            log.info("no out-of-memory for %.0f s: batch size back up to %d", self.recover_seconds, self.size)
        return self.size


class DetectorWatchdog:
    """A shared stamp: 0.0 when no detector call is running, else the monotonic time it began."""

    def __init__(self, stamp) -> None:
        self.stamp = stamp  # a multiprocessing Value("d") shared with the supervisor
        self.armed = False

    def begin(self) -> None:
        if self.armed:
            self.stamp.value = time.monotonic()

    def end(self) -> None:
        self.stamp.value = 0.0
        self.armed = True

    @staticmethod
    def overrun(stamp, limit: float, now: float | None = None) -> float | None:
        """Seconds the running call has taken when over `limit`, else None (supervisor side)."""
        began = stamp.value
        if not began or limit <= 0:
            return None
        elapsed = (time.monotonic() if now is None else now) - began
        return elapsed if elapsed > limit else None


class FaultInjection:
    """Wraps a detector; `{"fault": "oom"|"sleep", "after_calls": N, "seconds": S, "calls": C}` from a fault
    file: from call N+1 on (C calls, default all), raise torch.OutOfMemoryError or sleep S seconds first."""

    def __init__(self, detector, fault: dict) -> None:
        self.detector, self.fault = detector, fault
        self.calls = 0

    def encode(self, prompt: str) -> Any:
        return self.detector.encode(prompt)

    def detect(self, frames: Sequence, encoding: Any):
        self.calls += 1
        after, count = self.fault.get("after_calls", 0), self.fault.get("calls")
        active = self.calls > after and (count is None or self.calls <= after + count)
        if active and self.fault["fault"] == "oom" and len(frames) > self.fault.get("fits", 0):
            import torch

            raise torch.OutOfMemoryError(f"injected: {len(frames)} frames do not fit")
        if active and self.fault["fault"] == "sleep":
            time.sleep(self.fault.get("seconds", 3600))
        return self.detector.detect(frames, encoding)


def with_injected_faults(detector):
    """The detector, wrapped when a fault file is named in the environment (read once, then removed)."""
    path = os.environ.get(FAULT_FILE_VARIABLE)
    if not path or not Path(path).is_file():
        return detector
    try:
        fault = json.loads(Path(path).read_text())
        Path(path).unlink()
    except (OSError, ValueError) as exc:
        log.error("ignoring the fault file %s: %s", path, exc)
        return detector
    log.warning("fault injection: %s", fault)
    return FaultInjection(detector, fault)
