"""The daemon's configuration: a TOML file validated once at start-up.

Every section is a pydantic model with unknown keys forbidden, bounds and a description per field. `load_config`
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

LIVE_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
STREAM_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is the full, readable report."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamConfig(_Section):
    id: Annotated[str, Field(pattern=STREAM_ID_PATTERN, description="Stream name; used in topics and paths.")]
    url: Annotated[str, Field(min_length=1, description="rtsp://... for a camera, or a video file path.")]
    prompt: Annotated[str, Field(min_length=1, description="What to look for, in words ('a person . a car .').")]
    mode: Annotated[
        Literal["auto", "live", "file"],
        Field(description="auto: live for network URLs, file for paths. Live keeps only the freshest frame."),
    ] = "auto"
    fps: Annotated[float, Field(ge=0, le=240, description="Process at most this many frames per second; 0 = all.")] = 0
    record_video: Annotated[bool, Field(description="Copy a live source's video to disk in segments.")] = False
    max_width: Annotated[int, Field(ge=16, le=8192, description="Larger frames are scaled down to fit.")] = 1920
    max_height: Annotated[int, Field(ge=16, le=8192, description="Larger frames are scaled down to fit.")] = 1080

    @property
    def is_live(self) -> bool:
        if self.mode != "auto":
            return self.mode == "live"
        return self.url.lower().startswith(LIVE_SCHEMES)


class ModelConfig(_Section):
    weights: Annotated[str, Field(min_length=1, description="'default', 'tiny' (random, for tests) or a path.")] = (
        "default"
    )
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N.")] = "cpu"
    dtype: Annotated[Literal["float32", "float16", "bfloat16"], Field(description="Inference dtype.")] = "float32"
    box_threshold: Annotated[float, Field(ge=0, le=1, description="Minimum box score.")] = 0.35
    text_threshold: Annotated[float, Field(ge=0, le=1, description="Minimum token score for a phrase.")] = 0.25
    batch_size: Annotated[int, Field(ge=1, le=64, description="Most frames per inference call, across streams.")] = 4
    threads: Annotated[int, Field(ge=0, le=256, description="CPU threads for inference; 0 = torch's default.")] = 0
    short_side: Annotated[int, Field(ge=32, le=4096, description="Frames are resized to this short side.")] = 800
    max_side: Annotated[int, Field(ge=32, le=8192, description="...and at most this long side.")] = 1333


class TrackerConfig(_Section):
    """Mirrors `tracker.TrackerConfig` (same names and meaning); its own checks run at load time too."""

    high_score: Annotated[float, Field(ge=0, le=1, description="High-confidence detections (first stage).")] = 0.5
    low_score: Annotated[float, Field(ge=0, le=1, description="Below this a detection is ignored.")] = 0.1
    new_track_score: Annotated[float, Field(ge=0, le=1, description="Least score to start a track.")] = 0.6
    match_iou: Annotated[float, Field(gt=0, le=1, description="Least IoU to match a track (first stage).")] = 0.2
    low_match_iou: Annotated[float, Field(gt=0, le=1, description="Least IoU in the low-score stage.")] = 0.5
    tentative_match_iou: Annotated[float, Field(gt=0, le=1, description="Least IoU for a tentative track.")] = 0.3
    min_hits: Annotated[int, Field(ge=1, le=1000, description="Matched frames before a track starts.")] = 2
    max_age: Annotated[int, Field(ge=0, le=100_000, description="Unseen frames before a track ends.")] = 30
    velocity_smoothing: Annotated[float, Field(ge=0, le=1, description="Weight of the newest motion.")] = 0.4
    max_predict_frames: Annotated[int, Field(ge=0, le=10_000, description="Stop extrapolating after.")] = 10
    class_agnostic: Annotated[bool, Field(description="Match boxes whatever their phrase.")] = False


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
    heartbeat_seconds: Annotated[float, Field(gt=0, le=3600, description="Heartbeat period per stream.")] = 1.0


class RecordConfig(_Section):
    enabled: Annotated[bool, Field(description="Write an append-only event log per stream.")] = True
    directory: Annotated[str, Field(min_length=1, description="Where recordings go (relative to the config).")] = (
        "runs/recordings"
    )
    flush_seconds: Annotated[
        float, Field(gt=0, le=1.0, description="Flush period; a kill -9 loses at most this much.")
    ] = 0.5


class MetricsConfig(_Section):
    enabled: Annotated[bool, Field(description="Serve Prometheus metrics over HTTP.")] = True
    host: Annotated[str, Field(min_length=1, description="Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, description="Port (0 = any free port).")] = 9108


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
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class SupervisorConfig(_Section):
    restart_initial_seconds: Annotated[float, Field(gt=0, le=300, description="First restart delay.")] = 0.5
    restart_max_seconds: Annotated[float, Field(gt=0, le=3600, description="Restart delay cap.")] = 30
    exit_when_done: Annotated[bool, Field(description="Exit once every stream is a finished file.")] = True
    shutdown_timeout_seconds: Annotated[float, Field(gt=0, le=300, description="Per stage, then kill.")] = 10


class Config(_Section):
    streams: Annotated[list[StreamConfig], Field(min_length=1, description="Video sources to watch.")]
    model: ModelConfig = ModelConfig()
    tracker: TrackerConfig = TrackerConfig()
    live: LiveConfig = LiveConfig()
    publish: PublishConfig = PublishConfig()
    record: RecordConfig = RecordConfig()
    metrics: MetricsConfig = MetricsConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    web: WebConfig = WebConfig()

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


def parse_config(data: dict, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative file paths resolve against `base_dir`."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            where = _format_location(err["loc"])
            if err["type"] == "extra_forbidden":
                errors.append(f"{where}: unknown key")
            elif err["type"] == "missing":
                errors.append(f"{where}: required but missing")
            else:
                message = err["msg"].removeprefix("Value error, ")
                errors.append(f"{where}: {message} (got {err.get('input')!r})")
        raise ConfigError(_report(source, errors)) from None

    base_dir = base_dir or Path.cwd()
    errors = []
    if config.tracker.low_score > config.tracker.high_score:
        errors.append(
            f"tracker.low_score: {config.tracker.low_score} is above tracker.high_score {config.tracker.high_score}"
        )
    streams = []
    for index, stream in enumerate(config.streams):
        if not stream.is_live:
            path = Path(stream.url.removeprefix("file://")).expanduser()
            if not path.is_absolute():
                path = (base_dir / path).resolve()
            if not path.is_file():
                errors.append(f"streams[{index}].url: no such file {str(path)!r}")
            stream = stream.model_copy(update={"url": str(path)})
        streams.append(stream)
    web = config.web
    if web.token is None and os.environ.get("GROUNDWATCH_WEB_TOKEN"):
        web = web.model_copy(update={"token": os.environ["GROUNDWATCH_WEB_TOKEN"]})
    if web.enabled and not web.is_loopback and not web.token:
        errors.append(f"web.host: {web.host!r} is beyond loopback; set web.token (or GROUNDWATCH_WEB_TOKEN), or "
                      "bind 127.0.0.1")
    if web.token and len(web.token) < 16:
        errors.append("GROUNDWATCH_WEB_TOKEN: at least 16 characters")
    if web.read_token and not web.token:
        errors.append("web.read_token: needs web.token too (the full-access token)")
    if web.read_token and web.token == web.read_token:
        errors.append("web.read_token: must differ from web.token")
    record_dir = Path(config.record.directory).expanduser()
    if not record_dir.is_absolute():
        record_dir = base_dir / record_dir
    if errors:
        raise ConfigError(_report(source, errors))
    return config.model_copy(
        update={"streams": streams, "record": config.record.model_copy(update={"directory": str(record_dir)}),
                "web": web}
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raises `ConfigError` with every problem listed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)

