"""The best picture of each track, written as JPEG when the track ends or an alert fires.

"Best" is Frigate's choice: the highest score among frames where the box is not cut by the frame's edge (a car
half out of the picture is a poor picture even at a high score); a track that was never whole keeps its best
cut one. Frames are copied out of shared memory only when some track's best improves, and one copy serves every
track whose best it is, so memory is bounded by the live tracks, not by the frames.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from streamer.zones import _grown


class SnapshotKeeper:
    """Best frames of one stream's tracks, by row (see `zones.TrackRows`)."""

    def __init__(self, directory: Path, *, quality: int = 85, crop: bool = True, edge_margin: float = 2.0,
                 min_improvement: float = 0.02, capacity: int = 64) -> None:
        self.directory, self.quality, self.crop, self.edge_margin = Path(directory), quality, crop, edge_margin
        # A best frame is replaced only by a clearly better one: score noise alone would copy a frame each time.
        self.min_improvement = min_improvement
        self.best_rank = np.full(capacity, -np.inf)  # score, +1 when the box is whole: a whole box always wins
        self.best_frame = np.full(capacity, -1, dtype=np.int64)
        self.best_box = np.zeros((capacity, 4))
        self.best_score = np.zeros(capacity)
        self.frames: dict[int, list] = {}  # frame key -> [pixels (H, W, 3) RGB copy, number of rows using it]
        self._next_key = 0

    def grow(self, capacity: int) -> None:
        self.best_rank = _grown(self.best_rank, capacity, -np.inf)
        self.best_frame = _grown(self.best_frame, capacity, -1)
        self.best_box = _grown(self.best_box, capacity, 0.0)
        self.best_score = _grown(self.best_score, capacity, 0.0)

    def offer(self, pixels: np.ndarray, rows: np.ndarray, boxes_xyxy: np.ndarray, scores: np.ndarray) -> None:
        """This frame's matched tracks: rows (T,), boxes_xyxy (T, 4) pixels, scores (T,)."""
        if not len(rows):
            return
        height, width = pixels.shape[:2]
        m = self.edge_margin
        whole = ((boxes_xyxy[:, 0] > m) & (boxes_xyxy[:, 1] > m) & (boxes_xyxy[:, 2] < width - m)
                 & (boxes_xyxy[:, 3] < height - m))
        rank = scores + whole
        better = rank > self.best_rank[rows] + self.min_improvement
        if not better.any():
            return
        key = self._next_key
        self._next_key += 1
        chosen = rows[better]
        self._release(self.best_frame[chosen])
        self.frames[key] = [pixels.copy(), int(chosen.size)]
        self.best_rank[chosen], self.best_frame[chosen] = rank[better], key
        self.best_box[chosen], self.best_score[chosen] = boxes_xyxy[better], scores[better]

    def _release(self, keys: np.ndarray) -> None:
        for key in keys[keys >= 0].tolist():
            entry = self.frames.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self.frames[key]

    def forget(self, row: int) -> None:
        self._release(self.best_frame[row:row + 1])
        self.best_rank[row], self.best_frame[row] = -np.inf, -1

    def has(self, row: int) -> bool:
        return int(self.best_frame[row]) in self.frames

    def write(self, row: int, name: str, label: str) -> str | None:
        """Write `<name>.jpg` (full frame, box drawn) and `<name>-crop.jpg`; returns the full frame's path."""
        entry = self.frames.get(int(self.best_frame[row]))
        if entry is None:
            return None
        pixels = entry[0]
        height, width = pixels.shape[:2]
        x1, y1, x2, y2 = self.best_box[row]
        image = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        crop = None
        if self.crop:
            pad_x, pad_y = 0.1 * (x2 - x1), 0.1 * (y2 - y1)  # a little context around the box
            cx1, cy1 = int(max(0, np.floor(x1 - pad_x))), int(max(0, np.floor(y1 - pad_y)))
            cx2, cy2 = int(min(width, np.ceil(x2 + pad_x))), int(min(height, np.ceil(y2 + pad_y)))
            if cx2 > cx1 and cy2 > cy1:
                crop = image[cy1:cy2, cx1:cx2].copy()
        thickness = max(1, round(min(width, height) / 240))
        cv2.rectangle(image, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), (0, 255, 0),
                      thickness)
        text = f"{label} {self.best_score[row]:.2f}"
        cv2.putText(image, text, (int(x1), max(12, int(y1) - 4)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * thickness, (0, 255, 0), thickness, cv2.LINE_AA)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.jpg"
        _write_jpeg(path, image, self.quality)
        if crop is not None:
            _write_jpeg(self.directory / f"{name}-crop.jpg", crop, self.quality)
        return str(path)


def _write_jpeg(path: Path, image_bgr: np.ndarray, quality: int) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file and retention never
    deletes one being written (it skips `.part` files)."""
    ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"cannot encode {path.name} as JPEG")
    partial = path.with_name(path.name + ".part")
    try:
        partial.write_bytes(data.tobytes())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # retention keeps `.part` files: a full disk must not keep this one
        raise
