"""Control-socket schemas of the alerting commands (`set_zones`, `set_rules`), registered by the supervisor.

The request carries the tables as the config writes them; they are validated by `config.parse_places` /
`config.parse_rules`, so a run-time change gets the same checks and the same readable report as the file.
"""

from __future__ import annotations

from typing import Literal

from streamer.control import ControlRequest, StreamId


class SetZonesRequest(ControlRequest):
    cmd: Literal["set_zones"]
    stream: StreamId
    zones: list[dict] = []  # [[streams.zones]] tables
    lines: list[dict] = []  # [[streams.lines]] tables


class SetRulesRequest(ControlRequest):
    cmd: Literal["set_rules"]
    rules: list[dict]  # [[rules]] tables: every rule, replacing the daemon's
