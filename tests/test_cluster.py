"""The cluster mode's parts that need no cluster: assignment by load, the `[cluster]` config, and bad addresses
(an unreachable cluster is a clear error within `cluster.connect_timeout_seconds`, never a hang)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamer.cluster.assignment import actor_loads, assign, rebalance, stream_load
from streamer.cluster.runner import ClusterError, address_endpoint, check_reachable
from streamer.config import ConfigError, parse_config

sys.path.insert(0, str(Path(__file__).parent))
from daemon_harness import Daemon, Subscriber  # noqa: E402
from rtsp_server import free_port  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "streamer" / "assets" / "demo.mp4"


def test_assign_spreads_load_heaviest_first():
    loads = {"a": 4.0, "b": 3.0, "c": 3.0, "d": 2.0}
    placed = assign(loads, ["x", "y"])
    assert set(placed) == set(loads)
    assert actor_loads(loads, placed, ["x", "y"]) == {"x": 6.0, "y": 6.0}


def test_assign_keeps_current_streams_and_places_the_rest():
    """A stream whose actor is still there never moves when another stream is placed (its tracks go on)."""
    loads = {"a": 1.0, "b": 1.0, "c": 1.0}
    placed = assign(loads, ["x", "y"], {"a": "x", "b": "x"})
    assert placed["a"] == "x" and placed["b"] == "x" and placed["c"] == "y"
    # The lost actor's streams go to the survivors, the others stay.
    placed = assign(loads, ["y"], {"a": "x", "b": "y", "c": "x"})
    assert placed == {"a": "y", "b": "y", "c": "y"}
    assert assign(loads, []) == {}


def test_rebalance_moves_few_streams_to_an_actor_that_came_back():
    loads = {s: 1.0 for s in "abcdef"}
    current = {s: "x" for s in loads}
    placed = rebalance(loads, ["x", "y"], current)
    totals = actor_loads(loads, placed, ["x", "y"])
    assert totals == {"x": 3.0, "y": 3.0}
    assert sum(placed[s] != current[s] for s in loads) == 3
    # Balanced already (within the tolerance): nothing moves.
    assert rebalance(loads, ["x", "y"], placed) == placed


def test_stream_load_counts_pixels_per_second():
    assert stream_load(5, 1920, 1080) == 5 * 1920 * 1080
    assert stream_load(0, 640, 480) == 25 * 640 * 480  # unknown rate: the default
    assert stream_load(10, 640, 480) > stream_load(5, 640, 480)


def test_cluster_config_and_stream_resources():
    config = parse_config({"streams": [{"id": "a", "url": "rtsp://cam/1", "prompt": "a cat .",
                                        "resources": {"site-a": 1}}],
                           "cluster": {"address": "ray://10.0.0.1:10001", "detectors": 2, "detector_gpus": 1}})
    assert config.cluster.address == "ray://10.0.0.1:10001"
    assert config.streams[0].resources == {"site-a": 1.0}
    assert parse_config({"streams": [{"id": "a", "url": "rtsp://c/1", "prompt": "a cat ."}]}).cluster.address is None
    with pytest.raises(ConfigError) as error:
        parse_config({"streams": [{"id": "a", "url": "rtsp://c/1", "prompt": "a cat .", "resources": {"x": -1}}],
                      "cluster": {"connect_timeout_seconds": 0, "detectorz": 1}})
    report = str(error.value)
    assert "streams[0].resources.x" in report and "cluster.connect_timeout_seconds" in report
    assert "cluster.detectorz: unknown key" in report


def test_address_forms():
    assert address_endpoint("auto") is None
    assert address_endpoint("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert address_endpoint("ray://head.local:10001") == ("head.local", 10001)
    with pytest.raises(ClusterError, match="expected 'auto'"):
        address_endpoint("head-without-port")


def test_unreachable_address_is_refused_quickly():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout=5)
    assert time.monotonic() - started < 5


def stream_config() -> str:
    return f'''[[streams]]
id = "demo"
url = "{DEMO}"
prompt = "green star ."
'''


def test_run_with_unreachable_cluster_exits_with_a_clear_error(tmp_path):
    """`groundwatch run --cluster ADDRESS` with nothing there: exit status 2 and the reason, before anything
    starts (no hang)."""
    daemon = Daemon(tmp_path, stream_config())
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "streamer.cli", "run", str(daemon.config), "--cluster",
                             f"127.0.0.1:{port}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (groundwatch[cluster])")
def test_silent_cluster_address_gives_up_after_connect_timeout(tmp_path):
    """An address that accepts TCP but never answers as Ray does (a wrong port, a firewall that holds the
    connection): the driver gives up after `cluster.connect_timeout_seconds`, publishes why, and the daemon exits
    (status 1) instead of hanging in `ray.init`."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the kernel's backlog; nothing ever answers
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    daemon = Daemon(tmp_path, stream_config() + f'''
[cluster]
address = "{address}"
connect_timeout_seconds = 4
''', "[supervisor]\nexit_when_done = true\n")
    try:
        daemon.start()
        subscriber = Subscriber(daemon.publish)
        code = daemon.wait_exit(90)
        subscriber.read(0.3)
        assert code == 1, daemon.log()[-3000:]
        log = daemon.log()
        assert f"cannot connect to the Ray cluster at {address}" in log
        assert "within 4 s" in log or "cannot connect" in log
        assert "the Ray cluster could not be used" in log
    finally:
        daemon.kill()
        silent.close()
    events = [line for path in (tmp_path / "recordings" / "demo").glob("events-*.jsonl")
              for line in path.read_text().splitlines()]
    assert any('"error_type":"cluster_unreachable"' in line for line in events)


def test_redacted_stream_refused_on_a_cluster(tmp_path):
    """A stream with `redact` must never run where nothing redacts it: with [cluster] the daemon refuses to start
    (exit status 2, the stream named) instead of recording or publishing its raw pictures."""
    daemon = Daemon(tmp_path, stream_config() + 'redact = "a face ."\n')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "streamer.cli", "run", str(daemon.config), "--cluster",
                             f"127.0.0.1:{free_port()}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert "streams demo: redact is not supported with [cluster]" in result.stderr
    assert not (tmp_path / "recordings" / "demo" / "video").exists()


def test_decoder_take_hands_slot_views_and_frees_them_at_the_next_call():
    """`DecoderActor.take` returns its frames' pixels as its second return value, which Ray copies into the object
    store only as the call returns: a slot freed inside `take` (as the `ray.put` version did) could be overwritten
    by the decoder thread before Ray read it, and a frame copied out first costs a second copy. So the pixels are
    views of the mailbox slots (no copy), those slots stay taken until the next call (the decoder cannot write
    there meanwhile), and the next call and `close` free them. Runs without Ray."""
    import numpy as np

    from streamer.cluster.actors import DecoderActor
    from streamer.config import LiveConfig, StreamConfig
    from streamer.frames import READING

    stream = StreamConfig(id="t", url=str(DEMO), prompt="a cat .", max_width=32, max_height=24)
    actor = DecoderActor(stream, LiveConfig(), None, slots=4)
    try:
        mailbox = actor.mailbox
        for index in range(3):
            frame = np.full((24, 32, 3), index, dtype=np.uint8)
            assert mailbox.put(frame, frame_index=index, pts=index / 10, ts=index / 10, live=False)
        reply, pixels = actor.take(2, wait_seconds=0)
        assert [f["frame_index"] for f in reply["frames"]] == [0, 1]
        assert [f["position"] for f in reply["frames"]] == [0, 1]
        assert "pixels" not in reply["frames"][0]  # the driver reads no pixels
        assert len(pixels) == 2 and [int(p[0, 0, 0]) for p in pixels] == [0, 1]
        assert all(np.shares_memory(p, mailbox._data) for p in pixels)  # no copy before Ray's own
        slots = [f.slot for f in actor.handed]
        assert all(mailbox.header["state"][slot] == READING for slot in slots)
        # The decoder cannot reuse those slots before the next call: one free slot is left of four.
        assert mailbox.put(np.zeros((24, 32, 3), np.uint8), frame_index=3, pts=0.3, ts=0.3, live=False)
        reply, pixels = actor.take(4, wait_seconds=0)
        assert [f["frame_index"] for f in reply["frames"]] == [2, 3]
        assert all(mailbox.header["state"][slot] != READING for slot in slots)  # freed by this call
        empty, none = actor.take(4, wait_seconds=0)
        assert empty["frames"] == [] and none == []
        assert not np.any(mailbox.header["state"] == READING)
    finally:
        actor.close()
