"""Retention: what is recorded is deleted when it is old, when the recordings grow too big, or when the disk fills.

Under `record.directory`, per stream: event logs `events-*.jsonl`, video segments `video/*.ts` (a camera's) or
`video/<run>/*.ts` (a redacted file's, one folder per run; emptied folders are removed), snapshots
`snapshots/*.jpg`, clips `clips/*.mp4`. Each category has its own age limit (days, by modification time: when
the file was last written). Over `max_gigabytes`, the oldest files of any category go first; with less than
`min_free_gigabytes` free on the disk, the oldest video (segments, then clips) goes first and the caller is told,
so it can publish an `error` event. A file being written is never deleted: `.part` files, the newest segment of
each stream (the decoder appends to it) and of the current run's folder, the current run's event logs, and
anything modified in the last `busy_seconds`.

`plan` is a pure function of the listing, the clock and the disk's free space, so the tests drive it with a
fake clock and a fake disk.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("groundwatch.retention")

DAY = 86400.0
GIB = 2**30
CATEGORIES = ("events", "segments", "snapshots", "clips")
VIDEO_FIRST = ("segments", "clips")  # what a full disk gives up, in this order


@dataclass(frozen=True)
class RetainPolicy:
    days: dict  # category -> days (0 = keep forever)
    max_gigabytes: float = 0.0  # 0 = no limit
    min_free_gigabytes: float = 0.0  # 0 = no check
    busy_seconds: float = 10.0


@dataclass(frozen=True)
class RecordedFile:
    path: Path
    stream: str
    category: str
    mtime: float
    size: int


def categorise(root: Path, path: Path) -> tuple[str, str] | None:
    """(stream, category) of a file under the recordings root, or None for a file retention leaves alone."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    if len(parts) == 2 and parts[1].startswith("events-") and parts[1].endswith(".jsonl"):
        return parts[0], "events"
    if len(parts) == 4 and parts[1] == "video" and parts[3].endswith(".ts"):
        return parts[0], "segments"  # a redacted file stream's run
    if len(parts) == 3:
        folder, name = parts[1], parts[2]
        if folder == "video" and name.endswith(".ts"):
            return parts[0], "segments"
        if folder == "snapshots" and name.endswith(".jpg"):
            return parts[0], "snapshots"
        if folder == "clips" and name.endswith(".mp4"):
            return parts[0], "clips"
    return None


def scan(root: str | Path) -> list[RecordedFile]:
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for path in root.glob("*/**/*"):
        kind = categorise(root, path)
        if kind is None:
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found.append(RecordedFile(path, kind[0], kind[1], stat.st_mtime, stat.st_size))
    return found


def busy(files: list[RecordedFile], now: float, policy: RetainPolicy, current_run: str | None) -> set[Path]:
    """Files that may be being written."""
    newest_segment: dict[tuple[str, Path], RecordedFile] = {}
    result = set()
    for f in files:
        if now - f.mtime < policy.busy_seconds:
            result.add(f.path)
        if f.category == "events" and current_run and current_run in f.path.name:
            result.add(f.path)
        if f.category == "segments":
            run_folder = f.path.parent.name != "video"
            if run_folder and f.path.parent.name != current_run:
                continue  # an earlier run's recording: nothing writes to it any more
            held = newest_segment.get((f.stream, f.path.parent))
            if held is None or _segment_order(f.path) > _segment_order(held.path):
                newest_segment[(f.stream, f.path.parent)] = f
    result.update(f.path for f in newest_segment.values())
    return result


def _segment_order(path: Path) -> tuple[int, str]:
    """Segments are named by the ms of their first frame; a run's media times have no fixed number of digits."""
    return (int(path.stem), path.name) if path.stem.isdigit() else (-1, path.name)


def plan(files: list[RecordedFile], now: float, policy: RetainPolicy, free_bytes: int | None,
         current_run: str | None = None) -> tuple[list[RecordedFile], dict]:
    """Which files to delete, in order (oldest first within each reason), and a report of why."""
    keep_busy = busy(files, now, policy, current_run)
    candidates = sorted((f for f in files if f.path not in keep_busy), key=lambda f: (f.mtime, str(f.path)))
    doomed: list[RecordedFile] = []
    gone: set[Path] = set()
    report = {"expired": 0, "over_size": 0, "low_disk": 0, "freed_bytes": 0}

    def take(f: RecordedFile, reason: str) -> None:
        doomed.append(f)
        gone.add(f.path)
        report[reason] += 1
        report["freed_bytes"] += f.size

    for f in candidates:
        days = policy.days.get(f.category, 0)
        if days and now - f.mtime > days * DAY:
            take(f, "expired")
    if policy.max_gigabytes:
        total = sum(f.size for f in files if f.path not in gone)
        for f in candidates:
            if total <= policy.max_gigabytes * GIB:
                break
            if f.path not in gone:
                total -= f.size
                take(f, "over_size")
    if policy.min_free_gigabytes and free_bytes is not None:
        free = free_bytes + report["freed_bytes"]
        needed = policy.min_free_gigabytes * GIB
        for category in VIDEO_FIRST:
            for f in candidates:
                if free >= needed:
                    break
                if f.category == category and f.path not in gone:
                    free += f.size
                    take(f, "low_disk")
        report["free_bytes_after"] = int(free)
        report["disk_low"] = free_bytes < needed
    return doomed, report


class Retention:
    """Runs `plan` over the real directory and deletes; clock and disk are injectable for tests."""

    def __init__(self, root: str | Path, policy: RetainPolicy, *, current_run: str | None = None,
                 clock: Callable[[], float] = time.time,
                 free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free) -> None:
        self.root, self.policy, self.current_run = Path(root), policy, current_run
        self.clock, self.free_bytes = clock, free_bytes

    def run(self) -> tuple[list[RecordedFile], dict]:
        """One expiry pass; returns the files deleted and the report."""
        files = scan(self.root)
        free = self.free_bytes(self.root) if self.policy.min_free_gigabytes and self.root.is_dir() else None
        doomed, report = plan(files, self.clock(), self.policy, free, self.current_run)
        deleted = []
        for f in doomed:
            try:
                f.path.unlink()
                deleted.append(f)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot delete %s: %s", f.path, exc)
        for folder in {f.path.parent for f in deleted if f.path.parent.name != "video"
                       and f.path.parent.parent.name == "video"}:
            try:
                folder.rmdir()  # a run's video folder once its last segment went
            except OSError:
                pass  # not empty
        if deleted:
            log.info("retention deleted %d files (%.1f MB)", len(deleted), sum(f.size for f in deleted) / 2**20)
        return deleted, report


def build_retention(record_config, current_run: str | None) -> Retention | None:
    """The daemon's retention from `[record]` / `[record.retain]`, or None when nothing is recorded."""
    retain = record_config.retain
    days = {"events": retain.days.events, "segments": retain.days.segments, "snapshots": retain.days.snapshots,
            "clips": retain.days.clips}
    policy = RetainPolicy(days=days, max_gigabytes=retain.max_gigabytes, min_free_gigabytes=retain.min_free_gigabytes)
    return Retention(record_config.directory, policy, current_run=current_run)
