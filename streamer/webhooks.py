"""Webhooks: a JSON POST per matching event to each `[[webhooks]]` endpoint, signed like GitHub's.

A client of the event bus like any other: one process (started by the supervisor) subscribes to the events,
and each endpoint gets its own bounded queue and delivery thread, so a slow or dead endpoint delays nobody but
itself. A full queue drops its oldest event (counted); a failed attempt (connection error, timeout, 408, 429,
5xx) is retried with exponential backoff up to `max_attempts`; other 4xx answers are not retried. An attempt
ends within `timeout_seconds` of wall-clock time whatever the server does (`DeadlineBackend`), and only the
answer's status is used: its body is not read beyond a short announced one, and never decompressed. Counters go
to the per-stream stats (heartbeats, `groundwatch status`, Prometheus) and a failure that persists is reported
once as an `error` event (`error_type: webhook_failed`).

What is sent (docs/mqtt.md, "Webhooks"): the body is the UTF-8 JSON object
`{"delivery": <uuid>, "webhook": <index>, "event": <the event as published>, "snapshot": {...}}` ("snapshot"
only when the event has a readable snapshot JPEG: `content_type`, `path`, `data_base64`). With a `secret`, the
header `X-Groundwatch-Signature-256: sha256=<hex>` carries HMAC-SHA256(secret, the body bytes exactly as sent).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import httpcore
import httpx

from streamer.busclient import BusSubscriber
from streamer.config import WebhookConfig
from streamer.events import make_event
from streamer.process import EventSender, child_setup
from streamer.stats import StreamStats

log = logging.getLogger("groundwatch.webhooks")

SIGNATURE_HEADER = "X-Groundwatch-Signature-256"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# An answer's body announced at most this long is read to its end, so that the connection carries the next
# delivery; a longer, chunked or unannounced one is left unread and its connection closed.
SHORT_BODY_BYTES = 4096
WRITE_SLICE_BYTES = 64 * 1024  # a request body is written in slices, the deadline checked before each


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC-SHA256 of the body (GitHub's scheme)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return hmac.compare_digest(sign(secret, body), header or "")


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, each connect, read and write of which ends by the running attempt's deadline.

    httpx's timeouts bound one socket operation each, not an attempt: a server that sends a byte every half second
    never trips a 5 s read timeout and could hold a delivery forever. Between `start(seconds)` and `clear()` (per
    thread) every operation gets at most the time left, and none starts once it is spent.
    """

    def __init__(self) -> None:
        self.sockets = httpcore.SyncBackend()
        self.local = threading.local()

    def start(self, seconds: float) -> None:
        self.local.deadline = time.monotonic() + seconds

    def clear(self) -> None:
        self.local.deadline = None

    def left(self, timeout: float | None, expired: type[Exception]) -> float | None:
        deadline = getattr(self.local, "deadline", None)
        if deadline is None:
            return timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise expired("the attempt ran out of its timeout_seconds")
        return remaining if timeout is None else min(timeout, remaining)

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self.sockets.connect_tcp(host, port, self.left(timeout, httpcore.ConnectTimeout), local_address,
                                          socket_options)
        return DeadlineStream(stream, self)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        stream = self.sockets.connect_unix_socket(path, self.left(timeout, httpcore.ConnectTimeout), socket_options)
        return DeadlineStream(stream, self)

    def sleep(self, seconds: float) -> None:
        self.sockets.sleep(seconds)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every operation is bounded by its backend's deadline (kept across keep-alive reuse)."""

    def __init__(self, stream: httpcore.NetworkStream, backend: DeadlineBackend) -> None:
        self.stream, self.backend = stream, backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, self.backend.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # One write of a large body to a slow reader is many sends, each allowed the whole timeout: slice it.
        for start in range(0, len(buffer), WRITE_SLICE_BYTES):
            self.stream.write(buffer[start:start + WRITE_SLICE_BYTES],
                              self.backend.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        timeout = self.backend.left(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self.stream.start_tls(ssl_context, server_hostname, timeout), self.backend)

    def get_extra_info(self, info: str):
        return self.stream.get_extra_info(info)


def deadline_transport(backend: DeadlineBackend) -> httpx.HTTPTransport:
    """httpx's own transport (exception mapping, pooling) over `backend`; httpx takes no network backend itself."""
    transport = httpx.HTTPTransport()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's own
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend)
    return transport


def matches(config: WebhookConfig, event: dict) -> bool:
    if event.get("kind") not in config.kinds:
        return False
    if config.streams is not None and event.get("stream") not in config.streams:
        return False
    if config.rule is not None and event.get("rule") != config.rule:
        return False
    return True


class Endpoint:
    """One webhook: its queue, its cooldowns and its delivery thread."""

    def __init__(self, index: int, config: WebhookConfig, counters: "Counters", transport=None,
                 sleep=None) -> None:
        self.index, self.config, self.counters = index, config, counters
        self.queue: deque[dict] = deque()
        self.condition = threading.Condition()
        self.stopping = threading.Event()
        self.last_delivery: dict[tuple, float] = {}
        self.failing = False
        # A transport given (tests) is used as it is, without the per-attempt deadline.
        self.deadline = DeadlineBackend()
        self.client = httpx.Client(timeout=config.timeout_seconds, follow_redirects=False,
                                   transport=transport if transport is not None else deadline_transport(self.deadline))
        self._sleep = sleep or self.stopping.wait
        self.thread = threading.Thread(target=self._run, name=f"webhook-{index}", daemon=True)

    def offer(self, event: dict) -> None:
        """Queue an event without waiting; the oldest waiting one makes room when the queue is full."""
        config = self.config
        if config.cooldown_seconds > 0:
            key = (event.get("stream"), event.get("kind"), event.get("rule"))
            now = time.monotonic()
            if now - self.last_delivery.get(key, float("-inf")) < config.cooldown_seconds:
                self.counters.add(event.get("stream"), "webhook_skipped")
                return
            self.last_delivery[key] = now
        with self.condition:
            if len(self.queue) >= config.queue_size:
                dropped = self.queue.popleft()
                self.counters.add(dropped.get("stream"), "webhook_dropped")
            self.queue.append(event)
            self.condition.notify()

    def body(self, event: dict, delivery: str) -> bytes:
        document = {"delivery": delivery, "webhook": self.index, "event": event}
        snapshot = event.get("snapshot")
        if self.config.snapshot and event.get("has_snapshot", True) and isinstance(snapshot, str) and snapshot:
            try:
                path = Path(snapshot)
                if 0 < path.stat().st_size <= self.config.snapshot_max_bytes:
                    document["snapshot"] = {"content_type": "image/jpeg", "path": snapshot,
                                            "data_base64": base64.b64encode(path.read_bytes()).decode()}
            except OSError:
                pass  # gone (retention) or unreadable: the event goes without it
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()

    def deliver(self, event: dict) -> bool:
        """POST one event, retrying with backoff. Returns whether it was accepted (2xx)."""
        config = self.config
        delivery = str(uuid.uuid4())
        body = self.body(event, delivery)
        headers = {"Content-Type": "application/json", "User-Agent": "groundwatch-webhook",
                   "X-Groundwatch-Event": str(event.get("kind")), "X-Groundwatch-Delivery": delivery}
        headers.update(config.headers)
        if config.secret:
            headers[SIGNATURE_HEADER] = sign(config.secret, body)
        stream = event.get("stream")
        problem, attempts = "", 0
        for attempt in range(1, config.max_attempts + 1):
            if attempt > 1:
                self.counters.add(stream, "webhook_retries")
                delay = min(config.retry_max_seconds, config.retry_initial_seconds * 2 ** (attempt - 2))
                if self._sleep(delay):
                    problem += " (stopped while waiting to retry)"
                    break
            attempts = attempt
            try:
                status = self.attempt(body, headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= status < 300:
                self.counters.add(stream, "webhook_delivered")
                if self.failing:
                    self.failing = False
                    log.info("webhook %d (%s) delivers again", self.index, config.url)
                return True
            problem = f"HTTP {status}"
            if status not in RETRY_STATUS:
                break
        self.counters.add(stream, "webhook_failed")
        if not self.failing:
            self.failing = True
            self.counters.report(stream, f"webhook {self.index} ({config.url}) failed after {attempts} "
                                 f"attempt(s): {problem}; the event was dropped (reported once until it delivers "
                                 "again)")
        return False

    def attempt(self, body: bytes, headers: dict) -> int:
        """POST once and return the answer's status, within `timeout_seconds` of wall-clock time.

        Only the status line and headers are awaited. The body is read (raw, never decompressed) only when it is
        announced short, so that the connection can be reused, and a failure while reading it does not undo the
        status; any other body is left unread and the connection closed with the response.
        """
        self.deadline.start(self.config.timeout_seconds)
        try:
            with self.client.stream("POST", self.config.url, content=body, headers=headers) as response:
                length = response.headers.get("Content-Length", "")
                if response.status_code in (204, 304) or (length.isdigit() and int(length) <= SHORT_BODY_BYTES):
                    try:
                        for _ in response.iter_raw():
                            pass
                    except httpx.HTTPError:
                        pass  # the status is what counts; this connection is closed, not reused
                return response.status_code
        finally:
            self.deadline.clear()

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.queue and not self.stopping.is_set():
                    self.condition.wait(0.5)
                if not self.queue:
                    return
                event = self.queue.popleft()
            self.deliver(event)

    def stop(self, grace_seconds: float) -> None:
        """Deliver what is queued for up to `grace_seconds`, then abandon the rest (counted as dropped)."""
        deadline = time.monotonic() + grace_seconds
        while self.queue and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.05)
        with self.condition:
            for event in self.queue:
                self.counters.add(event.get("stream"), "webhook_dropped")
            self.queue.clear()
            self.stopping.set()
            self.condition.notify_all()
        # An attempt in flight to an endpoint that hangs is abandoned with the (daemon) thread: shutdown stays
        # within its bound whatever the endpoint does.
        self.thread.join(1.0)
        if not self.thread.is_alive():
            self.client.close()


class Counters:
    """The webhook columns of the shared stats, written by this process's threads under one lock."""

    def __init__(self, stats: StreamStats | None, sender: EventSender | None) -> None:
        self.stats, self.sender = stats, sender
        self.lock = threading.Lock()
        self.totals: dict[str, int] = {}

    def add(self, stream, column: str, amount: int = 1) -> None:
        with self.lock:
            self.totals[column] = self.totals.get(column, 0) + amount
            if self.stats is not None and self.stats.stream_ids:
                row = stream if stream in self.stats.row_of else self.stats.stream_ids[0]
                self.stats.add(row, column, amount)

    def report(self, stream, message: str) -> None:
        log.error("%s", message)
        if self.sender is not None and isinstance(stream, str):
            with self.lock:
                self.sender.send(make_event(stream, "error", message=message, error_type="webhook_failed",
                                            fatal=False, process="webhooks"))


class WebhookDispatcher:
    """Subscribes to the bus and offers each event to every endpoint whose filter it matches."""

    def __init__(self, *, webhooks: list[WebhookConfig], stream_ids: list[str], events_endpoint: str,
                 stats: StreamStats | None = None, sender: EventSender | None = None, transport=None,
                 server_key: bytes | None = None) -> None:
        self.counters = Counters(stats, sender)
        self.endpoints = [Endpoint(index, config, self.counters, transport=transport)
                          for index, config in enumerate(webhooks)]
        kinds = sorted({kind for config in webhooks for kind in config.kinds})
        # Filtered at the publisher: no detections event per frame unless asked for.
        self.bus = BusSubscriber(events_endpoint, [f"{stream}/{kind}" for stream in stream_ids for kind in kinds],
                                 server_key=server_key)

    def _offer(self, event: dict, _payload: bytes) -> None:
        if event.get("cached"):
            return  # a late subscriber's copy of a past status or error (docs/events.md): not news
        for endpoint in self.endpoints:
            if matches(endpoint.config, event):
                endpoint.offer(event)

    def receive(self, limit: int = 10_000) -> int:
        return self.bus.receive(self._offer, limit)

    def run(self, stop, grace_seconds: float = 5.0) -> None:
        for endpoint in self.endpoints:
            endpoint.thread.start()
        while not stop.is_set():
            if self.bus.poll(50):
                self.receive()
        self.bus.drain(self._offer)  # the hub stopped before us: take its last events
        for endpoint in self.endpoints:
            endpoint.stop(grace_seconds)
        self.bus.close()


def webhooks_main(*, webhooks: list[WebhookConfig], stream_ids: list[str], events_endpoint: str,
                  internal_endpoint: str, stats_spec: dict, stop, parent_pid: int,
                  server_key: bytes | None = None) -> None:
    """Entry point of the webhooks process (spawned by the supervisor)."""
    child_setup("webhooks", parent_pid)
    stats = StreamStats.attach(stats_spec)
    sender = EventSender(internal_endpoint)
    dispatcher = WebhookDispatcher(webhooks=webhooks, stream_ids=stream_ids, events_endpoint=events_endpoint,
                                   stats=stats, sender=sender, server_key=server_key)
    try:
        dispatcher.run(stop)
    finally:
        sender.close()
