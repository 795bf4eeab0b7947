"""The web process's side of the event bus: one SUB socket, fanned out to every viewer without ever waiting.

Each message is turned into its Server-Sent Events bytes once (a preview's JPEG is base64-encoded once, not per
viewer). Each viewer has a bounded event queue (full: the oldest event is dropped and counted) and one slot per
stream for the newest preview (a preview the viewer had not taken yet is replaced and counted). A viewer on a
slow link therefore sees fewer previews; nothing it does can hold up the SUB socket, the hub or the worker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque

import zmq.asyncio

from streamer.busclient import subscribe_socket
from streamer.events import replaces_status

log = logging.getLogger("groundwatch.web")

RECENT_EVENTS = 500  # kept for a page that opens now: its events list and timelines start filled


def sse(data: bytes, event: str | None = None) -> bytes:
    """One Server-Sent Event; `data` is a single line of JSON."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data + b"\n\n"


class Viewer:
    """One open live connection: what it asked for, and its bounded queues."""

    def __init__(self, *, previews: set[str], queue_size: int) -> None:
        self.previews = previews
        self.events: deque[bytes] = deque()
        self.queue_size = queue_size
        self.latest_preview: dict[str, bytes] = {}
        self.wake = asyncio.Event()
        self.events_dropped = 0
        self.previews_dropped = 0
        self.previews_sent = 0

    def offer_event(self, chunk: bytes) -> None:
        if len(self.events) >= self.queue_size:
            self.events.popleft()
            self.events_dropped += 1
        self.events.append(chunk)
        self.wake.set()

    def offer_preview(self, stream: str, chunk: bytes) -> None:
        if stream not in self.previews:
            return
        if stream in self.latest_preview:
            self.previews_dropped += 1
        self.latest_preview[stream] = chunk
        self.wake.set()

    def take(self) -> bytes:
        """Everything waiting, events first (a preview's boxes come in the events before it)."""
        chunks = list(self.events)
        self.events.clear()
        self.previews_sent += len(self.latest_preview)
        chunks.extend(self.latest_preview.values())
        self.latest_preview.clear()
        return b"".join(chunks)

    def counters(self) -> dict:
        return {"events_dropped": self.events_dropped, "previews_dropped": self.previews_dropped,
                "previews_sent": self.previews_sent}


class Bus:
    def __init__(self, endpoint: str, queue_size: int = 2000, server_key: bytes | None = None) -> None:
        self.endpoint, self.queue_size, self.server_key = endpoint, queue_size, server_key
        self.viewers: set[Viewer] = set()
        self.recent: deque[dict] = deque(maxlen=RECENT_EVENTS)  # not detections/heartbeats: they come fast
        self.last_heartbeat: dict[str, dict] = {}
        self.last_status: dict[str, dict] = {}
        # What each stream showed last (its newest preview and that frame's detections), for a page that opens
        # later: a finished file or a stalled camera still shows its last picture, with its boxes.
        self.last_shown: dict[str, tuple[bytes | None, bytes]] = {}
        self._latest_detections: dict[str, tuple[int, bytes]] = {}
        self._last_seq: dict[tuple[str, str], int] = {}  # (stream, kind) -> seq of the newest status/error seen
        self.last_event_at = 0.0  # monotonic; 0 = nothing yet
        self.received = {"events": 0, "previews": 0, "malformed": 0}
        self.previews_dropped_closed = 0  # by viewers that have gone
        self.closed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._socket = None

    # -- viewers ---------------------------------------------------------------------------------------------

    def add_viewer(self, previews: set[str]) -> Viewer:
        viewer = Viewer(previews=previews, queue_size=self.queue_size)
        for stream in previews:
            if stream in self.last_shown:
                detections, preview = self.last_shown[stream]
                if detections is not None:
                    viewer.offer_event(detections)
                viewer.offer_preview(stream, preview)
        self.viewers.add(viewer)
        return viewer

    def remove_viewer(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        self.previews_dropped_closed += viewer.previews_dropped

    def counters(self) -> dict:
        return {"viewers": len(self.viewers), **self.received,
                "previews_dropped": self.previews_dropped_closed + sum(v.previews_dropped for v in self.viewers),
                "events_dropped": sum(v.events_dropped for v in self.viewers)}

    def snapshot(self) -> dict:
        """What a page needs before the first live event: the latest heartbeat and status per stream and the
        recent track/status/error events."""
        age = time.monotonic() - self.last_event_at if self.last_event_at else None
        return {"heartbeats": self.last_heartbeat, "statuses": self.last_status, "recent": list(self.recent),
                "daemon_silent_seconds": None if age is None else round(age, 2)}

    # -- the socket ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._socket = subscribe_socket(zmq.asyncio.Context.instance(), self.endpoint, [""],
                                        server_key=self.server_key, high_water_mark=1000)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        self.closed.set()
        for viewer in list(self.viewers):
            viewer.wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._socket is not None:
            self._socket.close()

    async def _run(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                self.dispatch(frames)
            except Exception:  # one bad message must not end the console's live view
                self.received["malformed"] += 1
                log.exception("dropping a message the console cannot read")

    def dispatch(self, frames: list[bytes]) -> None:
        self.last_event_at = time.monotonic()
        if len(frames) == 3 and frames[0].endswith(b"/preview"):
            header = json.loads(frames[1])
            stream = header["stream"]
            body = (b'"header":' + json.dumps(header, separators=(",", ":")).encode() + b',"jpeg":"'
                    + base64.b64encode(frames[2]) + b'"}')
            chunk = sse(b"{" + body, "preview")
            self.received["previews"] += 1
            latest = self._latest_detections.get(stream)
            # Marked "cached" for pages that open later: an old picture, not a measure of latency.
            self.last_shown[stream] = (latest[1] if latest and latest[0] == header.get("frame") else None,
                                       sse(b'{"cached":true,' + body, "preview"))
            for viewer in self.viewers:
                viewer.offer_preview(stream, chunk)
            return
        if len(frames) != 2:
            self.received["malformed"] += 1
            return
        payload = frames[1]
        event = json.loads(payload)
        if not isinstance(event, dict) or event.get("v") != 1:
            self.received["malformed"] += 1
            return
        kind, stream = event.get("kind"), event.get("stream")
        if kind in ("status", "error"):
            # The hub re-sends each stream's last status and error (`"cached": true`, same seq) whenever anyone
            # subscribes: relay a copy once, never again.
            key, seq = (stream, kind), event.get("seq", 0)
            if event.get("cached") and self._last_seq.get(key, -1) >= seq:
                return
            self._last_seq[key] = seq
        self.received["events"] += 1
        if kind == "heartbeat":
            self.last_heartbeat[stream] = event
        elif kind != "detections":
            if kind == "status" and replaces_status(self.last_status.get(stream), event):
                self.last_status[stream] = event
            self.recent.append(event)
        if b"\n" in payload or b"\r" in payload:  # SSE data is one line; JSON escapes them inside strings
            payload = json.dumps(event, separators=(",", ":")).encode()
        chunk = sse(payload)
        if kind == "detections":
            self._latest_detections[stream] = (event.get("frame"), chunk)
        for viewer in self.viewers:
            viewer.offer_event(chunk)
