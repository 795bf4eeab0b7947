"""The worker's open tracks, in shared memory, so that a restarted worker can end the tracks its predecessor left.

One table per stream of the confirmed tracks alive after the stream's last processed frame (id as published,
box, score, phrase, age, hits, frame). The worker rewrites a stream's table after every frame; only the worker
writes, and a worker that dies mid-write leaves at worst one frame's rows mixed with the previous frame's, which
is all the successor needs: which ids were open, and their last known state, to publish `ended` with
`reason: worker_restarted`.
"""

from __future__ import annotations

import numpy as np

from streamer.sharedmem import PerStreamTable

MAX_OPEN = 512  # per stream; more open tracks than this are not remembered (their ended events are not sent)
ROW = np.dtype([("id", np.int64), ("frame", np.int64), ("ts", np.float64), ("box", np.float64, 4), ("score", np.float64),
                ("age", np.int64), ("hits", np.int64), ("phrase", "S96")])


class OpenTracks(PerStreamTable):
    """The open tracks: `table` is (streams, MAX_OPEN) rows of `ROW`; a row with id 0 is empty."""

    NAME = "tracks"
    DTYPE = ROW
    ROW_SHAPE = (MAX_OPEN,)

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
