"""Append-only event logs on disk: one JSON Lines file per stream and run, keyed by the frame timestamp `ts`.

Each line is exactly the payload that went out on the PUB socket. Writes go through a user-space buffer that is
flushed to the OS at least every `flush_seconds` (<= 1 s), so a kill -9 of the daemon loses at most that much;
a power cut can lose what the OS had not written yet. A reader skips a last line cut in half by a crash.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator


def run_stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))


class EventLog:
    """Writes one stream's events; `append` takes the already-encoded JSON payload."""

    def __init__(self, path: Path, flush_seconds: float = 0.5) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_seconds = flush_seconds
        # O_APPEND: every write lands at the end even if something else appends too; never rewritten.
        self._file = open(self.path, "ab", buffering=1 << 16)
        self._last_flush = time.monotonic()
        self.lines = 0

    def append(self, payload: bytes) -> None:
        self._file.write(payload + b"\n")
        self.lines += 1

    def maybe_flush(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


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

    def close(self) -> None:
        for log in self.logs.values():
            log.close()

    def paths(self) -> dict[str, str]:
        return {stream: str(log.path) for stream, log in self.logs.items()}


def read_events(path: str | Path) -> Iterator[dict]:
    """Events of a log in order; a torn last line (the daemon was killed mid-write) is skipped."""
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break
            try:
                event = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8 at all (a NUL-filled block left by a crash)
                continue
            if isinstance(event, dict):
                yield event
