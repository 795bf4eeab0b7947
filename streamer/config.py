"""The daemon's configuration: a TOML file validated once at start-up.

Every section is a pydantic model with unknown keys forbidden, bounds and a description per field; the
`[tracker]` section is built straight into the tracker's own frozen `tracker.TrackerConfig` (pydantic checks its
types and unknown keys, the dataclass its bounds), so there is one definition of it and one set of defaults.
Child processes receive these frozen objects, never dicts. `load_config`
is the one place a file is read; a bad file raises `ConfigError` whose message lists every bad field at once, so
an operator fixes the whole file in one pass instead of one error per restart.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamer.prompts import DEFAULT_MAX_PROMPT_TOKENS, PromptProblem, check_prompt, prompt_problem
from tracker.config import TrackerConfig, TrackerConfigError
from streamer.zones import ANCHORS, DIRECTIONS, line_problem, normalize_phrase, polygon_problem

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
STREAM_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is the full, readable report."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_ZONES, MAX_LINES, MAX_RULES = 256, 256, 1024  # bounds what one request can make the supervisor check
Point = tuple[float, float]


class ZoneConfig(_Section):
    """`[[streams.zones]]`: an area of the picture. A track is in it when its anchor point is inside."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, description="Zone name; used in events and rules.")]
    polygon: Annotated[list[Point], Field(min_length=3, max_length=64, description="[[x, y], ...] corners.")]
    coordinates: Annotated[
        Literal["normalized", "pixels"],
        Field(description="normalized: fractions of the frame's width and height (0..1); pixels: of the "
                          "processed frame."),
    ] = "normalized"
    phrases: Annotated[list[str], Field(description="Only tracks of these phrases count; empty = all.")] = []
    inertia: Annotated[int, Field(ge=1, le=1000, description="Frames in (out) before a track enters (leaves).")] = 3
    loitering_seconds: Annotated[float, Field(ge=0, le=86400, description="Present this long: loitering; 0 = off.")] = 0
    anchor: Annotated[Literal[tuple(ANCHORS)], Field(description="Which point of the box must be inside.")] = (
        "bottom_center"
    )

    @model_validator(mode="after")
    def _valid_polygon(self) -> "ZoneConfig":
        problem = polygon_problem(self.polygon)
        if problem:
            raise ValueError(f"zone {self.name!r}: {problem}")
        check_inside_frame(f"zone {self.name!r}", self.polygon, self.coordinates)
        return self


class LineConfig(_Section):
    """`[[streams.lines]]`: a counting line from `start` to `end`; crossing it towards `in_direction` is "in"."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, description="Line name; used in events and rules.")]
    start: Annotated[Point, Field(description="[x, y] of one end.")]
    end: Annotated[Point, Field(description="[x, y] of the other end.")]
    in_direction: Annotated[
        Literal[tuple(DIRECTIONS)] | Point,
        Field(description="up, down, left, right, or an [dx, dy] vector: crossing this way counts as in."),
    ] = "down"
    coordinates: Annotated[Literal["normalized", "pixels"], Field(description="As for zones.")] = "normalized"
    phrases: Annotated[list[str], Field(description="Only tracks of these phrases count; empty = all.")] = []
    min_frames: Annotated[
        int, Field(ge=1, le=1000, description="Frames on each side before a crossing counts (against jitter).")
    ] = 2
    anchor: Annotated[Literal[tuple(ANCHORS)], Field(description="Which point of the box crosses.")] = (
        "bottom_center"
    )

    @model_validator(mode="after")
    def _valid_line(self) -> "LineConfig":
        problem = line_problem(self.start, self.end, self.in_direction)
        if problem:
            raise ValueError(f"line {self.name!r}: {problem}")
        check_inside_frame(f"line {self.name!r}", [self.start, self.end], self.coordinates)
        return self


def check_inside_frame(what: str, points, coordinates: str) -> None:
    if coordinates == "normalized":
        if any(not (0 <= v <= 1) for point in points for v in point):
            raise ValueError(f"{what} is outside the frame: normalized coordinates are between 0 and 1 "
                             "(or set coordinates = \"pixels\")")
    elif any(v < 0 for point in points for v in point):
        raise ValueError(f"{what} is outside the frame: pixel coordinates cannot be negative")


def _unique_names(items, what: str):
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{what} name {item.name!r} is used twice")
        seen.add(item.name)
    return items


class StreamConfig(_Section):
    id: Annotated[str, Field(pattern=STREAM_ID_PATTERN, description="Stream name; used in topics and paths.")]
    url: Annotated[str, Field(min_length=1, description="rtsp://... for a camera, or a video file path.")]
    prompt: Annotated[str, Field(min_length=1, description="What to look for, in words ('a person . a car .').")]
    mode: Annotated[
        Literal["auto", "live", "file"],
        Field(description="auto: live for network URLs, file for paths. Live keeps only the freshest frame."),
    ] = "auto"
    fps: Annotated[float, Field(ge=0, le=240, description="Process at most this many frames per second; 0 = all.")] = 0
    record_video: Annotated[bool, Field(description="Copy a live source's video to disk in segments (with "
                                               "`redact`: the redacted frames, re-encoded; files too).")] = False
    max_width: Annotated[int, Field(ge=16, le=8192, description="Larger frames are scaled down to fit.")] = 1920
    max_height: Annotated[int, Field(ge=16, le=8192, description="Larger frames are scaled down to fit.")] = 1080
    loop: Annotated[bool, Field(description="Files only: start again at the end (demos, soak tests).")] = False
    realtime: Annotated[bool, Field(description="Files only: deliver frames at the file's frame rate, as a "
                                                "camera would, instead of as fast as they are processed.")] = False
    resources: Annotated[dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")], Annotated[float, Field(gt=0, le=1e6)]],
                         Field(max_length=16, description="With [cluster]: Ray custom resources the stream's decoder "
                                                          "needs, e.g. {\"site-a\" = 1} to run it on the host that "
                                                          "reaches the camera; ignored on one machine.")] = {}

    @field_validator("prompt")
    @classmethod
    def _prompt_has_words(cls, prompt: str) -> str:
        problem = prompt_problem(prompt)  # the same words set_prompt answers with; tokens are counted later
        if problem:
            raise ValueError(problem)
        return prompt
    redact: Annotated[str | None, Field(min_length=1, description=(
        "What to hide, in words ('face . licence plate .'): burnt into everything the daemon lets out for this "
        "stream (recording, previews, snapshots, clips); see docs/editing.md, Live redaction."))] = None
    redact_mode: Annotated[Literal["blur", "pixelate", "fill", "inpaint"], Field(
        description="How redacted regions are hidden.")] = "blur"
    redact_padding: Annotated[float, Field(ge=0, le=2, description=(
        "Each redaction box grows by this fraction of its width and height on every side."))] = 0.2
    redact_carry_frames: Annotated[int, Field(ge=0, le=300, description=(
        "A redacted object the detector misses stays hidden at its predicted place for this many frames."))] = 5

    @field_validator("redact")
    @classmethod
    def _redact_has_words(cls, redact: str | None) -> str | None:
        problem = prompt_problem(redact) if redact is not None else None
        if problem:
            raise ValueError(problem)
        return redact
    zones: Annotated[list[ZoneConfig], Field(max_length=MAX_ZONES,
                                             description="Areas of the picture (see [[streams.zones]]).")] = []
    lines: Annotated[list[LineConfig], Field(max_length=MAX_LINES,
                                             description="Counting lines (see [[streams.lines]]).")] = []

    @field_validator("zones")
    @classmethod
    def _unique_zone_names(cls, zones: list[ZoneConfig]) -> list[ZoneConfig]:
        return _unique_names(zones, "zone")

    @field_validator("lines")
    @classmethod
    def _unique_line_names(cls, lines: list[LineConfig]) -> list[LineConfig]:
        return _unique_names(lines, "line")

    @property
    def is_live(self) -> bool:
        return _is_live(self.url, self.mode)

    @model_validator(mode="after")
    def _file_options_on_files(self) -> "StreamConfig":
        if self.is_live and (self.loop or self.realtime):
            raise ValueError("loop and realtime are for files; a live source is already paced by its camera")
        return self


def _is_live(url: str, mode: str) -> bool:
    if mode != "auto":
        return mode == "live"
    return url.lower().startswith(LIVE_SCHEMES)


class ModelConfig(_Section):
    weights: Annotated[str, Field(min_length=1, description="'default', 'tiny' (random, for tests) or a path.")] = (
        "default"
    )
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N.")] = "cpu"
    dtype: Annotated[Literal["float32", "float16", "bfloat16", "auto"], Field(
        description="Inference dtype of the torch backend; 'auto' = bfloat16 on a CPU with AMX or AVX-512 BF16, "
                    "float32 elsewhere.")] = "float32"
    backend: Annotated[Literal["auto", "torch", "onnxruntime", "openvino"], Field(
        description="Where the image graph runs: torch, onnxruntime (extra groundwatch[onnx]) or openvino (extra "
                    "groundwatch[openvino]); 'auto' = on the CPU the fastest whose parity holds: torch in mixed "
                    "bfloat16 where the CPU has AMX/AVX-512 BF16 and dtype is auto, else OpenVINO, then ONNX "
                    "Runtime, then torch (docs/export.md).")] = "torch"
    onnx: Annotated[str | None, Field(
        description="An exported image graph (groundwatch export) for onnxruntime/openvino; unset = export on "
                    "first use into cache_dir.")] = None
    cache_dir: Annotated[str | None, Field(
        description="Where exported graphs are cached, per weights hash; unset = $GROUNDWATCH_CACHE or "
                    "~/.cache/groundwatch.")] = None
    box_threshold: Annotated[float, Field(ge=0, le=1, description="Minimum box score.")] = 0.35
    text_threshold: Annotated[float, Field(ge=0, le=1, description="Minimum token score for a phrase.")] = 0.25
    batch_size: Annotated[int, Field(ge=1, le=64, description="Most frames per inference call, across streams.")] = 4
    threads: Annotated[int, Field(ge=0, le=256, description="CPU threads for inference; 0 = torch's default.")] = 0
    short_side: Annotated[int, Field(ge=32, le=4096, description="Frames are resized to this short side.")] = 800
    max_side: Annotated[int, Field(ge=32, le=8192, description="...and at most this long side.")] = 1333
    max_prompt_tokens: Annotated[int, Field(ge=8, le=16_384, description=(
        "Longest prompt in tokens (the text encoder reads 256 per pass; each pass costs a detector run)."))] = (
        DEFAULT_MAX_PROMPT_TOKENS)
    watchdog_seconds: Annotated[float, Field(ge=0, le=3600, description="A detector call running longer gets the "
                                             "inference worker restarted (a hung GPU); 0 = never.")] = 120
    oom_recover_seconds: Annotated[float, Field(gt=0, le=86400, description="After an out-of-memory halved the "
                                                "batch size, double it again after this long without one.")] = 60


class LiveConfig(_Section):
    open_timeout_seconds: Annotated[float, Field(gt=0, le=300, description="Give up opening a source after.")] = 5
    read_timeout_seconds: Annotated[float, Field(gt=0, le=300, description="A stalled source is dropped after.")] = 5
    reconnect_initial_seconds: Annotated[float, Field(gt=0, le=300, description="First reconnect delay.")] = 0.5
    reconnect_max_seconds: Annotated[float, Field(gt=0, le=3600, description="Reconnect delay cap.")] = 30
    segment_seconds: Annotated[float, Field(ge=1, le=3600, description="Length of recorded video segments.")] = 60


class PublishConfig(_Section):
    endpoint: Annotated[str, Field(pattern=r"^(tcp|ipc)://", description="ZeroMQ PUB endpoint for events.")] = (
        "tcp://127.0.0.1:5555"
    )
    control_endpoint: Annotated[
        str, Field(pattern=r"^(tcp|ipc)://", description="ZeroMQ REP endpoint (status, prompt changes).")
    ] = "tcp://127.0.0.1:5556"
    high_water_mark: Annotated[
        int, Field(ge=1, le=10_000_000, description="Events queued per subscriber before it loses events.")
    ] = 10_000
    heartbeat_seconds: Annotated[float, Field(ge=0.05, le=3600, description="Heartbeat period per stream.")] = 1.0
    curve_secret_key_file: Annotated[
        str | None, Field(min_length=1, description="The daemon's CURVE key pair (`groundwatch keys`); required "
                                                    "when an endpoint binds beyond loopback.")
    ] = None

    @field_validator("endpoint", "control_endpoint")
    @classmethod
    def _valid_port(cls, endpoint: str) -> str:
        if endpoint.startswith("tcp://"):
            port = endpoint.rpartition(":")[2]
            if port != "*" and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"the port must be 1-65535 or * (got {port!r})")
        return endpoint


class RetainDays(_Section):
    events: Annotated[float, Field(ge=0, le=36500, description="Days to keep event logs; 0 = forever.")] = 30
    segments: Annotated[float, Field(ge=0, le=36500, description="Days to keep recorded video; 0 = forever.")] = 7
    snapshots: Annotated[float, Field(ge=0, le=36500, description="Days to keep snapshots; 0 = forever.")] = 30
    clips: Annotated[float, Field(ge=0, le=36500, description="Days to keep alert clips; 0 = forever.")] = 30


class RetainConfig(_Section):
    days: RetainDays = RetainDays()
    max_gigabytes: Annotated[
        float, Field(ge=0, description="Most the recordings may take; the oldest files go first. 0 = no limit.")
    ] = 0
    min_free_gigabytes: Annotated[
        float, Field(ge=0, description="Below this much free disk, the oldest video goes (and an error event).")
    ] = 1
    expire_interval_seconds: Annotated[float, Field(gt=0, le=86400, description="Time between expiry passes.")] = 300


class SnapshotsConfig(_Section):
    enabled: Annotated[bool, Field(description="Write each track's best frame as JPEG (track end, alerts).")] = True
    quality: Annotated[int, Field(ge=1, le=100, description="JPEG quality.")] = 85
    crop: Annotated[bool, Field(description="Also write the box's crop (<name>-crop.jpg).")] = True
    on_track_end: Annotated[bool, Field(description="Write one for every ended track, not only alerts.")] = True


class ClipsConfig(_Section):
    enabled: Annotated[bool, Field(description="Cut an MP4 clip for each alert (no re-encoding).")] = True
    pre_capture: Annotated[float, Field(ge=0, le=600, description="Seconds before the alert.")] = 5
    post_capture: Annotated[float, Field(ge=0, le=600, description="Seconds after the alert.")] = 5


class RuleConfig(_Section):
    """`[[rules]]`: when a track of a phrase (in a zone, across a line) is an alert."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, description="Rule name, in the alert events.")]
    phrase: Annotated[str, Field(min_length=1, description="The detector's phrase, as in the prompt ('red car').")]
    stream: Annotated[str, Field(description="A stream id, or '*' for every stream.")] = "*"
    zone: Annotated[str | None, Field(description="Only while the track is in this zone.")] = None
    line: Annotated[str | None, Field(description="When the track crosses this line.")] = None
    direction: Annotated[Literal["in", "out"] | None, Field(description="Line rules: only this way.")] = None
    min_seconds: Annotated[float, Field(ge=0, le=86400, description="Present (in the zone) at least this long.")] = 0
    min_score: Annotated[float, Field(ge=0, le=1, description="The track's best score at least this.")] = 0
    cooldown_seconds: Annotated[float, Field(ge=0, le=86400, description="Silence after firing, per stream.")] = 0

    @model_validator(mode="after")
    def _one_place(self) -> "RuleConfig":
        if self.zone is not None and self.line is not None:
            raise ValueError(f"rule {self.name!r}: a rule has a zone or a line, not both")
        if self.direction is not None and self.line is None:
            raise ValueError(f"rule {self.name!r}: direction is for line rules")
        return self


class RecordConfig(_Section):
    enabled: Annotated[bool, Field(description="Write an append-only event log per stream.")] = True
    directory: Annotated[str, Field(min_length=1, description="Where recordings go (relative to the config).")] = (
        "runs/recordings"
    )
    flush_seconds: Annotated[
        float, Field(gt=0, le=1.0, description="Flush period; a kill -9 loses at most this much.")
    ] = 0.5
    retain: RetainConfig = RetainConfig()


def host_is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only (a host name other than localhost, or an
    interface's address, is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MetricsConfig(_Section):
    enabled: Annotated[bool, Field(description="Serve Prometheus metrics over HTTP.")] = True
    host: Annotated[str, Field(min_length=1, description="Address to listen on; beyond loopback needs a token.")] = (
        "127.0.0.1"
    )
    port: Annotated[int, Field(ge=0, le=65535, description="Port (0 = any free port).")] = 9108
    token: Annotated[
        str | None, Field(min_length=16, description="Bearer token a scrape must send; or GROUNDWATCH_METRICS_TOKEN.")
    ] = None

    @property
    def is_loopback(self) -> bool:
        return host_is_loopback(self.host)


class WebConfig(_Section):
    """The operator's web console (streamer/web): a supervisor child, a client of the PUB and control sockets."""

    enabled: Annotated[bool, Field(description="Serve the web console (and encode preview frames for it).")] = True
    host: Annotated[str, Field(min_length=1, description="Address to listen on; beyond loopback needs a token.")] = (
        "127.0.0.1"
    )
    port: Annotated[int, Field(ge=0, le=65535, description="Port (0 = any free port).")] = 8080
    token: Annotated[
        str | None, Field(min_length=16, description="Full access (view and change prompts); or GROUNDWATCH_WEB_TOKEN.")
    ] = None
    read_token: Annotated[
        str | None, Field(min_length=16, description="Optional view-only access: no prompt changes.")
    ] = None
    preview_fps: Annotated[float, Field(gt=0, le=30, description="Preview frames per second per stream, at most.")] = 5
    preview_short_side: Annotated[int, Field(ge=32, le=2160, description="Previews are scaled down to this.")] = 360
    preview_quality: Annotated[int, Field(ge=10, le=100, description="JPEG quality of the previews.")] = 75
    viewer_queue: Annotated[
        int, Field(ge=1, le=100_000, description="Events queued per viewer before its oldest are dropped.")
    ] = 2000

    @property
    def is_loopback(self) -> bool:
        return host_is_loopback(self.host)


class SupervisorConfig(_Section):
    restart_initial_seconds: Annotated[float, Field(gt=0, le=300, description="First restart delay.")] = 0.5
    restart_max_seconds: Annotated[float, Field(gt=0, le=3600, description="Restart delay cap.")] = 30
    exit_when_done: Annotated[bool, Field(description="Exit once every stream is a finished file.")] = True
    shutdown_timeout_seconds: Annotated[float, Field(gt=0, le=300, description="Per stage, then kill.")] = 10


MQTT_TOPIC_PATTERN = r"^[^#+\x00]+[^#+\x00/]$"


class MqttConfig(_Section):
    """`[mqtt]`: the bridge to an MQTT broker (Frigate's topic layout, Home Assistant discovery); docs/mqtt.md."""

    enabled: Annotated[bool, Field(description="Run the MQTT bridge (a child process of the daemon).")] = True
    host: Annotated[str, Field(min_length=1, description="Broker host name or address.")] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535, description="Broker port (8883 is the usual TLS port).")] = 1883
    topic_prefix: Annotated[str, Field(pattern=MQTT_TOPIC_PATTERN, max_length=200,
                                       description="First level of every topic (Frigate's is 'frigate').")] = (
        "groundwatch"
    )
    client_id: Annotated[str, Field(min_length=1, max_length=128, description="MQTT client id (unique per broker).")] = (
        "groundwatch"
    )
    user: Annotated[str | None, Field(description="User name; else $GROUNDWATCH_MQTT_USER if set.")] = None
    password: Annotated[str | None, Field(description="Password; else $GROUNDWATCH_MQTT_PASSWORD if set.")] = None
    tls: Annotated[bool, Field(description="Connect with TLS (system CAs unless tls_ca_certs).")] = False
    tls_ca_certs: Annotated[str | None, Field(description="CA bundle (PEM) to verify the broker with.")] = None
    tls_client_cert: Annotated[str | None, Field(description="Client certificate (PEM).")] = None
    tls_client_key: Annotated[str | None, Field(description="Client key (PEM).")] = None
    tls_insecure: Annotated[bool, Field(description="Skip the broker host-name check (testing only).")] = False
    qos: Annotated[int, Field(ge=0, le=2, description="QoS of published messages.")] = 0
    keepalive_seconds: Annotated[int, Field(ge=5, le=3600, description="MQTT keep-alive.")] = 30
    update_seconds: Annotated[float, Field(ge=0, le=3600, description=(
        "Least time between two updates of one tracked object (and of one count); zone changes and ends are "
        "sent at once."))] = 1.0
    reconnect_initial_seconds: Annotated[float, Field(gt=0, le=300, description="First reconnect delay.")] = 0.5
    reconnect_max_seconds: Annotated[float, Field(gt=0, le=3600, description="Reconnect delay cap.")] = 30
    queue_size: Annotated[int, Field(ge=1, le=1_000_000, description=(
        "Messages held while the broker is away or slow; beyond, the oldest is dropped and counted."))] = 10_000
    homeassistant: Annotated[bool, Field(description="Announce Home Assistant MQTT discovery configs.")] = False
    discovery_prefix: Annotated[str, Field(pattern=MQTT_TOPIC_PATTERN, description="Home Assistant's prefix.")] = (
        "homeassistant"
    )


class WebhookConfig(_Section):
    """`[[webhooks]]`: a JSON POST per matching event, signed with HMAC-SHA256 when a secret is set."""

    url: Annotated[str, Field(min_length=1, description="http:// or https:// URL to POST to.")]
    kinds: Annotated[list[str], Field(min_length=1, description="Event kinds to send ('alert', 'track', ...).")] = [
        "alert"
    ]
    rule: Annotated[str | None, Field(description="Only alerts of this rule (the event's 'rule' field).")] = None
    streams: Annotated[list[str] | None, Field(description="Only these streams (default: all).")] = None
    headers: Annotated[dict[str, str], Field(description="Extra HTTP headers (e.g. Authorization).")] = {}
    secret: Annotated[str | None, Field(min_length=1, description=(
        "Signs each body: X-Groundwatch-Signature-256: sha256=<hex HMAC-SHA256 of the body>."))] = None
    timeout_seconds: Annotated[float, Field(gt=0, le=300, description="Per attempt.")] = 5.0
    cooldown_seconds: Annotated[float, Field(ge=0, le=86_400, description=(
        "Least time between two deliveries for one stream, kind and rule; events in between are skipped."))] = 0
    max_attempts: Annotated[int, Field(ge=1, le=100, description="Attempts per event (first try + retries).")] = 5
    retry_initial_seconds: Annotated[float, Field(gt=0, le=3600, description="First retry delay; doubles.")] = 1.0
    retry_max_seconds: Annotated[float, Field(gt=0, le=86_400, description="Retry delay cap.")] = 60.0
    queue_size: Annotated[int, Field(ge=1, le=1_000_000, description=(
        "Events waiting for this endpoint; beyond, the oldest is dropped and counted."))] = 1000
    snapshot: Annotated[bool, Field(description="Attach the event's snapshot JPEG (base64) when it has one.")] = True
    snapshot_max_bytes: Annotated[int, Field(ge=0, le=50_000_000, description="Larger snapshots are not attached.")] = (
        5_000_000
    )

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("a webhook URL must be http:// or https:// with a host")
        return url


class ClusterConfig(_Section):
    """`[cluster]`: run the stages as Ray actors (docs/cluster.md). Absent, or no address: one machine."""

    address: Annotated[str | None, Field(
        min_length=1, description="The Ray cluster: 'auto' (the cluster this host joined with `ray start`), "
                                  "'host:port' (its GCS) or 'ray://host:port' (Ray Client); `groundwatch run "
                                  "--cluster ADDRESS` sets it.")] = None
    connect_timeout_seconds: Annotated[float, Field(gt=0, le=600, description=(
        "Give up connecting to the cluster after this long (a clear error, never a hang)."))] = 30
    detectors: Annotated[int, Field(ge=0, le=4096, description=(
        "Detector actors; 0 = one per GPU of the cluster (with detector_gpus > 0), else one per "
        "detector_cpus CPU slot left after the decoders, at most one per stream."))] = 0
    detector_gpus: Annotated[float, Field(ge=0, le=64, description="GPUs each detector actor holds (1 on GPU "
                                                                   "hosts; 0 for CPU inference).")] = 0
    detector_cpus: Annotated[float, Field(gt=0, le=1024, description="CPUs each detector actor holds.")] = 1
    detector_resources: Annotated[dict[str, float], Field(max_length=16, description=(
        "Custom resources each detector actor needs (to keep detection on the GPU hosts)."))] = {}
    decoder_cpus: Annotated[float, Field(gt=0, le=64, description="CPUs each decoder actor holds.")] = 1
    max_restarts: Annotated[int, Field(ge=-1, le=1_000_000, description=(
        "Ray's max_restarts for every actor (-1: without limit): Ray restarts a dead actor, on another node "
        "if its own is gone."))] = -1
    placement_timeout_seconds: Annotated[float, Field(gt=0, le=3600, description=(
        "An actor not placed within this long is reported (its stream offline, or its detector left out)."))] = 60
    namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Ray namespace.")] = (
        "groundwatch"
    )


class Config(_Section):
    streams: Annotated[list[StreamConfig], Field(min_length=1, description="Video sources to watch.")]
    model: ModelConfig = ModelConfig()
    tracker: TrackerConfig = TrackerConfig()  # the tracker's own frozen dataclass, validated by pydantic
    live: LiveConfig = LiveConfig()
    publish: PublishConfig = PublishConfig()
    record: RecordConfig = RecordConfig()
    metrics: MetricsConfig = MetricsConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    mqtt: MqttConfig | None = None
    webhooks: list[WebhookConfig] = []
    web: WebConfig = WebConfig()
    rules: Annotated[list[RuleConfig], Field(max_length=MAX_RULES, description="Alerts (see [[rules]]).")] = []
    snapshots: SnapshotsConfig = SnapshotsConfig()
    clips: ClipsConfig = ClipsConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, rules: list[RuleConfig]) -> list[RuleConfig]:
        return _unique_names(rules, "rule")

    @model_validator(mode="after")
    def _rules_refer_to_real_places(self) -> "Config":
        problems = rule_problems(self.rules, {s.id: s for s in self.streams})
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("streams")
    @classmethod
    def _unique_ids(cls, streams: list[StreamConfig]) -> list[StreamConfig]:
        seen: set[str] = set()
        for stream in streams:
            if stream.id in seen:
                raise ValueError(f"stream id {stream.id!r} is used twice")
            seen.add(stream.id)
        return streams

    @model_validator(mode="after")
    def _distinct_endpoints(self) -> "Config":
        if self.publish.endpoint == self.publish.control_endpoint:
            raise ValueError("publish.endpoint and publish.control_endpoint must differ")
        return self


def rule_problems(rules: list[RuleConfig], streams: dict) -> list[str]:
    """Rules naming a stream, zone or line that does not exist (`streams`: id -> StreamConfig or any object
    with `zones` and `lines`)."""
    problems = []
    for rule in rules:
        if rule.stream != "*" and rule.stream not in streams:
            problems.append(f"rule {rule.name!r}: no stream {rule.stream!r} (streams: {', '.join(streams)})")
            continue
        scope = list(streams.values()) if rule.stream == "*" else [streams[rule.stream]]
        for place, names in (("zone", [[z.name for z in s.zones] for s in scope]),
                             ("line", [[l.name for l in s.lines] for s in scope])):
            wanted = getattr(rule, place)
            if wanted is not None and not any(wanted in n for n in names):
                where = "any stream" if rule.stream == "*" else f"stream {rule.stream!r}"
                problems.append(f"rule {rule.name!r}: no {place} {wanted!r} in {where}")
    return problems


def prompt_phrases(prompt: str) -> set[str]:
    """The phrases of a prompt ('red circle . blue square .' -> {'red circle', 'blue square'})."""
    return {normalize_phrase(p) for p in prompt.split(".") if normalize_phrase(p)}


def rule_warnings(rules: list[RuleConfig], prompts: dict[str, str]) -> list[str]:
    """Rules whose phrase is in no prompt of their streams: not an error, the prompt may change at run time."""
    warnings = []
    for rule in rules:
        scope = list(prompts) if rule.stream == "*" else [rule.stream]
        if not any(normalize_phrase(rule.phrase) in prompt_phrases(prompts.get(s, "")) for s in scope):
            warnings.append(f"rule {rule.name!r}: phrase {rule.phrase!r} is not in the prompt of "
                            f"{'any stream' if rule.stream == '*' else 'stream ' + repr(rule.stream)}; "
                            "it fires once a prompt has it")
    return warnings


def _format_location(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _report(source: str, errors: list[str]) -> str:
    noun = "problem" if len(errors) == 1 else "problems"
    return f"{source}: {len(errors)} {noun}\n" + "\n".join(f"  - {e}" for e in errors)


def _shown(value) -> str:
    """An offending value as the report shows it: short, and never a whole section."""
    if isinstance(value, (dict, list)):
        return ""
    text = repr(value)
    return f" (got {text[:80]}{'...' if len(text) > 80 else ''})"


def _file_path(url: str, base_dir: Path) -> Path:
    path = Path(url.removeprefix("file://")).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _document_errors(data: dict, base_dir: Path) -> list[str]:
    """The checks pydantic cannot make (files exist, prompts fit the tokenizer), run on the
    raw document so that they are reported together with the field errors, in one pass."""
    errors: list[str] = []
    if not isinstance(data, dict):
        return errors
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    max_tokens = model.get("max_prompt_tokens", DEFAULT_MAX_PROMPT_TOKENS)
    if not isinstance(max_tokens, int) or max_tokens < 8:
        max_tokens = DEFAULT_MAX_PROMPT_TOKENS  # its own error is reported by the field check
    streams = data.get("streams") if isinstance(data.get("streams"), list) else []
    for index, stream in enumerate(streams):
        if not isinstance(stream, dict):
            continue
        url, mode = stream.get("url"), stream.get("mode", "auto")
        if isinstance(url, str) and url and isinstance(mode, str) and not _is_live(url, mode):
            path = _file_path(url, base_dir)
            if not path.is_file():
                errors.append(f"streams[{index}].url: no such file {str(path)!r}")
        prompt = stream.get("prompt")
        if isinstance(prompt, str) and prompt and prompt_problem(prompt) is None:
            try:
                check_prompt(prompt, max_tokens)
            except PromptProblem as exc:
                errors.append(f"streams[{index}].prompt: {exc}")
            redact = stream.get("redact")
            if isinstance(redact, str) and redact and prompt_problem(redact) is None:
                from streamer.redaction import detector_prompt

                try:  # the detector reads both in one pass: together they must fit
                    check_prompt(detector_prompt(prompt, redact), max_tokens)
                except PromptProblem as exc:
                    errors.append(f"streams[{index}].redact: with the prompt, {exc}")
    stream_ids = {stream.get("id") for stream in streams if isinstance(stream, dict)}
    webhooks = data.get("webhooks") if isinstance(data.get("webhooks"), list) else []
    for index, webhook in enumerate(webhooks):
        names = webhook.get("streams") if isinstance(webhook, dict) else None
        for name in names if isinstance(names, list) else []:
            if isinstance(name, str) and name not in stream_ids:
                known = ", ".join(sorted(i for i in stream_ids if isinstance(i, str)))
                errors.append(f"webhooks[{index}].streams: no stream {name!r} (streams: {known})")
    errors += _access_errors(data, base_dir)
    return errors


def _validation_errors(exc: ValidationError) -> list[str]:
    """pydantic's errors as the report's lines: `where: what (got value)`."""
    errors = []
    for err in exc.errors():
        where = _format_location(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, TrackerConfigError):  # the tracker dataclass's own checks: one line per field
            errors.extend(f"{where}.{name}: {message}" for name, message in cause.problems)
        elif err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            errors.append(f"{where}: unknown key")
        elif err["type"] == "missing":
            errors.append(f"{where}: required but missing")
        else:
            message = err["msg"].removeprefix("Value error, ")
            errors.append(f"{where}: {message}{_shown(err.get('input'))}")
    return errors


class PlacesUpdate(_Section):
    """A `set_zones` request: a stream's zones and lines, replacing the ones it has."""

    zones: Annotated[list[ZoneConfig], Field(max_length=MAX_ZONES)] = []
    lines: Annotated[list[LineConfig], Field(max_length=MAX_LINES)] = []

    @field_validator("zones")
    @classmethod
    def _unique_zone_names(cls, zones: list[ZoneConfig]) -> list[ZoneConfig]:
        return _unique_names(zones, "zone")

    @field_validator("lines")
    @classmethod
    def _unique_line_names(cls, lines: list[LineConfig]) -> list[LineConfig]:
        return _unique_names(lines, "line")


class RulesUpdate(_Section):
    """A `set_rules` request: every rule, replacing the ones the daemon has."""

    rules: Annotated[list[RuleConfig], Field(max_length=MAX_RULES)] = []

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, rules: list[RuleConfig]) -> list[RuleConfig]:
        return _unique_names(rules, "rule")


def parse_places(data: dict, source: str = "set_zones") -> PlacesUpdate:
    """Validate zones and lines sent at run time, like the config's; raises ConfigError with every problem."""
    try:
        return PlacesUpdate.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_report(source, _validation_errors(exc))) from None


def parse_rules(data: dict, streams: dict, source: str = "set_rules") -> RulesUpdate:
    """Validate rules sent at run time against the streams' current zones and lines (`streams`: id -> object
    with `zones` and `lines`)."""
    try:
        update = RulesUpdate.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_report(source, _validation_errors(exc))) from None
    problems = rule_problems(update.rules, streams)
    if problems:
        raise ConfigError(_report(source, problems))
    return update


def _key_path(path: str, base_dir: Path) -> Path:
    key = Path(path).expanduser()
    return key if key.is_absolute() else (base_dir / key).resolve()


def _access_errors(data: dict, base_dir: Path) -> list[str]:
    """Endpoints beyond loopback need the CURVE key pair, and the pair must load (see `streamer.auth`)."""
    from streamer.auth import KeyFileError, is_loopback, load_secret

    publish = data.get("publish") if isinstance(data.get("publish"), dict) else {}
    key_file = publish.get("curve_secret_key_file")
    if isinstance(key_file, str) and key_file:
        try:
            load_secret(_key_path(key_file, base_dir))
        except KeyFileError as exc:
            return [f"publish.curve_secret_key_file: {exc}"]
        return []
    errors = []
    defaults = PublishConfig()
    for name in ("endpoint", "control_endpoint"):
        endpoint = publish.get(name, getattr(defaults, name))
        if isinstance(endpoint, str) and not is_loopback(endpoint):
            errors.append(f"publish.{name}: {endpoint} is reachable beyond this machine; that needs "
                          "publish.curve_secret_key_file (write a pair with `groundwatch keys DIRECTORY`), "
                          "or bind to tcp://127.0.0.1")
    return errors


def _token_access(section, name: str, env: str, hint: str = ""):
    """A listener's token from the environment `env` when the file has none, and the rule that binding beyond
    loopback needs one (the daemon refuses to start otherwise). Returns (section, errors)."""
    errors = []
    if section.token is None and os.environ.get(env):
        section = section.model_copy(update={"token": os.environ[env]})
    if section.enabled and not section.is_loopback and not section.token:
        errors.append(f"{name}.host: {section.host!r} is beyond loopback; set {name}.token (or {env}){hint}, or "
                      "bind 127.0.0.1")
    if section.token and len(section.token) < 16:
        errors.append(f"{env}: at least 16 characters")
    return section, errors


def _web_access(web: WebConfig) -> tuple[WebConfig, list[str]]:
    """The console's token (see `_token_access`) and its view-only one."""
    web, errors = _token_access(web, "web", "GROUNDWATCH_WEB_TOKEN")
    if web.read_token and not web.token:
        errors.append("web.read_token: needs web.token too (the full-access token)")
    if web.read_token and web.token == web.read_token:
        errors.append("web.read_token: must differ from web.token")
    return web, errors


def parse_config(data: dict, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative file paths resolve against `base_dir`. Every problem of the
    document is reported at once."""
    base_dir = base_dir or Path.cwd()
    errors = []
    config = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors += _validation_errors(exc)
    errors += _document_errors(data, base_dir)
    web = metrics = None
    if config is not None:
        web, web_errors = _web_access(config.web)
        metrics, metrics_errors = _token_access(config.metrics, "metrics", "GROUNDWATCH_METRICS_TOKEN",
                                                " and give it to Prometheus as a bearer token")
        errors += web_errors + metrics_errors
    if errors:
        raise ConfigError(_report(source, errors))
    streams = [stream if stream.is_live else stream.model_copy(update={"url": str(_file_path(stream.url, base_dir))})
               for stream in config.streams]
    record_dir = Path(config.record.directory).expanduser()
    if not record_dir.is_absolute():
        record_dir = base_dir / record_dir
    publish = config.publish
    if publish.curve_secret_key_file is not None:
        publish = publish.model_copy(
            update={"curve_secret_key_file": str(_key_path(publish.curve_secret_key_file, base_dir))})
    return config.model_copy(
        update={"streams": streams, "record": config.record.model_copy(update={"directory": str(record_dir)}),
                "web": web, "metrics": metrics, "publish": publish}
    )


def read_toml(path: str | Path) -> dict:
    """A TOML file's document, or `ConfigError` with a one-line reason (the CLI's zones and rules files too)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")  # TOML is UTF-8; not the locale's encoding
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (line {line}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raises `ConfigError` with every problem listed."""
    path = Path(path)
    return parse_config(read_toml(path), source=str(path), base_dir=path.resolve().parent)

