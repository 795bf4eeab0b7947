"""The event bus seen from its clients (MQTT bridge, webhooks, web console): one way to subscribe, and for the
synchronous clients one way to read what is waiting and to drain the last events at shutdown.

ZeroMQ reconnects a SUB socket by itself when the daemon's hub restarts, so a client only subscribes once. The
topic is its own frame (`<stream>/<kind>`), filtered at the publisher; the payload is the event's JSON.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Iterable

import zmq

from streamer.auth import client_curve, connectable


def subscribe_socket(context: zmq.Context, endpoint: str, topics: Iterable[str], *, server_key: bytes | None = None,
                     high_water_mark: int = 100_000) -> zmq.Socket:
    """A SUB socket on the daemon's event PUB `endpoint`, subscribed to `topics` ("" for everything); `context`
    may be a `zmq.asyncio.Context`. `server_key`: the daemon's CURVE public key when its endpoints need one."""
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.RCVHWM, high_water_mark)
    socket.setsockopt(zmq.LINGER, 0)
    for topic in topics:
        socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
    client_curve(socket, server_key)
    socket.connect(connectable(endpoint))
    return socket


class BusSubscriber:
    """A synchronous client's subscription: `receive` hands each waiting event (a JSON object) to a handler
    without blocking; `drain` takes the events the hub published just before it stopped."""

    def __init__(self, endpoint: str, topics: Iterable[str], *, server_key: bytes | None = None) -> None:
        self.socket = subscribe_socket(zmq.Context.instance(), endpoint, topics, server_key=server_key)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)

    def poll(self, timeout_ms: int) -> bool:
        """Whether a message is waiting, after waiting at most `timeout_ms`."""
        return bool(self.poller.poll(timeout_ms))

    def receive(self, handle: Callable[[dict, bytes], None], limit: int = 10_000) -> int:
        """Up to `limit` waiting messages: each one that is a JSON object goes to `handle(event, payload)`, the
        rest are dropped. Returns the messages read (dropped ones included)."""
        count = 0
        while count < limit:
            try:
                _topic, payload = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not two frames
                continue
            count += 1
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if isinstance(event, dict):
                handle(event, payload)
        return count

    def drain(self, handle: Callable[[dict, bytes], None], quiet_seconds: float = 0.3) -> None:
        """At shutdown (the hub stops before the bus clients): read until the bus has been quiet this long."""
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_seconds:
            if self.poll(50) and self.receive(handle):
                quiet_since = time.monotonic()

    def close(self) -> None:
        self.socket.close()
