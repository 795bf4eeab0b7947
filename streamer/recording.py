"""Append-only event logs on disk: one JSON Lines file per stream and run, keyed by the frame timestamp `ts`.

Each line is exactly the payload that went out on the PUB socket. Writes go through a user-space buffer that is
flushed to the OS at least every `flush_seconds` (<= 1 s), so a kill -9 of the daemon loses at most that much;
a power cut can lose what the OS had not written yet. A reader skips a last line cut in half by a crash.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterator


def run_stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))


class EventLog:
    """Writes one stream's events; `append` takes the already-encoded JSON payload.

    Appends go to memory and reach the file at each flush. A flush that fails (disk full, read-only, removed
    folder) keeps what was not written, counts the failure and retries later, so the hub never stops
    publishing because of the disk; past `max_backlog_bytes` the oldest waiting lines are dropped and counted.
    Only whole remainders are kept, so the file never gains a torn line from a failed write.
    """

    def __init__(self, path: Path, flush_seconds: float = 0.5, *, max_backlog_bytes: int = 16 << 20,
                 retry_seconds: float = 1.0, max_retry_seconds: float = 10.0) -> None:
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self.max_backlog_bytes = max_backlog_bytes
        self.retry_seconds, self.max_retry_seconds = retry_seconds, max_retry_seconds
        self._fd: int | None = None
        self._backlog: list[bytes] = []
        self._backlog_bytes = 0
        self._last_flush = time.monotonic()
        self._retry_at = 0.0
        self._retry_delay = retry_seconds
        self.lines = 0
        self.failures = 0  # flushes that failed
        self.lines_lost = 0  # lines dropped because the backlog overflowed while the disk failed
        self.last_error: str | None = None  # set while failing, None once a flush succeeded
        self.flush()  # create the file now (or learn now that we cannot)

    def append(self, payload: bytes) -> None:
        line = payload + b"\n"
        self._backlog.append(line)
        self._backlog_bytes += len(line)
        self.lines += 1
        while self._backlog_bytes > self.max_backlog_bytes and len(self._backlog) > 1:
            dropped = self._backlog.pop(0)
            self._backlog_bytes -= len(dropped)
            self.lines_lost += 1

    def maybe_flush(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._last_flush >= self.flush_seconds and now >= self._retry_at:
            self.flush()

    def flush(self) -> bool:
        """Write what waits. Returns False (and schedules a retry) when the disk refused it."""
        self._last_flush = time.monotonic()
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # O_APPEND: every write lands at the end even if something else appends too; never rewritten.
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                if self._ends_torn():
                    # A writer killed mid-line (a restarted hub appends to its run's log): end that half line, which
                    # readers skip, so our first event is not glued onto it and lost too.
                    self._backlog.insert(0, b"\n")
                    self._backlog_bytes += 1
            if self._backlog:
                data = memoryview(b"".join(self._backlog))
                self._backlog, self._backlog_bytes = [], 0
                written = 0
                try:
                    while written < len(data):
                        written += os.write(self._fd, data[written:])
                finally:
                    if written < len(data):  # keep the exact remainder: the next write completes the line
                        rest = bytes(data[written:])
                        self._backlog, self._backlog_bytes = [rest], len(rest)
        except OSError as exc:
            self.failures += 1
            self.last_error = exc.strerror or str(exc)
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.max_retry_seconds)
            return False
        self.last_error = None
        self._retry_delay = self.retry_seconds
        self._retry_at = 0.0
        return True

    def _ends_torn(self) -> bool:
        """Whether the file holds something whose last line has no newline (False when it cannot be read)."""
        try:
            with open(self.path, "rb") as file:
                if file.seek(0, os.SEEK_END) == 0:
                    return False
                file.seek(-1, os.SEEK_END)
                return file.read(1) != b"\n"
        except OSError:
            return False

    def close(self) -> None:
        if not self.flush():
            self.lines_lost += sum(line.count(b"\n") for line in self._backlog)  # the disk still refuses them
            self._backlog, self._backlog_bytes = [], 0
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


class Recorder:
    """The event logs of every stream for one run of the daemon."""

    def __init__(self, directory: str | Path, stream_ids: list[str], flush_seconds: float = 0.5,
                 stamp: str | None = None) -> None:
        stamp = stamp or f"{run_stamp()}-{os.getpid()}"
        self.logs = {
            stream: EventLog(Path(directory) / stream / f"events-{stamp}.jsonl", flush_seconds)
            for stream in stream_ids
        }

    def append(self, stream: str, payload: bytes) -> None:
        log = self.logs.get(stream)
        if log is not None:
            log.append(payload)

    def maybe_flush(self) -> None:
        now = time.monotonic()
        for log in self.logs.values():
            log.maybe_flush(now)

    def health(self, stream: str) -> tuple[int, int, str | None]:
        """(failed flushes, lines lost, the current error or None) of a stream's log."""
        log = self.logs.get(stream)
        return (log.failures, log.lines_lost, log.last_error) if log is not None else (0, 0, None)

    def close(self) -> None:
        for log in self.logs.values():
            log.close()

    def paths(self) -> dict[str, str]:
        return {stream: str(log.path) for stream, log in self.logs.items()}


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e400"
        raise ValueError(f"{text} is not a finite number")
    return value


# The daemon writes its events with allow_nan=False: a NaN or an infinity marks a line it did not write, and one
# passed on would break every JSON reply that carries it (the console's, which refuses them too).
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant)


def parse_event_line(line: bytes) -> dict | None:
    """One line of an event log as an event, or None when it is not one: not UTF-8 (a NUL-filled block left by a
    crash), not JSON, nested deeper than the parser recurses, holding NaN or infinity, or not a JSON object."""
    try:
        event = _DECODER.decode(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


def event_ts(event: dict) -> float | None:
    """An event's `ts` as a float, or None when it has none that a float holds (a bool, a string, 10**400)."""
    ts = event.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return None
    try:
        return float(ts)
    except OverflowError:
        return None


def read_events_between(path: str | Path, start: float, end: float, disorder: float = 60.0) -> Iterator[dict]:
    """The events of a log whose `ts` is in [start, end), without reading the whole log: a week of a camera's
    events is gigabytes, and the console asks for one segment's minute. A live stream's log is in `ts` order up to
    `disorder` seconds (events are logged as the hub gets them, a frame's after its detection), so the first event
    at or after `start - disorder` is found by bisecting byte offsets, and the reading stops after
    `end + disorder`. A torn or unreadable line is skipped as in `read_events`."""
    with open(path, "rb") as file:
        low, high = 0, file.seek(0, 2)
        while high - low > 65536:  # the last stretch is read line by line
            middle = (low + high) // 2
            file.seek(middle)
            file.readline()  # the rest of the line the offset fell in
            ts = None
            while ts is None:
                line = file.readline()
                if not line.endswith(b"\n"):
                    break
                event = parse_event_line(line)
                ts = event_ts(event) if event is not None else None
            if ts is None or ts >= start - disorder:
                high = middle
            else:
                low = middle
        file.seek(low)
        if low:
            file.readline()
        for line in file:
            if not line.endswith(b"\n"):
                break
            event = parse_event_line(line)
            ts = event_ts(event) if event is not None else None
            if ts is None:
                continue
            if ts >= end + disorder:
                break
            if start <= ts < end:
                yield event


def read_events(path: str | Path) -> Iterator[dict]:
    """Events of a log in order; a torn last line (the daemon was killed mid-write) is skipped."""
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break
            event = parse_event_line(line)
            if event is not None:
                yield event
