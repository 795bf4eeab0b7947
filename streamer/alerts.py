"""Per-stream alerting in the inference worker: zones, lines, rules, snapshots and clips around the tracker.

The worker calls `on_frame` after the tracker on every frame, `on_track_end` for each ended track, and `tick`
on every round (clips wait until `post_capture` has passed). Each returns event bodies `(kind, fields)` for the
worker to send, and the extra fields of track events. Changing zones or rules at run time replaces them here
between two frames, so a change takes effect on the next frame.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from streamer.clips import cut_clip, file_pass_seconds, segment_sources
from streamer.rules import Firing, Rule, RuleEngine
from streamer.snapshots import SnapshotKeeper
from streamer.zones import Line, TrackRows, Zone, ZoneTracker, _grown

log = logging.getLogger("groundwatch.alerts")

LIVE_CLIP_MARGIN_SECONDS = 2.0  # the segment writer's buffered packets reach the disk within this


@dataclass(frozen=True)
class AlertSettings:
    """What the worker needs besides zones and rules (from `[snapshots]`, `[clips]`, `[record]`)."""

    directory: str | None  # <record.directory>/<stream>; None: nothing is written
    source: str | None = None  # the file of a file stream
    video_directory: str | None = None  # recorded segments of a live stream
    snapshots: bool = True
    snapshot_quality: int = 85
    snapshot_crop: bool = True
    snapshot_on_track_end: bool = True
    clips: bool = True
    pre_capture: float = 5.0
    post_capture: float = 5.0


@dataclass
class _PendingClip:
    alert: dict
    start: float
    end: float
    due: float
    path: Path


class StreamAlerts:
    def __init__(self, stream_id: str, run: str, zones: list[Zone], lines: list[Line], rules: list[Rule],
                 settings: AlertSettings, live: bool) -> None:
        self.stream_id, self.run, self.settings, self.live = stream_id, run, settings, live
        self.rows = TrackRows()
        self.zones = ZoneTracker(zones, lines, self.rows)
        self.rules = RuleEngine(stream_id, rules)
        directory = Path(settings.directory) if settings.directory else None
        self.snapshots = None
        if directory is not None and settings.snapshots:
            self.snapshots = SnapshotKeeper(directory / "snapshots", quality=settings.snapshot_quality,
                                            crop=settings.snapshot_crop, capacity=self.rows.capacity)
            self.rows.grown.append(self.snapshots.grow)
        self.clip_directory = directory / "clips" if directory is not None and settings.clips else None
        self.start_time = np.zeros(self.rows.capacity)
        self.top_score = np.zeros(self.rows.capacity)
        self.snapshot_path: dict[int, str] = {}  # row -> written snapshot
        self.clip_path: dict[int, tuple[str, bool]] = {}  # row -> (clip path, written yet)
        self.rows.grown.append(self._grow)
        self.pending: list[_PendingClip] = []
        self._pass_seconds: float | None = None  # one pass of a looped file stream (see _pass_start)
        self.alerts_fired = 0
        self.reported_outside: set[str] = set()
        self._counts_sent: tuple | None = None
        self.changed = True  # zone or line counts may have changed since `counts` was last asked

    def _grow(self, capacity: int) -> None:
        self.start_time = _grown(self.start_time, capacity, 0.0)
        self.top_score = _grown(self.top_score, capacity, 0.0)

    @property
    def active(self) -> bool:
        """Whether there is anything to do beyond the track fields."""
        return bool(self.zones.zones or self.zones.lines or self.rules.rules or self.snapshots)

    def track_uid(self, track_id: int) -> str:
        """An id unique across runs: stream, run, track."""
        return f"{self.stream_id}-{self.run}-{track_id}"

    # -- run-time changes ----------------------------------------------------------------------------------

    def set_places(self, zones: list[Zone], lines: list[Line]) -> None:
        self.zones.set_geometry(zones, lines)
        self.changed = True
        self.reported_outside.clear()
        self.rules.set_rules(self.rules.rules)  # zone presences start afresh, and so do their firings

    def set_rules(self, rules: list[Rule]) -> None:
        self.rules.set_rules(rules)

    # -- per frame ------------------------------------------------------------------------------------------

    def on_frame(self, update, pixels: np.ndarray | None, ts: float, id_base: int = 0,
                 frame_size: tuple[int, int] | None = None) -> tuple[list[tuple[str, dict]], dict[int, dict]]:
        """After the tracker: zone, line and alert events, and the extra fields of each reported track (keyed by
        the published track id: the tracker's id + `id_base`, unique within the stream for the run).
        `pixels` None: no picture of this frame may be kept (a redacted stream whose redaction failed); then
        `frame_size` (width, height) gives the geometry."""
        events: list[tuple[str, dict]] = []
        ids = update.ids + id_base
        if not len(ids):
            return events, {}
        rows, new = self.rows.rows(ids)
        if new.any():
            self.start_time[rows[new]] = ts
            self.top_score[rows[new]] = 0.0
        matched = update.detection_indices >= 0  # LOST tracks keep their zones and sides until seen again
        m_rows, m_ids = rows[matched], ids[matched]
        boxes_xyxy = np.asarray(update.boxes_xyxy)[matched]  # (M, 4) pixels
        scores = np.asarray(update.scores)[matched]
        phrases = [p for p, keep in zip(update.labels, matched.tolist()) if keep]
        self.top_score[m_rows] = np.maximum(self.top_score[m_rows], scores)
        height, width = pixels.shape[:2] if pixels is not None else frame_size[::-1]
        zone_events, line_events = self.zones.update(ts, m_ids, m_rows, boxes_xyxy, phrases, width, height)
        self._report_outside(width, height, events)
        if zone_events:
            counts = self.zones.zone_counts(list(self.rows.row_of.values()))
            for fields in zone_events:
                fields = self._zone_fields(fields, ts)
                fields["count"] = counts[fields["zone"]]
                events.append(("zone", fields))
        self.changed = bool(zone_events or line_events)
        for fields in line_events:
            fields = dict(fields)
            fields.pop("row")
            fields["id"] = self.track_uid(fields["track_id"])
            events.append(("line", fields))
        if self.snapshots is not None and pixels is not None:
            self.snapshots.offer(pixels, m_rows, boxes_xyxy, scores)
        firings = self.rules.evaluate(ts, m_ids, m_rows, phrases, self.top_score[m_rows], self.start_time[m_rows],
                                      self.zones, line_events)
        phrase_of_row = dict(zip(m_rows.tolist(), phrases))
        box_of_row = dict(zip(m_rows.tolist(), boxes_xyxy.tolist()))
        score_of_row = dict(zip(m_rows.tolist(), scores.tolist()))
        for firing in firings:
            events.append(("alert", self._fire(firing, ts, phrase_of_row[firing.row], box_of_row[firing.row],
                                               score_of_row[firing.row])))
        return events, self._all_track_fields(ids, rows)

    def _all_track_fields(self, ids: np.ndarray, rows: np.ndarray) -> dict[int, dict]:
        """`track_fields` for every reported track at once (100 tracks: the per-frame common case)."""
        current: dict[int, list[str]] = {}
        if self.zones.zones:
            names = self.zones.zone_names
            for k, z in zip(*np.nonzero(self.zones.present[rows])):
                current.setdefault(int(k), []).append(names[z])
        starts = np.round(self.start_time[rows], 6).tolist()
        tops = np.round(self.top_score[rows], 4).tolist()
        entered, snapshots, clips = self.zones.entered_names, self.snapshot_path, self.clip_path
        fields = {}
        for k, (track_id, row) in enumerate(zip(ids.tolist(), rows.tolist())):
            snapshot, clip = snapshots.get(row), clips.get(row)
            fields[track_id] = {
                "id": f"{self.stream_id}-{self.run}-{track_id}", "start_time": starts[k], "top_score": tops[k],
                "current_zones": current.get(k, []), "entered_zones": list(entered.get(row, ())),
                "has_snapshot": snapshot is not None, "snapshot": snapshot,
                "has_clip": bool(clip and clip[1]), "clip": clip[0] if clip else None}
        return fields

    def _report_outside(self, width: int, height: int, events: list) -> None:
        outside = [n for n in self.zones.geometry(width, height).outside if n not in self.reported_outside]
        for name in outside:
            self.reported_outside.add(name)
            events.append(("error", {"message": f"zone or line {name!r} lies outside the {width}x{height} frame: "
                                     "no track can be in it", "error_type": "zone_outside_frame", "fatal": False}))

    def _zone_fields(self, fields: dict, ts: float) -> dict:
        del fields["row"]
        entered_ts = fields.pop("entered_ts")
        fields["id"] = self.track_uid(fields["track_id"])
        if fields["event"] != "entered":
            fields["seconds_in_zone"] = round(max(0.0, ts - entered_ts), 3)
        return fields

    def track_fields(self, row: int, track_id: int) -> dict:
        snapshot = self.snapshot_path.get(row)
        clip = self.clip_path.get(row)
        return {"id": self.track_uid(track_id), "start_time": round(float(self.start_time[row]), 6), "top_score": round(float(self.top_score[row]), 4),
                "current_zones": self.zones.current_zones(row), "entered_zones": self.zones.entered_zones(row),
                "has_snapshot": snapshot is not None, "snapshot": snapshot,
                "has_clip": bool(clip and clip[1]), "clip": clip[0] if clip else None}

    def _fire(self, firing: Firing, ts: float, phrase: str, box: list, score: float) -> dict:
        self.alerts_fired += 1
        track_uid = self.track_uid(firing.track_id)
        alert_id = f"{track_uid}-{firing.rule.name}-{self.alerts_fired}"
        snapshot = None
        if self.snapshots is not None and self.snapshots.has(firing.row):
            snapshot = self._write_snapshot(firing.row, track_uid, phrase)
        fields = {"event": "fired", "rule": firing.rule.name, "alert_id": alert_id, "id": track_uid,
                  "track_id": firing.track_id, "phrase": phrase, "score": round(score, 4),
                  "top_score": round(float(self.top_score[firing.row]), 4), "box": [round(v, 2) for v in box],
                  "zone": firing.zone, "line": firing.line, "direction": firing.direction,
                  "start_time": round(float(self.start_time[firing.row]), 6),
                  "presence_start": round(firing.presence_start, 6),
                  "has_snapshot": snapshot is not None, "snapshot": snapshot, "has_clip": False, "clip": None}
        clip = self._plan_clip(fields, ts, firing.row)
        if clip is not None:
            fields["clip"] = str(clip.path)
            fields["clip_due"] = round(clip.due, 3)
        return fields

    def _write_snapshot(self, row: int, track_uid: str, phrase: str) -> str | None:
        try:
            path = self.snapshots.write(row, track_uid, phrase)
        except OSError as exc:
            log.error("%s: snapshot %s not written: %s", self.stream_id, track_uid, exc)
            return None
        if path is not None:
            self.snapshot_path[row] = path
        return path

    def _plan_clip(self, alert: dict, ts: float, row: int) -> _PendingClip | None:
        s = self.settings
        if self.clip_directory is None or not (s.source or s.video_directory):
            return None
        start, end = ts - s.pre_capture, ts + s.post_capture
        due = end + (LIVE_CLIP_MARGIN_SECONDS if self.live else 0.0)
        clip = _PendingClip(alert, max(0.0, start) if not self.live else start, end, due,
                            self.clip_directory / f"{alert['alert_id']}.mp4")
        self.pending.append(clip)
        self.clip_path[row] = (str(clip.path), False)
        return clip

    # -- track end, time passing -----------------------------------------------------------------------------

    def on_track_end(self, track_id: int, phrase: str, ts: float) -> tuple[list[tuple[str, dict]], dict]:
        """A track ended: it leaves its zones; its snapshot is written. Returns events and its track fields."""
        row = self.rows.row_of.get(int(track_id))
        if row is None:
            return [], {"id": self.track_uid(track_id), "start_time": ts, "top_score": 0.0, "current_zones": [],
                        "entered_zones": [],
                        "has_snapshot": False, "snapshot": None, "has_clip": False, "clip": None}
        events = [("zone", self._zone_fields(f, ts)) for f in self.zones.end_track(track_id, row, phrase)]
        if events:
            counts = self.zones.zone_counts([r for r in self.rows.row_of.values() if r != row])
            for _, fields in events:
                fields["count"] = counts[fields["zone"]]
            self.changed = True
        if (self.snapshots is not None and self.settings.snapshot_on_track_end and self.snapshots.has(row)):
            self._write_snapshot(row, self.track_uid(track_id), phrase)
        fields = self.track_fields(row, track_id)
        if self.snapshots is not None:
            self.snapshots.forget(row)
        self.rules.forget_row(row)
        self.snapshot_path.pop(row, None)
        self.clip_path.pop(row, None)
        self.rows.release(track_id)
        return events, fields

    def tick(self, ts: float | None, finished: bool = False) -> list[tuple[str, dict]]:
        """Cut the clips whose `post_capture` has passed (`ts`: the stream's latest frame time; live streams go
        by the wall clock). `finished`: the file ended, cut what is pending now."""
        if not self.pending:
            return []
        now = time.time() if self.live else ts
        events = []
        waiting = []
        for clip in self.pending:
            if not finished and (now is None or now < clip.due):
                waiting.append(clip)
                continue
            events.append(("alert", self._cut(clip)))
        self.pending = waiting
        return events

    def _cut(self, clip: _PendingClip) -> dict:
        fields = {k: clip.alert[k] for k in ("rule", "alert_id", "id", "track_id", "phrase", "zone", "line",
                                             "direction")}
        try:
            if self.live or not self.settings.source:  # a redacted file: its redacted recording
                sources = segment_sources(self.settings.video_directory, clip.start, clip.end)
            else:  # the file itself, from the pass of it (`loop = true`) the clip begins in
                sources = [(Path(self.settings.source), self._pass_start(clip.start))]
            first, last = cut_clip(sources, clip.path, clip.start, clip.end)
        except (ValueError, OSError, av.FFmpegError) as exc:
            log.error("%s: clip %s not written: %s", self.stream_id, clip.path.name, exc)
            return {**fields, "event": "clip_failed", "has_clip": False, "clip": None, "message": str(exc)}
        for row, (path, _) in list(self.clip_path.items()):
            if path == str(clip.path):
                self.clip_path[row] = (path, True)
        return {**fields, "event": "clip_ready", "has_clip": True, "clip": str(clip.path),
                "clip_start": round(first, 6), "clip_end": round(last, 6)}

    def _pass_start(self, ts: float) -> float:
        """Where on the stream's clock the pass of a looped file holding `ts` began (0 on the first pass): a
        looped file's times go on from pass to pass, the file's own start again at zero."""
        if self._pass_seconds is None:
            self._pass_seconds = file_pass_seconds(self.settings.source)
        passes = int((ts + 1e-6) // self._pass_seconds) if self._pass_seconds > 0 else 0
        return passes * self._pass_seconds

    def counts(self) -> tuple[dict, dict] | None:
        """(tracks in each zone, line counts) when they changed since the last call, else None."""
        if not self.changed:
            return None
        self.changed = False
        zones = self.zones.zone_counts(list(self.rows.row_of.values()))
        lines = {name: {p: dict(c) for p, c in counts.items()} for name, counts in self.zones.line_counts.items()}
        key = (tuple(zones.items()), repr(lines))
        if key == self._counts_sent:
            return None
        self._counts_sent = key
        return zones, lines


def stream_alert_args(config, stream, run: str, video_directory: str | None, places=None, rules=None) -> dict:
    """The picklable arguments of `build_stream_alerts` for one stream, from the typed config (the one place
    the config's zones, lines, rules, `[snapshots]` and `[clips]` are read). `places`/`rules`: the ones set at
    run time, which replace the config's."""
    from streamer.rules import build_rules
    from streamer.zones import build_zones

    places = places if places is not None else stream
    zones, lines = build_zones(places.zones, places.lines)
    directory = str(Path(config.record.directory) / stream.id) if config.record.enabled else None
    # A redacted file's clips come from its redacted recording (record_video), never from the raw source file.
    source = None if stream.is_live or getattr(stream, "redact", None) else stream.url
    settings = AlertSettings(
        directory=directory, source=source, video_directory=video_directory,
        snapshots=config.snapshots.enabled, snapshot_quality=config.snapshots.quality,
        snapshot_crop=config.snapshots.crop, snapshot_on_track_end=config.snapshots.on_track_end,
        clips=config.clips.enabled, pre_capture=config.clips.pre_capture, post_capture=config.clips.post_capture)
    return {"stream_id": stream.id, "run": run, "zones": zones, "lines": lines,
            "rules": build_rules(rules if rules is not None else config.rules), "settings": settings,
            "live": stream.is_live}


def build_stream_alerts(**kwargs) -> StreamAlerts:
    return StreamAlerts(**kwargs)
