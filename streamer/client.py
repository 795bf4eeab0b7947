"""Talking to a running daemon: subscribe to events, ask for status, change a prompt."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import zmq
import zmq.utils.monitor

from streamer.auth import client_curve
from streamer.events import decode_payload

DEFAULT_TIMEOUT = 5.0  # seconds a command waits for the daemon before saying there is none


@dataclass
class GapCounter:
    """Counts events a subscriber lost (its high-water mark overflowed) from gaps in each stream's `seq`.

    Only streams whose every kind this subscriber receives can be checked: `seq` counts all kinds together.
    A `seq` that goes down means the daemon (or its hub) restarted; counting starts again there.
    """

    last: dict[str, int] = field(default_factory=dict)
    lost: int = 0

    def see(self, event: dict) -> int:
        stream, seq = event.get("stream"), event.get("seq")
        if not isinstance(seq, int) or event.get("cached"):  # a re-sent last value keeps its old seq
            return 0
        previous = self.last.get(stream)
        self.last[stream] = seq
        if previous is not None and seq > previous + 1:
            self.lost += seq - previous - 1
            return seq - previous - 1
        return 0


def subscription_prefix(stream: str | None, kind: str | None) -> bytes:
    """ZeroMQ filters on topic prefixes: `<stream>/<kind>` or `<stream>/`; a kind alone is filtered here."""
    if stream and kind:
        return f"{stream}/{kind}".encode()
    if stream:
        return f"{stream}/".encode()
    return b""


def subscribe(endpoint: str, stream: str | None = None, kind: str | None = None, *, timeout: float | None = None,
              count: int | None = None, high_water_mark: int = 100_000, gaps: GapCounter | None = None,
              server_key: bytes | None = None, connect_timeout: float | None = None,
              on_silence: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Yield events as they arrive. Stops after `count` events, or `timeout` seconds with none.

    A SUB socket connects in the background and never says whether anything is there; when no handshake with
    a daemon has completed within `connect_timeout` seconds, `on_silence` is called once with a message saying
    so (the subscriber keeps trying)."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, high_water_mark)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, subscription_prefix(stream, kind))
    client_curve(socket, server_key)
    monitor = socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                        | zmq.EVENT_HANDSHAKE_FAILED_AUTH) if on_silence else None
    socket.connect(endpoint)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    received = 0
    started = last_event = time.monotonic()
    connected = handshaken = False
    try:
        while count is None or received < count:
            now = time.monotonic()
            if timeout is not None and now - last_event >= timeout:
                return
            if monitor is not None:
                while monitor.poll(0):
                    event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
                    connected |= event == zmq.EVENT_CONNECTED
                    handshaken |= event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                if handshaken:
                    socket.disable_monitor()
                    monitor.close()
                    monitor = None
                elif now - started >= (connect_timeout or DEFAULT_TIMEOUT):
                    if connected:
                        on_silence(f"something at {endpoint} accepted the connection but no handshake completed "
                                   "(a daemon with CURVE keys needs --server-key, or the key is wrong); still trying")
                    else:
                        on_silence(f"no daemon at {endpoint} (nothing answered in "
                                   f"{connect_timeout or DEFAULT_TIMEOUT:g} s); still trying")
                    socket.disable_monitor()
                    monitor.close()
                    monitor = None
            if not poller.poll(200):
                continue
            while count is None or received < count:
                try:
                    frames = socket.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2:  # a web console preview ([topic, header, JPEG]): not an event
                    continue
                event = decode_payload(frames[1])
                last_event = time.monotonic()
                if kind and event.get("kind") != kind:
                    continue
                if gaps is not None:
                    gaps.see(event)
                received += 1
                yield event
    finally:
        if monitor is not None:
            socket.disable_monitor()
            monitor.close()
        socket.close()


def request(endpoint: str, message: dict, timeout: float = 10.0, server_key: bytes | None = None) -> dict:
    """One REQ/REP exchange with the daemon's control socket; raises TimeoutError when nobody answers."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    client_curve(socket, server_key)
    socket.connect(endpoint)
    try:
        socket.send(json.dumps(message).encode())
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no daemon at {endpoint} (no answer within {timeout:g} s)")
        return json.loads(socket.recv(flags=zmq.NOBLOCK))
    finally:
        socket.close()


def status(endpoint: str, timeout: float = 10.0, server_key: bytes | None = None) -> dict:
    return request(endpoint, {"cmd": "status"}, timeout, server_key)


def set_prompt(endpoint: str, stream: str, prompt: str, timeout: float = 60.0, server_key: bytes | None = None,
               reachable_timeout: float | None = None) -> dict:
    """Change a stream's prompt. With `reachable_timeout`, a ping first tells "no daemon" (TimeoutError) apart
    from a daemon that is slow to encode the prompt (`ok: false` after `timeout`)."""
    if reachable_timeout is not None:
        request(endpoint, {"cmd": "ping"}, reachable_timeout, server_key)
    try:
        return request(endpoint, {"cmd": "set_prompt", "stream": stream, "prompt": prompt}, timeout, server_key)
    except TimeoutError:
        if reachable_timeout is None:
            raise
        return {"ok": False, "error": f"the daemon at {endpoint} did not answer the prompt change within "
                                      f"{timeout:g} s; it may still apply it (see groundwatch status)"}


def wait_ready(endpoint: str, timeout: float = 60.0, server_key: bytes | None = None) -> dict:
    """Poll status until the inference worker has loaded the model."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = status(endpoint, timeout=2.0, server_key=server_key)
            if reply.get("worker_ready"):
                return reply
        except TimeoutError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon at {endpoint} not ready within {timeout:.0f} s")
        time.sleep(0.2)


def _ask_after_ping(endpoint: str, message: dict, timeout: float, server_key: bytes | None,
                    reachable_timeout: float | None) -> dict:
    """With `reachable_timeout`, a ping first says "no daemon" (TimeoutError) within it; then `message` may take
    `timeout` seconds (the worker applies it)."""
    if reachable_timeout is not None:
        request(endpoint, {"cmd": "ping"}, reachable_timeout, server_key)
    return request(endpoint, message, timeout, server_key)


def set_zones(endpoint: str, stream: str, zones: list[dict], lines: list[dict], timeout: float = 30.0,
              server_key: bytes | None = None, reachable_timeout: float | None = None) -> dict:
    """Replace a stream's zones and lines; the reply says `ok` or every problem found."""
    return _ask_after_ping(endpoint, {"cmd": "set_zones", "stream": stream, "zones": zones, "lines": lines},
                           timeout, server_key, reachable_timeout)


def set_rules(endpoint: str, rules: list[dict], timeout: float = 30.0, server_key: bytes | None = None,
              reachable_timeout: float | None = None) -> dict:
    """Replace every rule; the reply says `ok` (with `warnings`) or every problem found."""
    return _ask_after_ping(endpoint, {"cmd": "set_rules", "rules": rules}, timeout, server_key, reachable_timeout)


def format_status(reply: dict) -> str:
    columns = ("state", "fps", "decode_fps", "latency_ms", "frames_processed", "frames_dropped", "reconnects",
               "events_published")
    rows = [("stream", *columns)]
    for stream, figures in reply.get("streams", {}).items():
        rows.append((stream, *(str(figures.get(c, "")) for c in columns)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    for stream, figures in reply.get("streams", {}).items():  # why a stream is not online, what last went wrong
        if figures.get("reason"):
            lines.append(f"{stream}: {figures.get('state')}: {figures['reason']}")
        if figures.get("last_error"):
            lines.append(f"{stream}: last error: {figures['last_error']}")
    lines.append(f"uptime {reply.get('uptime', 0):.0f} s; events on {reply.get('publish')}; "
                 f"metrics {reply.get('metrics') or 'off'}")
    return "\n".join(lines)
