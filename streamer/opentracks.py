"""The worker's open tracks, in shared memory, so that a restarted worker can end the tracks its predecessor left.

One table per stream of the confirmed tracks alive after the stream's last processed frame (id as published,
box, score, phrase, age, hits, frame). The worker rewrites a stream's table after every frame; only the worker
writes, and a worker that dies mid-write leaves at worst one frame's rows mixed with the previous frame's, which
is all the successor needs: which ids were open, and their last known state, to publish `ended` with
`reason: worker_restarted`.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from streamer.frames import SHM_DIR

MAX_OPEN = 512  # per stream; more open tracks than this are not remembered (their ended events are not sent)
ROW = np.dtype([("id", np.int64), ("frame", np.int64), ("ts", np.float64), ("box", np.float64, 4), ("score", np.float64),
                ("age", np.int64), ("hits", np.int64), ("phrase", "S96")])


class OpenTracks:
    def __init__(self, path: str, stream_ids: list[str], *, _create: bool = False) -> None:
        self.path, self.stream_ids = path, list(stream_ids)
        self.row_of = {stream: index for index, stream in enumerate(self.stream_ids)}
        size = max(len(stream_ids), 1) * MAX_OPEN * ROW.itemsize
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if _create else 0), 0o600)
        try:
            if _create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.table = np.ndarray((max(len(stream_ids), 1), MAX_OPEN), ROW, buffer=self._map)

    @classmethod
    def create(cls, stream_ids: list[str]) -> "OpenTracks":
        return cls(str(SHM_DIR / f"groundwatch-{os.getpid()}-tracks"), stream_ids, _create=True)

    @classmethod
    def attach(cls, spec: dict) -> "OpenTracks":
        return cls(spec["path"], spec["stream_ids"])

    def spec(self) -> dict:
        return {"path": self.path, "stream_ids": self.stream_ids}

    def write(self, stream: str, frame: int, ts: float, ids, boxes_xyxy, scores, phrases, ages, hits) -> None:
        """The stream's confirmed tracks after `frame` (ids as published)."""
        rows = self.table[self.row_of[stream]]
        count = min(len(ids), MAX_OPEN)
        rows["id"][count:] = 0
        if count:
            rows["id"][:count] = np.asarray(ids)[:count]
            rows["frame"][:count] = frame
            rows["ts"][:count] = ts
            rows["box"][:count] = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)[:count]
            rows["score"][:count] = np.asarray(scores)[:count]
            rows["age"][:count] = np.asarray(ages)[:count]
            rows["hits"][:count] = np.asarray(hits)[:count]
            rows["phrase"][:count] = [str(p).encode()[:96] for p in list(phrases)[:count]]

    def clear(self, stream: str) -> None:
        self.table[self.row_of[stream]]["id"] = 0

    def take(self, stream: str) -> list[dict]:
        """The open tracks a previous worker left for `stream`, and forget them."""
        rows = self.table[self.row_of[stream]]
        left = [{"track_id": int(r["id"]), "frame": int(r["frame"]), "ts": float(r["ts"]), "box": [round(float(v), 2) for v in r["box"]],
                 "score": round(float(r["score"]), 4), "age": int(r["age"]), "hits": int(r["hits"]),
                 "phrase": r["phrase"].decode(errors="replace")} for r in rows if r["id"] > 0]
        rows["id"] = 0
        return left

    def close(self) -> None:
        del self.table
        self._map.close()
