"""State for late subscribers and access control beyond loopback (issue 11, "Missing").

A subscriber that connected after a stream failed used to learn only `offline` from the next heartbeat, not
why; every socket was open to whoever could reach it. Hub-level tests here; the real daemon below (CURVE keys,
bound to 0.0.0.0 for the test only, reached through loopback).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from streamer import cli
from streamer.auth import is_loopback, load_public, write_key_pair
from streamer.client import GapCounter, request, status, subscribe
from streamer.events import decode_payload
from streamer.hub import Hub
from streamer.media import write_video

from rtsp_server import free_port
from daemon_harness import Daemon


def receive_all(socket, wait: float = 1.0) -> list[dict]:
    events = []
    while socket.poll(int(wait * 1000)):
        events.append(decode_payload(socket.recv_multipart()[1]))
        wait = 0.3
    return events


def pump(hub: Hub, seconds: float = 0.5) -> None:
    """Run the hub's loop body for a while (subscriptions arrive asynchronously)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hub.drain()
        hub.serve_subscriptions()
        time.sleep(0.01)


def test_late_subscriber_gets_last_status_and_error(tmp_path, stats_factory):
    """The report: a subscriber connecting after a stream failed learned only `offline`. Now it gets the
    stream's last status (with its reason) and last error at once, marked `cached`, with their original seq;
    heartbeats carry `reason` and `last_error`."""
    stats = stats_factory(["bad", "ok"])
    hub = Hub(pull_endpoint=f"ipc://{tmp_path}/pull", pub_endpoint=f"ipc://{tmp_path}/pub", high_water_mark=1000,
              heartbeat_seconds=1000, stats=stats, recorder=None)
    try:
        hub.publish({"stream": "bad", "kind": "status", "ts": 0.0, "wall": 1.0, "state": "online", "source": "file"})
        hub.publish({"stream": "bad", "kind": "error", "ts": 0.0, "wall": 2.0, "message": "cannot open bad.mp4",
                     "error_type": "open_failed", "fatal": True})
        hub.publish({"stream": "bad", "kind": "status", "ts": 0.0, "wall": 3.0, "state": "offline",
                     "reason": "error", "source": "file"})
        hub.publish({"stream": "ok", "kind": "status", "ts": 0.0, "wall": 3.0, "state": "online", "source": "file"})
        hub.publish({"stream": "ok", "kind": "detections", "ts": 0.0, "wall": 3.0, "frame": 0, "detections": []})
        late = []
        for prefix in (b"", b"", b"bad/", b"ok/detections"):  # the same prefix twice: both get the cache
            socket = zmq.Context.instance().socket(zmq.SUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SUBSCRIBE, prefix)
            socket.connect(f"ipc://{tmp_path}/pub")
            late.append(socket)
            pump(hub)
        everything = [e for e in receive_all(late[1]) if e["stream"] == "bad"]
        assert [(e["kind"], e.get("state"), e["seq"], e.get("cached")) for e in everything[:2]] == [
            ("status", "offline", 3, True), ("error", None, 2, True)]
        # later subscriptions to "bad/" re-send to every subscriber of it (ZeroMQ's XPUB cannot address one
        # subscriber): flagged, so readers can drop what they already have
        assert all(e.get("cached") for e in everything)
        assert everything[0]["reason"] == "error" and everything[1]["error_type"] == "open_failed"
        assert {e["stream"] for e in receive_all(late[2])} == {"bad"}
        assert receive_all(late[3], wait=0.3) == []  # no cached detections: only status and error are state
        first = receive_all(late[0])
        assert ("bad", "status") in {(e["stream"], e["kind"]) for e in first}

        hub.heartbeat(time.monotonic())
        beats = {e["stream"]: e for e in receive_all(late[2]) + receive_all(late[0]) if e["kind"] == "heartbeat"}
        assert beats["bad"]["reason"] == "error"
        assert beats["bad"]["last_error"]["error_type"] == "open_failed" and beats["bad"]["last_error"]["fatal"]
        assert beats["bad"]["last_error"]["message"] == "cannot open bad.mp4"
        assert beats["ok"]["last_error"] is None
        for socket in late:
            socket.close()
    finally:
        hub.close()


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


ATTACKER = """
import os, sys, time
import zmq
socket = zmq.Context.instance().socket(zmq.XSUB)
socket.setsockopt(zmq.SNDHWM, 0)
socket.connect(sys.argv[1])
for n in range(3):
    socket.send(b"\\x01" + str(n).encode() + b"x" * (1 << 20))  # 1 MiB: about 48 MiB held each
time.sleep(3)
os._exit(0)  # leaving: the hub frees what it holds of it (its own socket would free a 1 MiB-deep trie too)
"""


def test_a_huge_subscription_cannot_crash_the_hub_or_fill_its_memory(tmp_path, stats_factory):
    """Any subscriber could crash the hub (an audit): ZeroMQ keeps a subscription prefix in a trie of one node per
    byte (about 48 bytes per byte) for as long as its sender stays connected, and frees it recursively, so three
    1 MiB subscriptions held about 150 MiB and the hub died of a stack overflow when their sender left. A
    subscription over 1 KiB now disconnects its sender: the hub lives, its memory stays put, others are served."""
    import subprocess
    import sys
    import threading

    stats = stats_factory(["cam"])
    endpoint = f"ipc://{tmp_path}/pub"
    hub = Hub(pull_endpoint=f"ipc://{tmp_path}/pull", pub_endpoint=endpoint, high_water_mark=1000,
              heartbeat_seconds=1000, stats=stats, recorder=None)
    stop = threading.Event()
    runner = threading.Thread(target=hub.run, args=(stop,))
    runner.start()
    honest = zmq.Context.instance().socket(zmq.SUB)
    honest.setsockopt(zmq.LINGER, 0)
    honest.setsockopt(zmq.SUBSCRIBE, b"cam/track")
    honest.connect(endpoint)
    push = zmq.Context.instance().socket(zmq.PUSH)  # the hub's sockets belong to its thread
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(f"ipc://{tmp_path}/pull")
    try:
        time.sleep(0.5)
        before = _rss_mib()
        subprocess.run([sys.executable, "-c", ATTACKER, endpoint], timeout=120, check=True)
        time.sleep(0.5)
        grown = _rss_mib() - before
        assert runner.is_alive()
        assert grown < 40, f"the hub's process grew by {grown:.0f} MiB"
        push.send_multipart([b"cam/track", b'{"stream":"cam","kind":"track","ts":0.0,"wall":1.0,"track_id":1}'])
        assert [e["kind"] for e in receive_all(honest)] == ["track"]
    finally:
        stop.set()
        runner.join()
        push.close()
        honest.close()
        hub.close()


def test_a_subscription_flood_does_not_drown_other_subscribers_in_cached_copies(tmp_path, stats_factory):
    """Every subscription, even a repeated one-byte one, made the hub re-send each cached status and error to
    every subscriber of those topics: one client that only subscribed, in a loop, left an honest subscriber
    with 440 of 20,000 events (its queue full of cached copies). A topic's cache is now re-sent at most every
    0.1 s (later subscriptions within that time get the next re-send)."""
    import threading

    stats = stats_factory(["a", "b"])
    hub = Hub(pull_endpoint=f"ipc://{tmp_path}/pull", pub_endpoint=f"ipc://{tmp_path}/pub", high_water_mark=10_000,
              heartbeat_seconds=1000, stats=stats, recorder=None)
    for stream in ("a", "b"):
        hub.publish({"stream": stream, "kind": "status", "ts": 0.0, "wall": 1.0, "state": "online", "source": "f"})
        hub.publish({"stream": stream, "kind": "error", "ts": 0.0, "wall": 1.0, "message": "x" * 300,
                     "error_type": "t", "fatal": False})
    stop = threading.Event()
    runner = threading.Thread(target=hub.run, args=(stop,))
    runner.start()
    honest = zmq.Context.instance().socket(zmq.SUB)
    honest.setsockopt(zmq.LINGER, 0)
    honest.setsockopt(zmq.RCVHWM, 1000)  # the web console's
    honest.setsockopt(zmq.SUBSCRIBE, b"")
    honest.connect(f"ipc://{tmp_path}/pub")
    flooding = threading.Event()
    sent = []

    def flood():
        socket = zmq.Context.instance().socket(zmq.XSUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 1)
        socket.connect(f"ipc://{tmp_path}/pub")
        count = 0
        while flooding.is_set():
            try:
                socket.send(b"\x01", zmq.NOBLOCK)
                count += 1
            except zmq.Again:
                time.sleep(0.0005)
        sent.append(count)
        socket.close()

    got = {"track": 0, "cached": 0}
    try:
        time.sleep(0.5)
        receive_all(honest, wait=0.3)  # its own cached copies
        flooding.set()
        flooder = threading.Thread(target=flood)
        flooder.start()
        time.sleep(0.5)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(f"ipc://{tmp_path}/pull")
        total = 8000
        for n in range(total):
            push.send_multipart([b"a/track", b'{"stream":"a","kind":"track","ts":0.0,"wall":1.0,"event":"updated",'
                                 b'"track_id":%d}' % n])
            if n % 40 == 0:
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and got["track"] < total:
            if honest.poll(100):
                event = decode_payload(honest.recv_multipart()[1])
                got["cached" if event.get("cached") else event["kind"]] = got.get(
                    "cached" if event.get("cached") else event["kind"], 0) + 1
        flooding.clear()
        flooder.join()
        push.close()
        assert sent[0] > 10_000  # the flood happened
        assert got["track"] == total, got
        assert got["cached"] < 4 * 10 * 10, got  # 4 cached topics, at most 10 times a second, for a few seconds
    finally:
        flooding.clear()
        stop.set()
        runner.join()
        honest.close()
        hub.close()


def test_gap_counter_ignores_cached_resends():
    """A cached re-send keeps its old seq; it must not read as a daemon restart or a loss."""
    gaps = GapCounter()
    for event in ({"stream": "s", "seq": 5}, {"stream": "s", "seq": 2, "cached": True}, {"stream": "s", "seq": 6}):
        gaps.see(event)
    assert gaps.lost == 0 and gaps.last["s"] == 6


@pytest.mark.parametrize("endpoint,loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:1", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:1", True), ("ipc:///tmp/x", True), ("tcp://0.0.0.0:1", False), ("tcp://*:1", False),
    ("tcp://eth0:1", False), ("tcp://192.168.1.5:1", False), ("tcp://[::]:1", False)])
def test_loopback_endpoints(endpoint, loopback):
    assert is_loopback(endpoint) == loopback


def config_text(publish: str, control: str, key_file: str | None, streams: str) -> str:
    key = f'curve_secret_key_file = "{key_file}"\n' if key_file else ""
    return streams + f"""
[model]
weights = "tiny"
short_side = 96
max_side = 128

[publish]
endpoint = "{publish}"
control_endpoint = "{control}"
heartbeat_seconds = 0.5
{key}
[record]
directory = "recordings"

[metrics]
enabled = false

[web]
enabled = false

[supervisor]
exit_when_done = false
"""


def write_config(root: Path, publish: str, control: str, key_file: str | None, streams: str) -> Path:
    config = root / "config.toml"
    config.write_text(config_text(publish, control, key_file, streams))
    return config


def test_binding_beyond_loopback_without_keys_is_refused(tmp_path, capsys):
    """Every socket was unauthenticated: a daemon bound to 0.0.0.0 served anyone who could reach it."""
    video = write_video(tmp_path / "v.mp4", np.zeros((2, 24, 32, 3), np.uint8))
    streams = f'[[streams]]\nid = "a"\nurl = "{video}"\nprompt = "a thing ."\n'
    config = write_config(tmp_path, f"tcp://0.0.0.0:{free_port()}", f"tcp://127.0.0.1:{free_port()}", None, streams)
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "publish.endpoint" in err and "curve_secret_key_file" in err and "groundwatch keys" in err
    config = write_config(tmp_path, f"tcp://127.0.0.1:{free_port()}", f"tcp://*:{free_port()}", None, streams)
    assert cli.main(["run", str(config)]) == 2
    assert "publish.control_endpoint" in capsys.readouterr().err
    (tmp_path / "public.key").write_text("not a certificate\n")
    config = write_config(tmp_path, f"tcp://0.0.0.0:{free_port()}", f"tcp://127.0.0.1:{free_port()}",
                          str(tmp_path / "public.key"), streams)
    assert cli.main(["run", str(config)]) == 2
    assert "curve_secret_key_file" in capsys.readouterr().err


def test_keys_command_writes_a_pair_and_never_overwrites(tmp_path, capsys):
    assert cli.main(["keys", str(tmp_path / "k")]) == 0
    public, secret = tmp_path / "k" / "server.key", tmp_path / "k" / "server.key_secret"
    assert len(load_public(public)) == 40 and load_public(public) == load_public(secret)
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    before = secret.read_bytes()
    assert cli.main(["keys", str(tmp_path / "k")]) == 1
    assert secret.read_bytes() == before and "exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def curve_daemon(tmp_path_factory):
    """A real daemon bound to 0.0.0.0 with CURVE keys: a good looped file and a file that cannot be opened."""
    root = tmp_path_factory.mktemp("curve")
    public, secret = write_key_pair(root / "keys")
    write_video(root / "good.mp4", np.zeros((10, 48, 64, 3), np.uint8), fps=10)
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    streams = """
[[streams]]
id = "good"
url = "good.mp4"
prompt = "a thing ."
loop = true
realtime = true
fps = 2

[[streams]]
id = "garbage"
url = "garbage.mp4"
prompt = "a thing ."
"""
    publish_port, control_port = free_port(), free_port()
    control = f"tcp://127.0.0.1:{control_port}"
    key = load_public(public)
    daemon = Daemon(root, publish=f"tcp://127.0.0.1:{publish_port}", control=control, server_key=key,
                    config_text=config_text(f"tcp://0.0.0.0:{publish_port}", f"tcp://0.0.0.0:{control_port}",
                                            str(secret), streams))
    daemon.start()
    try:
        daemon.wait_ready(180)
        yield {"publish": daemon.publish, "control": control, "key": key, "public": public,
               "process": daemon.process, "root": root}
    finally:
        daemon.stop(60)


def test_client_without_the_key_gets_nothing(curve_daemon):
    """Without the server's public key neither the control socket nor the event bus answer."""
    with pytest.raises(TimeoutError):
        request(curve_daemon["control"], {"cmd": "status"}, timeout=2)
    wrong = zmq.curve_keypair()[0]
    with pytest.raises(TimeoutError):
        request(curve_daemon["control"], {"cmd": "status"}, timeout=2, server_key=wrong)
    assert list(subscribe(curve_daemon["publish"], timeout=3)) == []
    assert list(subscribe(curve_daemon["publish"], timeout=3, server_key=wrong)) == []


def test_client_with_the_key_works(curve_daemon, capsys):
    events = list(subscribe(curve_daemon["publish"], stream="good", timeout=10, count=3,
                            server_key=curve_daemon["key"]))
    assert len(events) == 3
    assert cli.main(["status", "--control", curve_daemon["control"], "--server-key",
                     str(curve_daemon["public"])]) == 0
    assert "good" in capsys.readouterr().out
    assert cli.main(["status", "--control", curve_daemon["control"], "--timeout", "1"]) == 1
    assert "no daemon at" in capsys.readouterr().err


def test_subscriber_joining_after_a_stream_failed_learns_why(curve_daemon, capsys):
    """The garbage file failed at start-up, long before this subscriber connects: it still gets the stream's
    last status (offline, reason error) and the error itself, and `status` and heartbeats say why."""
    control, key = curve_daemon["control"], curve_daemon["key"]
    deadline = time.monotonic() + 60
    while status(control, timeout=5, server_key=key)["streams"]["garbage"]["state"] != "offline":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    time.sleep(1.0)
    events = list(subscribe(curve_daemon["publish"], stream="garbage", timeout=3, count=3, server_key=key))
    kinds = [(e["kind"], e.get("cached")) for e in events]
    assert ("status", True) in kinds and ("error", True) in kinds, kinds
    [offline] = [e for e in events if e["kind"] == "status" and e.get("cached")]
    assert offline["state"] == "offline" and offline["reason"] == "error"
    [error] = [e for e in events if e["kind"] == "error" and e.get("cached")]
    assert error["error_type"] == "open_failed" and error["fatal"]
    figures = status(control, timeout=5, server_key=key)["streams"]["garbage"]
    assert figures["reason"] == "error" and figures["last_error"]["error_type"] == "open_failed"
    assert "garbage.mp4" in figures["last_error"]["message"]
    [beat] = list(subscribe(curve_daemon["publish"], stream="garbage", kind="heartbeat", timeout=5, count=1,
                            server_key=key))
    assert beat["reason"] == "error" and beat["last_error"]["error_type"] == "open_failed"
    # and the CLI's subscriber shows it too
    assert cli.main(["subscribe", curve_daemon["publish"], "--stream", "garbage", "--kind", "error", "--count", "1",
                     "--timeout", "5", "--server-key", str(curve_daemon["public"])]) == 0
    assert '"open_failed"' in capsys.readouterr().out


def test_resend_filter_drops_only_copies_already_seen():
    """Clients with side effects (MQTT messages, webhooks) must not act twice on a re-sent status or error."""
    from streamer.lastvalue import ResendFilter

    resends = ResendFilter()
    assert resends.fresh({"stream": "s", "seq": 7, "kind": "error", "cached": True})  # joined late: news to it
    assert resends.fresh({"stream": "s", "seq": 8})
    assert not resends.fresh({"stream": "s", "seq": 7, "kind": "error", "cached": True})  # a copy it has
    assert resends.fresh({"stream": "t", "seq": 3, "cached": True})  # another stream
    assert resends.fresh({"stream": "s", "seq": 1})  # the daemon restarted: seq starts again
    assert resends.fresh({"stream": "s", "seq": 2, "cached": True})


def test_settings_change_never_hides_why_a_stream_is_offline():
    """A prompt change on a finished file used to become the stream's last status (state offline, reason
    prompt_changed): a late subscriber, the heartbeats and the console then showed "prompt_changed" as the reason
    the file was offline instead of `end_of_file`. A settings change keeps the status that said why; a real state
    change still replaces it."""
    import json as _json

    from streamer.lastvalue import LastValueCache
    from streamer.web.bus import Bus

    def status(seq, state, reason, **fields):
        return _json.dumps({"v": 1, "seq": seq, "stream": "demo", "kind": "status", "ts": 1.0, "wall": float(seq),
                            "state": state, "reason": reason, **fields}).encode()

    cache = LastValueCache()
    bus = Bus("tcp://127.0.0.1:1")
    sequence = [status(1, "online", "started"), status(2, "offline", "end_of_file"),
                status(3, "offline", "prompt_changed", prompt="a ball ."), status(4, "offline", "rules_changed")]
    for payload in sequence:
        cache.see("demo", b"demo/status", payload)
        bus.dispatch([b"demo/status", payload])
    assert cache.state("demo")["reason"] == "end_of_file"
    [(_, resent)] = cache.matching(b"demo/")
    assert _json.loads(resent)["reason"] == "end_of_file"
    assert bus.snapshot()["statuses"]["demo"]["reason"] == "end_of_file"
    # A change of state after a settings change is taken as usual.
    for payload in (status(5, "online", "prompt_changed"), status(6, "reconnecting", "stalled")):
        cache.see("demo", b"demo/status", payload)
        bus.dispatch([b"demo/status", payload])
    assert cache.state("demo")["reason"] == "stalled"
    assert bus.snapshot()["statuses"]["demo"]["reason"] == "stalled"
