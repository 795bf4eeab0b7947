"""What the web process is given: one frozen settings object built from the daemon's config in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_PROMPT_CHARS = 2000  # a prompt is a few phrases; the text encoder reads 256 tokens per pass


@dataclass(frozen=True)
class WebStream:
    id: str
    live: bool
    file: str | None  # the source file of a file stream (served for replay); never a camera URL (credentials)
    video_directory: str | None  # recorded segments (record_video): a camera's, or a redacted file's (`<run>/`)


@dataclass(frozen=True)
class WebSettings:
    publish_endpoint: str
    control_endpoint: str
    streams: tuple[WebStream, ...]
    record_directory: str | None
    token: str | None = None
    read_token: str | None = None
    viewer_queue: int = 2000
    preview_fps: float = 5.0
    heartbeat_seconds: float = 1.0
    loopback: bool = True
    server_key: bytes | None = None  # the daemon's CURVE public key when its sockets are beyond loopback

    def stream(self, stream_id: str) -> WebStream | None:
        return next((s for s in self.streams if s.id == stream_id), None)


def build_web_settings(config, server_key: bytes | None = None) -> WebSettings:
    """The only place the web console reads the daemon's `Config`."""
    from streamer.auth import connectable  # a daemon bound to tcp://*:P is reached on loopback

    record_directory = config.record.directory if config.record.enabled else None
    streams = []
    for stream in config.streams:
        video_directory = None
        if stream.record_video and (stream.is_live or getattr(stream, "redact", None)):
            video_directory = str(Path(config.record.directory) / stream.id / "video")  # a file's: one folder a run
        # A redacted file stream's source is raw: the console never serves it (its video is the redacted one).
        source = None if stream.is_live or getattr(stream, "redact", None) else stream.url
        streams.append(WebStream(stream.id, stream.is_live, source, video_directory))
    web = config.web
    return WebSettings(publish_endpoint=connectable(config.publish.endpoint),
                       control_endpoint=connectable(config.publish.control_endpoint),
                       streams=tuple(streams), record_directory=record_directory, token=web.token,
                       read_token=web.read_token, viewer_queue=web.viewer_queue, preview_fps=web.preview_fps,
                       heartbeat_seconds=config.publish.heartbeat_seconds, loopback=web.is_loopback,
                       server_key=server_key)
