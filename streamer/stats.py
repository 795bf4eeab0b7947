"""Per-stream counters in shared memory: each process writes its own columns, anyone reads them.

One float64 row per stream. A column has exactly one writing process (decoder, worker or hub), so no lock is
needed; readers (status, Prometheus, heartbeats) see values at most one update old.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from streamer.frames import SHM_DIR

COLUMNS = (
    # decoder
    "state",  # STATE_CODES
    "frames_decoded",
    "decode_errors",
    "reconnects",
    "decoder_events_dropped",
    "frames_dropped",  # stale live frames dropped (by decoder or worker), copied from the mailbox
    "last_frame_wall",
    # worker
    "frames_processed",
    "detections",
    "track_events",
    "inference_ms",  # last batch, per frame
    "latency_ms",  # decode -> events sent, last frame
    "worker_events_dropped",
    "prompt_changes",
    "worker_finished",  # 1 once the worker has processed every frame of a finished stream
    "last_track_id",  # the highest track id published: a new tracker (prompt change, restarted worker) goes on
    # hub
    "events_published",
    "record_errors",  # event-log writes that failed (disk full, read-only...); retried
    "record_lost",  # events that never reached the log (backlog overflow while failing, or still failing at exit)
    "record_failing",  # 1 while the stream's event log cannot be written
    "hub_started",  # wall time at which the running hub bound its sockets (0 while none has)
    # mqtt bridge (docs/mqtt.md): the connection state is copied to every stream's row
    "mqtt_state",  # BRIDGE_STATE_CODES
    "mqtt_published",  # messages handed to the broker for this stream
    "mqtt_dropped",  # messages dropped because the broker was away or slow for longer than the queue holds
    # webhooks
    "webhook_delivered",
    "webhook_failed",  # gave up after every attempt, or refused (4xx)
    "webhook_retries",
    "webhook_dropped",  # queue full (endpoint too slow or away): the oldest waiting event was dropped
    "webhook_skipped",  # within cooldown_seconds of the last delivery
    # worker, live redaction (streamer/redaction.py)
    "frames_redacted",  # frames whose redacted picture was made (recorded, previewed, offered to snapshots)
    "redaction_failed",  # frames dropped because their redaction failed: no picture of them left the worker
)
STATE_CODES = {"starting": 0.0, "online": 1.0, "reconnecting": 2.0, "offline": 3.0}
BRIDGE_STATE_CODES = {"off": 0.0, "connecting": 1.0, "connected": 2.0, "disconnected": 3.0}
BRIDGE_STATE_NAMES = {code: name for name, code in BRIDGE_STATE_CODES.items()}
BRIDGE_COUNTERS = ("mqtt_published", "mqtt_dropped", "webhook_delivered", "webhook_failed", "webhook_retries",
                   "webhook_dropped", "webhook_skipped")
STATE_NAMES = {code: name for name, code in STATE_CODES.items()}
_INDEX = {name: index for index, name in enumerate(COLUMNS)}


class StreamStats:
    def __init__(self, path: str, stream_ids: list[str], *, _create: bool = False) -> None:
        self.path, self.stream_ids = path, list(stream_ids)
        self.row_of = {stream: row for row, stream in enumerate(self.stream_ids)}
        size = max(len(stream_ids), 1) * len(COLUMNS) * 8
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if _create else 0), 0o600)
        try:
            if _create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.values = np.ndarray((max(len(stream_ids), 1), len(COLUMNS)), np.float64, buffer=self._map)

    @classmethod
    def create(cls, stream_ids: list[str]) -> "StreamStats":
        return cls(str(SHM_DIR / f"groundwatch-{os.getpid()}-stats"), stream_ids, _create=True)

    @classmethod
    def attach(cls, spec: dict) -> "StreamStats":
        return cls(spec["path"], spec["stream_ids"])

    def spec(self) -> dict:
        return {"path": self.path, "stream_ids": self.stream_ids}

    def add(self, stream: str, column: str, amount: float = 1.0) -> None:
        self.values[self.row_of[stream], _INDEX[column]] += amount

    def set(self, stream: str, column: str, value: float) -> None:
        self.values[self.row_of[stream], _INDEX[column]] = value

    def get(self, stream: str, column: str) -> float:
        return float(self.values[self.row_of[stream], _INDEX[column]])

    def row(self, stream: str) -> dict[str, float]:
        values = self.values[self.row_of[stream]].tolist()
        return dict(zip(COLUMNS, values))

    def close(self) -> None:
        del self.values
        self._map.close()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class RateMeter:
    """Per-second rates of counters, from the difference between two reads."""

    def __init__(self, stats: StreamStats, columns: tuple[str, ...] = ("frames_decoded", "frames_processed")):
        self.stats, self.columns = stats, columns
        self._last: dict[str, tuple[float, dict[str, float]]] = {}

    def rates(self, stream: str, now: float) -> dict[str, float]:
        row = self.stats.row(stream)
        previous = self._last.get(stream)
        self._last[stream] = (now, row)
        if previous is None or now <= previous[0]:
            return {column: 0.0 for column in self.columns}
        elapsed = now - previous[0]
        return {column: (row[column] - previous[1][column]) / elapsed for column in self.columns}


def snapshot(stats: StreamStats, stream: str, rates: dict[str, float] | None = None) -> dict:
    """A stream's figures as published in heartbeats and `groundwatch status`."""
    row = stats.row(stream)
    figures = {
        "state": STATE_NAMES.get(row["state"], "starting"),
        "fps": round((rates or {}).get("frames_processed", 0.0), 2),
        "decode_fps": round((rates or {}).get("frames_decoded", 0.0), 2),
        "latency_ms": round(row["latency_ms"], 2),
        "inference_ms": round(row["inference_ms"], 2),
    }
    for column in ("frames_decoded", "frames_processed", "frames_dropped", "detections", "track_events",
                   "reconnects", "decode_errors", "events_published", "prompt_changes"):
        figures[column] = int(row[column])
    figures["events_dropped"] = int(row["decoder_events_dropped"] + row["worker_events_dropped"])
    figures["record_errors"] = int(row["record_errors"])
    figures["events_not_recorded"] = int(row["record_lost"])
    figures["recording"] = "failing" if row["record_failing"] else "ok"
    figures["frames_redacted"] = int(row["frames_redacted"])
    figures["redaction_failed"] = int(row["redaction_failed"])
    figures["mqtt_state"] = BRIDGE_STATE_NAMES.get(row["mqtt_state"], "off")
    for column in BRIDGE_COUNTERS:
        figures[column] = int(row[column])
    return figures
