"""Zones and lines: where a track is, and when it crosses.

A track is placed by one anchor point of its box (bottom centre by default: where a person or a car touches the
ground). Everything per frame is vectorised over tracks x zones (x polygon edges) and tracks x lines, so 100
tracks and 20 zones cost a few hundred microseconds.

Zones (Frigate's model): a track *enters* a zone once its anchor has been inside for `inertia` consecutive
frames, and *leaves* after `inertia` consecutive frames outside, so a box flickering on the edge produces one
entry, not one per frame. A track present for `loitering_seconds` loiters (once per presence).

Lines (what supervision's `LineZone` and DeepStream's line crossing do, without their reported faults): a side
is settled after `min_frames` consecutive frames on it, and a crossing is a change of settled side. A box
jittering on the line never settles on the far side, so it counts nothing. Only confirmed tracks count, each by
its own id (supervision counted every detection without a tracker id as one object). An anchor beyond the
segment's ends forgets the settled side: walking around the end of a line is not a crossing.

Coordinates: polygons and line ends are pixels of the processed frame, or fractions of its width and height
(`normalized`). Rows: state lives in arrays indexed by a row per track (`TrackRows`), shared with the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ANCHORS: dict[str, tuple[float, float]] = {  # fraction of the box's width and height from its top-left corner
    "bottom_center": (0.5, 1.0),
    "center": (0.5, 0.5),
    "top_center": (0.5, 0.0),
    "bottom_left": (0.0, 1.0),
    "bottom_right": (1.0, 1.0),
    "top_left": (0.0, 0.0),
    "top_right": (1.0, 0.0),
}
DIRECTIONS: dict[str, tuple[float, float]] = {"up": (0.0, -1.0), "down": (0.0, 1.0), "left": (-1.0, 0.0),
                                              "right": (1.0, 0.0)}


def normalize_phrase(phrase: str) -> str:
    """'  Red  circle .' -> 'red circle': how a rule's or zone's phrase is compared with the detector's."""
    return " ".join(str(phrase).replace(".", " ").lower().split())


# -- geometry checks (the config validates with these) ---------------------------------------------------------


def _first_crossing(pts: np.ndarray) -> tuple[int, int] | None:
    """The first pair (i, j), i < j, of non-adjacent edges of the closed polygon `pts` that touch or cross, or None.
    Edge k runs from point k to point k + 1. All pairs at once (numpy): a request of 256 zones of 64 corners took
    the supervisor 2-4 s edge pair by edge pair in Python."""
    count = len(pts)
    a, b = pts, np.roll(pts, -1, axis=0)  # (n, 2) edge starts and ends

    def orient(p, q, r):  # sign of the turn p -> q -> r, broadcast over edge pairs
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

    def on_segment(p, q, r):  # r within the bounding box of segment p-q
        return ((np.minimum(p[..., 0], q[..., 0]) <= r[..., 0]) & (r[..., 0] <= np.maximum(p[..., 0], q[..., 0]))
                & (np.minimum(p[..., 1], q[..., 1]) <= r[..., 1]) & (r[..., 1] <= np.maximum(p[..., 1], q[..., 1])))

    p1, p2 = a[:, None, :], b[:, None, :]  # edge i along rows
    q1, q2 = a[None, :, :], b[None, :, :]  # edge j along columns
    d1, d2, d3, d4 = orient(q1, q2, p1), orient(q1, q2, p2), orient(p1, p2, q1), orient(p1, p2, q2)
    proper = ((d1 > 0) != (d2 > 0)) & ((d3 > 0) != (d4 > 0)) & (d1 != 0) & (d2 != 0) & (d3 != 0) & (d4 != 0)
    touching = (((d1 == 0) & on_segment(q1, q2, p1)) | ((d2 == 0) & on_segment(q1, q2, p2))
                | ((d3 == 0) & on_segment(p1, p2, q1)) | ((d4 == 0) & on_segment(p1, p2, q2)))
    i, j = np.indices((count, count))
    adjacent = (j == (i + 1) % count) | (i == (j + 1) % count)  # they share a point
    hits = np.argwhere((proper | touching) & (j > i) & ~adjacent)  # row-major: the first i, then the first j
    return (int(hits[0, 0]), int(hits[0, 1])) if len(hits) else None


def polygon_problem(points) -> str | None:
    """Why a polygon cannot be a zone (fewer than 3 points, zero area, repeated points, self-intersecting),
    or None when it can."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        return "a polygon is a list of [x, y] points"
    if len(pts) < 3:
        return f"a polygon needs at least 3 points, got {len(pts)}"
    if not np.isfinite(pts).all():
        return "polygon points must be finite numbers"
    repeated = np.flatnonzero((pts == np.roll(pts, -1, axis=0)).all(axis=1))
    if len(repeated):
        return f"point {int(repeated[0])} is repeated"
    crossing = _first_crossing(pts)
    if crossing is not None:
        return f"the polygon intersects itself (edge {crossing[0]} crosses edge {crossing[1]})"
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    extent = float(np.ptp(pts, axis=0).max())
    if area <= 1e-9 * max(extent, 1.0) ** 2:
        return "the polygon is degenerate (zero area: its points are on one line)"
    return None


def line_problem(start, end, direction) -> str | None:
    """Why two end points and an `in` direction cannot be a line, or None."""
    a, b = np.asarray(start, np.float64), np.asarray(end, np.float64)
    if a.shape != (2,) or b.shape != (2,) or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return "line ends are [x, y] points"
    if np.allclose(a, b):
        return "the line's two ends are the same point"
    d = b - a
    v = np.asarray(DIRECTIONS.get(direction, direction) if isinstance(direction, str) else direction, np.float64)
    if abs(d[0] * v[1] - d[1] * v[0]) < 1e-9 * float(np.hypot(*d)) * max(float(np.hypot(*v)), 1e-12):
        return f"the 'in' direction {direction!r} runs along the line: it must point across it"
    return None


# -- definitions -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Zone:
    name: str
    polygon: tuple[tuple[float, float], ...]  # (K, 2) x, y
    normalized: bool = True  # fractions of the frame's width / height, else pixels
    phrases: frozenset[str] | None = None  # normalised phrases that count; None: all
    inertia: int = 3
    loitering_seconds: float = 0.0  # 0: no loitering events
    anchor: str = "bottom_center"


@dataclass(frozen=True)
class Line:
    name: str
    start: tuple[float, float]
    end: tuple[float, float]
    direction: tuple[float, float]  # a crossing moving this way is "in"
    normalized: bool = True
    phrases: frozenset[str] | None = None
    min_frames: int = 2
    anchor: str = "bottom_center"


def build_zones(zone_configs, line_configs) -> tuple[list[Zone], list[Line]]:
    """Zones and lines from the config's `[[streams.zones]]` / `[[streams.lines]]` tables (already validated)."""
    zones = [
        Zone(name=z.name, polygon=tuple(tuple(map(float, p)) for p in z.polygon),
             normalized=z.coordinates == "normalized",
             phrases=frozenset(normalize_phrase(p) for p in z.phrases) if z.phrases else None,
             inertia=z.inertia, loitering_seconds=z.loitering_seconds, anchor=z.anchor)
        for z in zone_configs
    ]
    lines = [
        Line(name=l.name, start=tuple(map(float, l.start)), end=tuple(map(float, l.end)),
             direction=tuple(map(float, DIRECTIONS[l.in_direction] if isinstance(l.in_direction, str)
                                 else l.in_direction)),
             normalized=l.coordinates == "normalized",
             phrases=frozenset(normalize_phrase(p) for p in l.phrases) if l.phrases else None,
             min_frames=l.min_frames, anchor=l.anchor)
        for l in line_configs
    ]
    return zones, lines


# -- per-track rows ---------------------------------------------------------------------------------------------


class TrackRows:
    """A row per live track id, reused after the track ends; per-row arrays elsewhere grow with `capacity`."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self.row_of: dict[int, int] = {}
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self.grown: list = []  # callbacks(new_capacity) of the owners of per-row arrays

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T,) rows of `ids`, new ids given fresh rows; and a (T,) mask of the new ones."""
        row_of = self.row_of
        rows = np.empty(len(ids), dtype=np.int64)
        new = np.zeros(len(ids), dtype=bool)
        for k, track_id in enumerate(ids.tolist()):
            row = row_of.get(track_id)
            if row is None:
                if not self._free:
                    self._grow()
                row = self._free.pop()
                row_of[track_id] = row
                new[k] = True
            rows[k] = row
        return rows, new

    def release(self, track_id: int) -> int | None:
        row = self.row_of.pop(int(track_id), None)
        if row is not None:
            self._free.append(row)
        return row

    def _grow(self) -> None:
        old, self.capacity = self.capacity, self.capacity * 2
        self._free.extend(range(self.capacity - 1, old - 1, -1))
        for callback in self.grown:
            callback(self.capacity)


def _grown(array: np.ndarray, capacity: int, fill) -> np.ndarray:
    bigger = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    bigger[: array.shape[0]] = array
    return bigger


def anchor_points(boxes_xyxy: np.ndarray, anchor: str) -> np.ndarray:
    """(T, 4) xyxy pixels -> (T, 2) x, y pixels of the anchor."""
    fx, fy = ANCHORS[anchor]
    x = boxes_xyxy[:, 0] + fx * (boxes_xyxy[:, 2] - boxes_xyxy[:, 0])
    y = boxes_xyxy[:, 1] + fy * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    return np.stack([x, y], axis=1)


def points_in_polygons(points: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                       bounds: np.ndarray | None = None) -> np.ndarray:
    """Even-odd rule. points (T, Z, 2); polygon edges starts/ends (Z, K, 2), padded by repeating the last
    vertex (a zero-length edge never straddles); bounds (Z, 4) x1, y1, x2, y2 of each polygon, optional.
    Returns (T, Z) bool. Only the (track, zone) pairs inside a zone's bounding box run the edge test: most
    tracks are far from most zones."""
    if bounds is None:
        bounds = np.concatenate([starts.min(axis=1), starts.max(axis=1)], axis=1)
    px, py = points[..., 0], points[..., 1]  # (T, Z)
    near = (px >= bounds[:, 0]) & (px <= bounds[:, 2]) & (py >= bounds[:, 1]) & (py <= bounds[:, 3])
    inside = np.zeros(near.shape, dtype=bool)
    t, z = np.nonzero(near)
    if not t.size:
        return inside
    qx, qy = px[t, z][:, None], py[t, z][:, None]  # (N, 1)
    x1, y1, x2, y2 = starts[z, :, 0], starts[z, :, 1], ends[z, :, 0], ends[z, :, 1]  # (N, K)
    straddles = (y1 > qy) != (y2 > qy)
    dy = y2 - y1
    slope = np.divide(x2 - x1, dy, out=np.zeros_like(dy), where=dy != 0)
    crossings = straddles & (qx < x1 + (qy - y1) * slope)
    inside[t, z] = (np.count_nonzero(crossings, axis=1) & 1).astype(bool)
    return inside


@dataclass
class _Geometry:
    """Zones and lines in pixels for one frame size."""

    edge_starts: np.ndarray  # (Z, K, 2)
    edge_ends: np.ndarray  # (Z, K, 2)
    bounds: np.ndarray  # (Z, 4) x1, y1, x2, y2 pixels
    line_starts: np.ndarray  # (L, 2)
    line_vectors: np.ndarray  # (L, 2) end - start
    line_in_sides: np.ndarray  # (L,) +1 / -1: the side a track reaches when it crosses "in"
    outside: list[str] = field(default_factory=list)  # names of zones/lines wholly outside the frame


# -- the per-stream state ----------------------------------------------------------------------------------------


class ZoneTracker:
    """Zone presence and line crossings of one stream's tracks. Not thread-safe; one per stream."""

    def __init__(self, zones: list[Zone], lines: list[Line], rows: TrackRows) -> None:
        self.rows = rows
        rows.grown.append(self._grow)
        self.set_geometry(zones, lines)

    def set_geometry(self, zones: list[Zone], lines: list[Line]) -> None:
        """New zones and lines (at start, or changed at run time): presence and sides start afresh, line
        counts of lines that keep their name are kept."""
        self.zones, self.lines = list(zones), list(lines)
        capacity, Z, L = self.rows.capacity, len(zones), len(lines)
        self.zone_names = [z.name for z in zones]
        self.inertia = np.array([z.inertia for z in zones], dtype=np.int32)  # (Z,)
        self.loiter_after = np.array([z.loitering_seconds if z.loitering_seconds > 0 else np.inf for z in zones])
        self.min_frames = np.array([l.min_frames for l in lines], dtype=np.int32)  # (L,)
        self.in_streak = np.zeros((capacity, Z), dtype=np.int32)
        self.out_streak = np.zeros((capacity, Z), dtype=np.int32)
        self.present = np.zeros((capacity, Z), dtype=bool)
        self.entered_ts = np.zeros((capacity, Z), dtype=np.float64)
        self.loitered = np.zeros((capacity, Z), dtype=bool)
        self.settled_side = np.zeros((capacity, L), dtype=np.int8)
        self.streak_side = np.zeros((capacity, L), dtype=np.int8)
        self.streak_len = np.zeros((capacity, L), dtype=np.int32)
        self.entered_names: dict[int, list[str]] = {}  # row -> zones entered so far, in order
        previous = getattr(self, "line_counts", {})
        self.line_counts: dict[str, dict[str, dict[str, int]]] = {l.name: previous.get(l.name, {}) for l in lines}
        self._geometry: dict[tuple[int, int], _Geometry] = {}
        self._phrase_code: dict[str, int] = {}
        self._zone_table = np.zeros((0, Z), dtype=bool)  # (P, Z): a track of phrase p counts in zone z
        self._line_table = np.zeros((0, L), dtype=bool)
        self._anchor_of_zone = [z.anchor for z in zones]
        self._anchor_of_line = [l.anchor for l in lines]
        self._anchors = sorted(set(self._anchor_of_zone) | set(self._anchor_of_line))
        self._zone_anchor_index = np.array([self._anchors.index(a) for a in self._anchor_of_zone], dtype=np.int64)
        self._line_anchor_index = np.array([self._anchors.index(a) for a in self._anchor_of_line], dtype=np.int64)

    def _grow(self, capacity: int) -> None:
        for name, fill in (("in_streak", 0), ("out_streak", 0), ("present", False), ("entered_ts", 0.0),
                           ("loitered", False), ("settled_side", 0), ("streak_side", 0), ("streak_len", 0)):
            setattr(self, name, _grown(getattr(self, name), capacity, fill))

    def geometry(self, width: int, height: int) -> _Geometry:
        key = (width, height)
        found = self._geometry.get(key)
        if found is not None:
            return found
        scale = np.array([width, height], dtype=np.float64)
        most = max([len(z.polygon) for z in self.zones], default=1)
        starts = np.zeros((len(self.zones), most, 2))
        outside = []
        for index, zone in enumerate(self.zones):
            pts = np.asarray(zone.polygon, dtype=np.float64) * (scale if zone.normalized else 1.0)
            padded = np.concatenate([pts, np.repeat(pts[-1:], most - len(pts), axis=0)])
            starts[index] = padded
            if (pts[:, 0].max() < 0 or pts[:, 0].min() > width or pts[:, 1].max() < 0
                    or pts[:, 1].min() > height):
                outside.append(zone.name)
        # Edge k runs from vertex k to vertex k+1 (the last back to the first; padding edges have zero length).
        ends = np.roll(starts, -1, axis=1)
        for index, zone in enumerate(self.zones):
            ends[index, len(zone.polygon) - 1] = starts[index, 0]
            ends[index, len(zone.polygon):] = starts[index, len(zone.polygon) - 1]
        line_starts = np.zeros((len(self.lines), 2))
        line_vectors = np.zeros((len(self.lines), 2))
        in_sides = np.zeros(len(self.lines), dtype=np.int8)
        for index, line in enumerate(self.lines):
            factor = scale if line.normalized else 1.0
            a = np.asarray(line.start) * factor
            b = np.asarray(line.end) * factor
            line_starts[index], line_vectors[index] = a, b - a
            d, v = b - a, np.asarray(line.direction)
            in_sides[index] = 1 if d[0] * v[1] - d[1] * v[0] > 0 else -1
            if max(a[0], b[0]) < 0 or min(a[0], b[0]) > width or max(a[1], b[1]) < 0 or min(a[1], b[1]) > height:
                outside.append(line.name)
        bounds = np.concatenate([starts.min(axis=1), starts.max(axis=1)], axis=1)
        found = _Geometry(starts, ends, bounds, line_starts, line_vectors, in_sides, outside)
        self._geometry[key] = found
        return found

    def _codes(self, phrases: list[str]) -> np.ndarray:
        """(T,) row of each phrase in the zone and line tables (rows added for phrases not seen before)."""
        code_of = self._phrase_code
        for phrase in set(phrases) - code_of.keys():
            key = normalize_phrase(phrase)
            code_of[phrase] = len(code_of)
            self._zone_table = np.vstack([self._zone_table, [[z.phrases is None or key in z.phrases
                                                             for z in self.zones]]]).astype(bool)
            self._line_table = np.vstack([self._line_table, [[l.phrases is None or key in l.phrases
                                                             for l in self.lines]]]).astype(bool)
        return np.fromiter((code_of[p] for p in phrases), dtype=np.int64, count=len(phrases))

    def update(self, ts: float, ids: np.ndarray, rows: np.ndarray, boxes_xyxy: np.ndarray, phrases: list[str],
               width: int, height: int) -> tuple[list[dict], list[dict]]:
        """Advance the tracks matched on this frame. ids, rows (T,); boxes_xyxy (T, 4) pixels.

        Returns (zone events, line events) as dicts of event fields.
        """
        zone_events: list[dict] = []
        line_events: list[dict] = []
        if not len(rows) or not (self.zones or self.lines):
            return zone_events, line_events
        geometry = self.geometry(width, height)
        anchors = np.stack([anchor_points(boxes_xyxy, a) for a in self._anchors], axis=1)  # (T, A, 2)
        codes = self._codes(phrases)
        zone_mask, line_mask = self._zone_table[codes], self._line_table[codes]  # (T, Z), (T, L)
        if self.zones:
            zone_events = self._update_zones(ts, ids, rows, anchors[:, self._zone_anchor_index], zone_mask,
                                             geometry, phrases)
        if self.lines:
            line_events = self._update_lines(ids, rows, anchors[:, self._line_anchor_index], line_mask, geometry,
                                             phrases)
        return zone_events, line_events

    def _update_zones(self, ts, ids, rows, points, allowed, geometry, phrases) -> list[dict]:
        inside = points_in_polygons(points, geometry.edge_starts, geometry.edge_ends, geometry.bounds) & allowed
        in_streak = np.where(inside, self.in_streak[rows] + 1, 0)
        out_streak = np.where(inside, 0, self.out_streak[rows] + 1)
        was = self.present[rows]
        enters = ~was & (in_streak >= self.inertia)
        leaves = was & (out_streak >= self.inertia)
        present = (was | enters) & ~leaves
        entered_ts = np.where(enters, ts, self.entered_ts[rows])
        loitered = self.loitered[rows] & ~leaves
        loiters = present & ~loitered & (ts - entered_ts >= self.loiter_after)
        self.in_streak[rows], self.out_streak[rows] = in_streak, out_streak
        self.present[rows], self.entered_ts[rows] = present, entered_ts
        self.loitered[rows] = loitered | loiters
        events = []
        if enters.any() or leaves.any() or loiters.any():
            for kind, mask in (("left", leaves), ("entered", enters), ("loitering", loiters)):
                for k, z in zip(*np.nonzero(mask)):
                    row = int(rows[k])
                    name = self.zone_names[z]
                    if kind == "entered":
                        self.entered_names.setdefault(row, [])
                        if name not in self.entered_names[row]:
                            self.entered_names[row].append(name)
                    events.append({"event": kind, "zone": name, "track_id": int(ids[k]), "phrase": phrases[k],
                                   "row": row, "entered_ts": float(entered_ts[k, z])})
        return events

    def _update_lines(self, ids, rows, points, allowed, geometry, phrases) -> list[dict]:
        relative = points - geometry.line_starts[None]  # (T, L, 2)
        vectors = geometry.line_vectors[None]  # (1, L, 2)
        cross = vectors[..., 0] * relative[..., 1] - vectors[..., 1] * relative[..., 0]  # (T, L)
        along = (relative * vectors).sum(-1) / (vectors * vectors).sum(-1)  # (T, L) 0..1 within the segment
        within = (along >= 0) & (along <= 1)
        side = np.sign(cross).astype(np.int8)
        observed = allowed & within & (side != 0)  # on the line exactly, or another phrase: no information
        beyond = allowed & ~within  # past an end: the settled side is forgotten
        streak_side, streak_len = self.streak_side[rows], self.streak_len[rows]
        settled_side = self.settled_side[rows]
        same = side == streak_side
        streak_len = np.where(observed, np.where(same, streak_len + 1, 1), np.where(beyond, 0, streak_len))
        streak_side = np.where(observed, side, np.where(beyond, 0, streak_side))
        settles = observed & (streak_len >= self.min_frames) & (side != settled_side)
        crossings = settles & (settled_side != 0)
        self.settled_side[rows] = np.where(settles, side, np.where(beyond, 0, settled_side))
        self.streak_side[rows], self.streak_len[rows] = streak_side, streak_len
        events = []
        if crossings.any():
            for k, index in zip(*np.nonzero(crossings)):
                line = self.lines[index]
                direction = "in" if side[k, index] == geometry.line_in_sides[index] else "out"
                phrase = phrases[k]
                counts = self.line_counts[line.name].setdefault(phrase, {"in": 0, "out": 0})
                counts[direction] += 1
                events.append({"line": line.name, "direction": direction, "track_id": int(ids[k]),
                               "phrase": phrase, "row": int(rows[k]),
                               "counts": {p: dict(c) for p, c in self.line_counts[line.name].items()}})
        return events

    def end_track(self, track_id: int, row: int, phrase: str) -> list[dict]:
        """A track ended: it leaves the zones it was in. Returns zone `left` events; clears the row."""
        events = [{"event": "left", "zone": self.zone_names[z], "track_id": int(track_id), "phrase": phrase,
                   "row": row, "entered_ts": float(self.entered_ts[row, z]), "reason": "track_ended"}
                  for z in np.flatnonzero(self.present[row])]
        self.clear_row(row)
        return events

    def clear_row(self, row: int) -> None:
        for array in (self.in_streak, self.out_streak, self.present, self.entered_ts, self.loitered,
                      self.settled_side, self.streak_side, self.streak_len):
            array[row] = 0
        self.entered_names.pop(row, None)

    def current_zones(self, row: int) -> list[str]:
        if not self.zones:
            return []
        return [self.zone_names[z] for z in np.flatnonzero(self.present[row])]

    def entered_zones(self, row: int) -> list[str]:
        return list(self.entered_names.get(row, ()))

    def zone_counts(self, live_rows: list[int]) -> dict[str, int]:
        """Tracks present in each zone now."""
        if not self.zones:
            return {}
        counts = self.present[live_rows].sum(axis=0) if live_rows else np.zeros(len(self.zones), dtype=np.int64)
        return {name: int(c) for name, c in zip(self.zone_names, counts)}
