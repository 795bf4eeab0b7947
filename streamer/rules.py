"""Rules in words: when a track of a phrase (in a zone, or crossing a line) becomes an alert.

A rule names a phrase as the detector writes it ("white van"), optionally a zone or a line of its stream, and
fires once per *presence*: once per track without a zone; once per entry into the zone (leave and come back:
a new presence); once per crossing of a line. `min_seconds` is how long the track must have been present (in
the zone, or at all) and `min_score` the least score the track has reached. `cooldown_seconds` silences the
rule on that stream after it fires; a presence that still qualifies when the cooldown is over fires then (one
that ended inside the cooldown does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.zones import normalize_phrase


@dataclass(frozen=True)
class Rule:
    name: str
    phrase: str  # normalised
    stream: str | None = None  # None: every stream
    zone: str | None = None
    line: str | None = None
    direction: str | None = None  # lines: "in", "out" or None for both
    min_seconds: float = 0.0
    min_score: float = 0.0
    cooldown_seconds: float = 0.0


def build_rules(rule_configs) -> list[Rule]:
    """Rules from the config's `[[rules]]` tables (already validated)."""
    return [Rule(name=r.name, phrase=normalize_phrase(r.phrase), stream=None if r.stream in (None, "*") else r.stream,
                 zone=r.zone, line=r.line, direction=r.direction, min_seconds=r.min_seconds, min_score=r.min_score,
                 cooldown_seconds=r.cooldown_seconds) for r in rule_configs]


@dataclass
class Firing:
    rule: Rule
    row: int
    track_id: int
    presence_start: float  # when the presence began (track start, zone entry, or the crossing)
    zone: str | None = None
    line: str | None = None
    direction: str | None = None


class RuleEngine:
    """The rules of one stream and which presences they have fired for."""

    def __init__(self, stream_id: str, rules: list[Rule]) -> None:
        self.stream_id = stream_id
        self.rules: list[Rule] = []
        self._fired: set[tuple[str, int, float]] = set()  # (rule, row, presence start)
        self._last_fired: dict[str, float] = {}
        self.set_rules(rules)

    def set_rules(self, rules: list[Rule]) -> None:
        """Replace the rules; a rule that stays exactly the same keeps its cooldown and what it fired for."""
        mine = [r for r in rules if r.stream in (None, self.stream_id)]
        kept = {r.name for r in mine if r in self.rules}
        self.rules = mine
        self._fired = {f for f in self._fired if f[0] in kept}
        self._last_fired = {name: ts for name, ts in self._last_fired.items() if name in kept}
        self._phrase_code: dict[str, int] = {}
        self._table = np.zeros((0, len(self.rules)), dtype=bool)  # (P, R): rule r is about phrase p

    def forget_row(self, row: int) -> None:
        self._fired = {f for f in self._fired if f[1] != row}

    def _matches(self, phrases: list[str]) -> np.ndarray:
        """(T, R) bool: the rules whose phrase is each detector phrase."""
        code_of = self._phrase_code
        for phrase in set(phrases) - code_of.keys():
            key = normalize_phrase(phrase)
            code_of[phrase] = len(code_of)
            row = [[normalize_phrase(r.phrase) == key for r in self.rules]]
            self._table = np.vstack([self._table, row]).astype(bool)
        return self._table[np.fromiter((code_of[p] for p in phrases), dtype=np.int64, count=len(phrases))]

    def evaluate(self, ts: float, ids: np.ndarray, rows: np.ndarray, phrases: list[str], top_scores: np.ndarray,
                 start_times: np.ndarray, zones, line_events: list[dict]) -> list[Firing]:
        """Rules that fire on this frame. ids, rows, top_scores, start_times: (T,) for the tracks matched on
        this frame; `zones` the stream's ZoneTracker; line_events this frame's crossings."""
        if not self.rules or not len(rows):
            return []
        matches = self._matches(phrases)  # (T, R)
        wanted = matches.any(axis=0)
        firings: list[Firing] = []
        for index, rule in enumerate(self.rules):
            if not wanted[index]:
                continue
            candidates = matches[:, index] & (top_scores >= rule.min_score)
            if not candidates.any():
                continue
            if rule.line is not None:
                row_ok = {int(rows[k]) for k in np.flatnonzero(candidates)}
                for crossing in line_events:
                    if crossing["line"] == rule.line and crossing["row"] in row_ok and \
                            rule.direction in (None, crossing["direction"]):
                        if self._cooling(rule, ts):
                            break  # a crossing is an instant: one inside the cooldown is not an alert
                        firings.append(Firing(rule, crossing["row"], crossing["track_id"], ts, line=rule.line,
                                              direction=crossing["direction"]))
                        self._last_fired[rule.name] = ts
                continue
            if rule.zone is not None:
                if rule.zone not in zones.zone_names:
                    continue
                z = zones.zone_names.index(rule.zone)
                since = zones.entered_ts[rows, z]
                candidates &= zones.present[rows, z]
            else:
                since = start_times
            candidates &= ts - since >= rule.min_seconds
            for k in np.flatnonzero(candidates):
                key = (rule.name, int(rows[k]), float(since[k]))
                if key in self._fired:
                    continue
                if self._cooling(rule, ts):
                    break
                self._fired.add(key)
                self._last_fired[rule.name] = ts
                firings.append(Firing(rule, int(rows[k]), int(ids[k]), float(since[k]), zone=rule.zone))
        return firings

    def _cooling(self, rule: Rule, ts: float) -> bool:
        last = self._last_fired.get(rule.name)
        return last is not None and ts - last < rule.cooldown_seconds
