"""Hardening (issue 11, part A): what a hostile user, a full disk, a dead child or a service manager did to the
daemon. Each test reproduces one reported failure against the real daemon (`python -m streamer.cli run`), real
ZeroMQ clients, the real RTSP server and real tmpfs mounts where root can make them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from daemon_harness import Daemon, Subscriber, dead_rtsp_url


def _raw_request(endpoint: str, frames: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """Send `frames` as one multi-part request from a DEALER (what a REQ does, minus its checks)."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send_multipart([b"", *frames])
        assert socket.poll(int(timeout * 1000)), f"no answer to {frames!r}"
        reply = socket.recv_multipart()
        assert reply[0] == b""
        return reply[1:]
    finally:
        socket.close()


@pytest.fixture(scope="module")
def idle_daemon(tmp_path_factory):
    """A daemon with two cameras that are off: the control socket and the processes, no decoding work."""
    daemon = Daemon(tmp_path_factory.mktemp("idle"), f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."

[[streams]]
id = "other"
url = "{dead_rtsp_url()}"
prompt = "a car ."
""")
    daemon.start()
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.kill()


# -- defect 1: one control message killed the daemon -----------------------------------------------------------


def test_hostile_control_messages_are_answered_and_never_kill_the_daemon(idle_daemon):
    """`{"cmd":"set_prompt","stream":["cam"],...}` used to raise TypeError in the supervisor (exit 1), and a
    request in two ZeroMQ frames put the REP socket in a state that killed it. Every bad request must get
    `ok: false` with the reason, and the next request must still work."""
    endpoint = idle_daemon.control
    hostile = [
        ({"cmd": "set_prompt", "stream": ["cam"], "prompt": "a ."}, "stream"),
        ({"cmd": "set_prompt", "stream": "cam", "prompt": {"a": 1}}, "prompt"),
        ({"cmd": "set_prompt", "stream": "cam"}, "prompt"),
        ({"cmd": ["status"]}, "cmd"),
        ({"cmd": "no_such_command"}, "no_such_command"),
        ({"cmd": "status", "extra": 1}, "extra"),
        ({"stream": "cam"}, "cmd"),
        ([1, 2, 3], "object"),
        (42, "object"),
        (None, "object"),
    ]
    for message, mentioned in hostile:
        [reply] = _raw_request(endpoint, [json.dumps(message).encode()])
        answer = json.loads(reply)
        assert answer["ok"] is False and mentioned in answer["error"], (message, answer)
    for frames in ([b"not json"], [b"\xff\xfe\x00garbage"], [b""], [b'{"cmd": "status"}', b"second frame"],
                   [b'{"cmd": "ping"}'] * 3, [b"{" * 100_000]):
        [reply] = _raw_request(endpoint, frames)
        answer = json.loads(reply)
        assert answer["ok"] is False and answer["error"], (frames[:1], answer)
    # A DEALER without the empty delimiter, and a REQ that never reads its reply, must not wedge the socket.
    bare = zmq.Context.instance().socket(zmq.DEALER)
    bare.setsockopt(zmq.LINGER, 0)
    bare.connect(endpoint)
    bare.send(b'{"cmd": "ping"}')
    assert bare.poll(10_000) and json.loads(bare.recv_multipart()[-1])["ok"] is True
    bare.close()
    rude = zmq.Context.instance().socket(zmq.REQ)
    rude.setsockopt(zmq.LINGER, 0)
    rude.connect(endpoint)
    rude.send(b'{"cmd": "status"}')
    rude.close()
    # The daemon is alive and every command still works.
    assert idle_daemon.process.poll() is None
    assert idle_daemon.request({"cmd": "ping"}) == {"ok": True}
    reply = idle_daemon.request({"cmd": "status"})
    assert reply["ok"] and set(reply["streams"]) == {"cam", "other"}
    assert idle_daemon.request({"cmd": "set_prompt", "stream": "cam", "prompt": "a dog ."})["ok"]
    assert idle_daemon.request({"cmd": "status"})["streams"]["cam"]["prompt"] == "a dog ."
    assert "Traceback" not in idle_daemon.log()
