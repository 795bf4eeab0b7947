"""Frames between processes: one shared-memory mailbox per stream.

A decoder writes decoded RGB frames straight into a slot of its stream's mailbox, and the inference worker reads
them in place: no pickling, no socket copy (benchmarks/pipeline.py measures this against ZeroMQ zero-copy). Only
slot states change hands, under one lock per mailbox held for a few microseconds.

Slot life: FREE -> WRITING (decoder copies pixels, no lock held) -> READY -> READING (worker runs the model on
the slot's pixels) -> FREE. Two policies:
- live: the decoder never waits. With no FREE slot it overwrites the oldest READY one, and the worker takes the
  newest READY frame and frees older ones; both count the stale frames they drop.
- file: every frame, in order. The decoder waits for a FREE slot (back-pressure) and the worker takes the
  oldest READY frame.

The mailbox is a file in /dev/shm created by the supervisor, so it outlives a crashed decoder or worker.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.sharedmem import SHM_DIR, map_shared, shared_path, unlink_shared

FREE, WRITING, READY, READING = 0, 1, 2, 3

SLOT_DTYPE = np.dtype(
    [
        ("state", np.int64),
        ("seq", np.int64),
        ("frame_index", np.int64),
        ("height", np.int64),
        ("width", np.int64),
        ("pts", np.float64),  # media time, seconds
        ("ts", np.float64),  # event timestamp: wall clock for live, media time for files
        ("decoded_at", np.float64),  # wall clock when decoded, for latency
    ]
)
CONTROL_DTYPE = np.dtype(
    [
        ("next_seq", np.int64),
        ("finished", np.int64),  # 1: the decoder will write no more frames (end of file or fatal error)
        ("dropped", np.int64),  # stale live frames dropped, by either side
        ("end_reason", np.int64),  # why the decoder finished: END_REASONS
        ("next_frame", np.int64),  # frame_index + 1 of the newest frame made READY (a restarted decoder's start)
    ]
)
END_REASONS = {0: "unknown", 1: "end_of_file", 2: "error", 3: "shutdown"}


@dataclass
class Frame:
    """A frame held by the worker: `pixels` is a view into shared memory, valid until `release`."""

    slot: int
    seq: int
    frame_index: int
    pts: float
    ts: float
    decoded_at: float
    pixels: np.ndarray  # (H, W, 3) uint8 RGB


class FrameMailbox:
    """Shared-memory slots for one stream. Create with `create`, attach in other processes with `attach`."""

    def __init__(self, path: str, slots: int, capacity: int, lock, *, _create: bool = False) -> None:
        self.path, self.slots, self.capacity, self.lock = path, slots, capacity, lock
        header_bytes = SLOT_DTYPE.itemsize * slots + CONTROL_DTYPE.itemsize
        self._data_offset = (header_bytes + 63) // 64 * 64
        size = self._data_offset + slots * capacity
        self._map = map_shared(path, size, create=_create)
        self.header = np.ndarray((slots,), SLOT_DTYPE, buffer=self._map, offset=0)
        self.control = np.ndarray((), CONTROL_DTYPE, buffer=self._map, offset=SLOT_DTYPE.itemsize * slots)
        self._data = np.ndarray((slots, capacity), np.uint8, buffer=self._map, offset=self._data_offset)

    @classmethod
    def create(cls, name: str, slots: int, max_width: int, max_height: int, lock) -> "FrameMailbox":
        return cls(shared_path(name), slots, max_width * max_height * 3, lock, _create=True)

    @classmethod
    def attach(cls, spec: dict) -> "FrameMailbox":
        return cls(spec["path"], spec["slots"], spec["capacity"], spec["lock"])

    def spec(self) -> dict:
        """What a child process needs to attach (picklable by multiprocessing's spawn, never by our sockets)."""
        return {"path": self.path, "slots": self.slots, "capacity": self.capacity, "lock": self.lock}

    def close(self) -> None:
        # Views into the map must go before the map can close.
        del self.header, self.control, self._data
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a frame view; the OS reclaims the mapping at exit

    def unlink(self) -> None:
        unlink_shared(self.path)

    # -- decoder side ------------------------------------------------------------------------------------

    def reset(self) -> int:
        """Forget the slots a previous decoder left (called when a decoder starts). READING slots stay with
        the worker, which frees them when it is done. Returns the frame index a restarted decoder of a file goes
        on from: the oldest frame freed here, or the one after the newest frame delivered (0 for a new mailbox);
        so no frame the worker took is delivered twice, and none is lost. Decided under the lock: the worker may
        take a frame up to the moment it is freed."""
        with self.lock:
            states = self.header["state"]
            ready = np.flatnonzero(states == READY)
            resume = int(self.header["frame_index"][ready].min()) if ready.size else int(self.control["next_frame"])
            states[(states == READY) | (states == WRITING)] = FREE
            self.control["finished"] = 0
            self.control["end_reason"] = 0
            return resume

    def put(self, pixels: np.ndarray, *, frame_index: int, pts: float, ts: float, live: bool,
            stop=None, poll_seconds: float = 0.005) -> bool:
        """Write one (H, W, 3) uint8 frame. Live: never waits. File: waits for a free slot unless `stop` is set.

        Returns False only when a file frame could not be written because `stop` was set.
        """
        def copy(destination: np.ndarray) -> None:
            destination[...] = pixels

        return self.put_with(copy, pixels.shape[0], pixels.shape[1], frame_index=frame_index, pts=pts, ts=ts,
                             live=live, stop=stop, poll_seconds=poll_seconds)

    def put_with(self, fill, height: int, width: int, *, frame_index: int, pts: float, ts: float, live: bool,
                 stop=None, poll_seconds: float = 0.005) -> bool:
        """Like `put`, but `fill(destination)` writes the (height, width, 3) RGB pixels straight into the slot
        (the decoder converts YUV to RGB there: no intermediate array)."""
        nbytes = height * width * 3
        if nbytes > self.capacity:
            raise ValueError(f"frame {width}x{height} does not fit a {self.capacity}-byte slot")
        wait = min(0.0002, poll_seconds)
        while True:
            with self.lock:
                states = self.header["state"]
                free = np.flatnonzero(states == FREE)
                if free.size:
                    slot = int(free[0])
                elif live:
                    ready = np.flatnonzero(states == READY)
                    if not ready.size:  # every slot busy: cannot happen with >= 3 slots, but never wait
                        self.control["dropped"] += 1
                        return True
                    slot = int(ready[np.argmin(self.header["seq"][ready])])
                    self.control["dropped"] += 1
                else:
                    slot = -1
                if slot >= 0:
                    self.header["state"][slot] = WRITING
                    break
            if stop is not None and stop.is_set():
                return False
            # Short waits while the consumer keeps up (a fast reader must not be held back by our sleep),
            # growing to `poll_seconds` when it is slow (a detector at a few frames/s).
            time.sleep(wait)
            wait = min(wait * 2, poll_seconds)
        fill(self._data[slot, :nbytes].reshape(height, width, 3))
        with self.lock:
            record = self.header[slot]
            seq = int(self.control["next_seq"])
            self.control["next_seq"] = seq + 1
            record["seq"], record["frame_index"] = seq, frame_index
            record["height"], record["width"] = height, width
            record["pts"], record["ts"], record["decoded_at"] = pts, ts, time.time()
            record["state"] = READY
            self.control["next_frame"] = max(int(self.control["next_frame"]), frame_index + 1)
        return True

    def recover_reading(self, redeliver: bool = False) -> None:
        """Take back the slots a crashed worker held (the supervisor calls this before restarting it): freed,
        or, with `redeliver` (files: every frame counts), READY again so the next worker processes them. Their
        `seq` is kept, so they come out first and in order."""
        with self.lock:
            states = self.header["state"]
            states[states == READING] = READY if redeliver else FREE

    def finish(self, reason: int = 0) -> None:
        """No more frames will come (reason: a key of END_REASONS)."""
        with self.lock:
            self.control["finished"] = 1
            self.control["end_reason"] = reason

    # -- worker side -------------------------------------------------------------------------------------

    def take(self, live: bool, limit: int = 1) -> list[Frame]:
        """Up to `limit` READY frames (live: only the newest; file: oldest first), marked READING."""
        frames = []
        with self.lock:
            states = self.header["state"]
            ready = np.flatnonzero(states == READY)
            if not ready.size:
                return frames
            order = ready[np.argsort(self.header["seq"][ready])]
            if live:
                stale = order[:-1]
                self.header["state"][stale] = FREE
                self.control["dropped"] += int(stale.size)
                chosen = order[-1:]
            else:
                chosen = order[:limit]
            for slot in chosen.tolist():
                record = self.header[slot]
                record["state"] = READING
                height, width = int(record["height"]), int(record["width"])
                pixels = self._data[slot, : height * width * 3].reshape(height, width, 3)
                frames.append(
                    Frame(slot, int(record["seq"]), int(record["frame_index"]), float(record["pts"]),
                          float(record["ts"]), float(record["decoded_at"]), pixels)
                )
        return frames

    def release(self, frame: Frame) -> None:
        with self.lock:
            if self.header["state"][frame.slot] == READING:
                self.header["state"][frame.slot] = FREE

    def pending(self) -> int:
        """READY or WRITING slots (frames the worker has not taken yet)."""
        with self.lock:
            states = self.header["state"]
            return int(np.count_nonzero((states == READY) | (states == WRITING)))

    @property
    def finished(self) -> bool:
        return bool(self.control["finished"])

    @property
    def end_reason(self) -> str:
        return END_REASONS.get(int(self.control["end_reason"]), "unknown")

    @property
    def dropped(self) -> int:
        return int(self.control["dropped"])


def remove_stale_mailboxes() -> None:
    """Delete mailboxes left in /dev/shm by a daemon that was killed with SIGKILL."""
    for path in SHM_DIR.glob("groundwatch-*-*"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)
