"""The daemon's configuration: a TOML file validated once at start-up.

Every section is a pydantic model with unknown keys forbidden, bounds and a description per field; the
`[tracker]` section is built straight into the tracker's own frozen `tracker.TrackerConfig` (pydantic checks its
types and unknown keys, the dataclass its bounds), so there is one definition of it and one set of defaults.
Child processes receive these frozen objects, never dicts. `load_config`
is the one place a file is read; a bad file raises `ConfigError` whose message lists every bad field at once, so
an operator fixes the whole file in one pass instead of one error per restart.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tracker.config import TrackerConfig, TrackerConfigError

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


class SupervisorConfig(_Section):
    restart_initial_seconds: Annotated[float, Field(gt=0, le=300, description="First restart delay.")] = 0.5
    restart_max_seconds: Annotated[float, Field(gt=0, le=3600, description="Restart delay cap.")] = 30
    exit_when_done: Annotated[bool, Field(description="Exit once every stream is a finished file.")] = True
    shutdown_timeout_seconds: Annotated[float, Field(gt=0, le=300, description="Per stage, then kill.")] = 10


class Config(_Section):
    streams: Annotated[list[StreamConfig], Field(min_length=1, description="Video sources to watch.")]
    model: ModelConfig = ModelConfig()
    tracker: TrackerConfig = TrackerConfig()  # the tracker's own frozen dataclass, validated by pydantic
    live: LiveConfig = LiveConfig()
    publish: PublishConfig = PublishConfig()
    record: RecordConfig = RecordConfig()
    metrics: MetricsConfig = MetricsConfig()
    supervisor: SupervisorConfig = SupervisorConfig()

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


def _schema_errors(exc: ValidationError) -> list[str]:
    errors = []
    for err in exc.errors():
        where = _format_location(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, TrackerConfigError):  # the dataclass's own checks: one line per bad field
            errors.extend(f"{where}.{name}: {message}" for name, message in cause.problems)
        elif err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            errors.append(f"{where}: unknown key")
        elif err["type"] == "missing":
            errors.append(f"{where}: required but missing")
        else:
            message = err["msg"].removeprefix("Value error, ")
            errors.append(f"{where}: {message} (got {err.get('input')!r})")
    return errors


def _resolve_file(stream: StreamConfig, index: int, base_dir: Path, errors: list[str]) -> StreamConfig:
    """A file stream with its path made absolute; a missing file is added to `errors`."""
    if stream.is_live:
        return stream
    path = Path(stream.url.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if not path.is_file():
        errors.append(f"streams[{index}].url: no such file {str(path)!r}")
    return stream.model_copy(update={"url": str(path)})


def parse_config(data: dict, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative file paths resolve against `base_dir`."""
    base_dir = base_dir or Path.cwd()
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = _schema_errors(exc)
        # Missing files too, for every stream that is otherwise valid: the whole report in one pass.
        raw_streams = data.get("streams") if isinstance(data, dict) else None
        for index, raw in enumerate(raw_streams if isinstance(raw_streams, list) else []):
            try:
                _resolve_file(StreamConfig.model_validate(raw), index, base_dir, errors)
            except ValidationError:
                pass  # already in the report
        raise ConfigError(_report(source, errors)) from None

    errors = []
    streams = [_resolve_file(stream, index, base_dir, errors) for index, stream in enumerate(config.streams)]
    record_dir = Path(config.record.directory).expanduser()
    if not record_dir.is_absolute():
        record_dir = base_dir / record_dir
    if errors:
        raise ConfigError(_report(source, errors))
    return config.model_copy(
        update={"streams": streams, "record": config.record.model_copy(update={"directory": str(record_dir)})}
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

