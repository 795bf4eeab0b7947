"""Talking to a running daemon: subscribe to events, ask for status, change a prompt."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterator

import zmq

from streamer.events import decode_payload


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
        if not isinstance(seq, int):
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
              count: int | None = None, high_water_mark: int = 100_000,
              gaps: GapCounter | None = None) -> Iterator[dict]:
    """Yield events as they arrive. Stops after `count` events, or `timeout` seconds with none."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, high_water_mark)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SUBSCRIBE, subscription_prefix(stream, kind))
    socket.connect(endpoint)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    received = 0
    try:
        while count is None or received < count:
            if not poller.poll(int(timeout * 1000) if timeout is not None else None):
                return
            while count is None or received < count:
                try:
                    frames = socket.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2:  # a web console preview ([topic, header, JPEG]): not an event
                    continue
                event = decode_payload(frames[1])
                if kind and event.get("kind") != kind:
                    continue
                if gaps is not None:
                    gaps.see(event)
                received += 1
                yield event
    finally:
        socket.close()


def request(endpoint: str, message: dict, timeout: float = 10.0) -> dict:
    """One REQ/REP exchange with the daemon's control socket; raises TimeoutError when nobody answers."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send(json.dumps(message).encode())
        if not socket.poll(int(timeout * 1000)):
            raise TimeoutError(f"no answer from {endpoint} within {timeout:.0f} s (is the daemon running?)")
        return json.loads(socket.recv(flags=zmq.NOBLOCK))
    finally:
        socket.close()


def status(endpoint: str, timeout: float = 10.0) -> dict:
    return request(endpoint, {"cmd": "status"}, timeout)


def set_prompt(endpoint: str, stream: str, prompt: str, timeout: float = 60.0) -> dict:
    return request(endpoint, {"cmd": "set_prompt", "stream": stream, "prompt": prompt}, timeout)


def wait_ready(endpoint: str, timeout: float = 60.0) -> dict:
    """Poll status until the inference worker has loaded the model."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = status(endpoint, timeout=2.0)
            if reply.get("worker_ready"):
                return reply
        except TimeoutError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"daemon at {endpoint} not ready within {timeout:.0f} s")
        time.sleep(0.2)


def format_status(reply: dict) -> str:
    columns = ("state", "fps", "decode_fps", "latency_ms", "frames_processed", "frames_dropped", "reconnects",
               "events_published")
    rows = [("stream", *columns)]
    for stream, figures in reply.get("streams", {}).items():
        rows.append((stream, *(str(figures.get(c, "")) for c in columns)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.append(f"uptime {reply.get('uptime', 0):.0f} s; events on {reply.get('publish')}; "
                 f"metrics {reply.get('metrics') or 'off'}")
    return "\n".join(lines)
