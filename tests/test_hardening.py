"""Hardening (issue 11, part A): what a hostile user, a full disk, a dead child or a service manager did to the
daemon. Each test reproduces one reported failure against the real daemon (`python -m streamer.cli run`), real
ZeroMQ clients, the real RTSP server and real tmpfs mounts where root can make them.
"""

from __future__ import annotations

import contextlib
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


def test_oversized_prompt_is_refused_quickly(idle_daemon):
    """A set_prompt of ~12,000 words used to block the control socket for 6.9 s and stall every stream; it must
    be refused with the limit named, while status keeps being answered."""
    for prompt in ("a red car . " * 3000, "red car . " * 1500):  # 12,000 words; 15,000 characters
        started = time.monotonic()
        reply = idle_daemon.request({"cmd": "set_prompt", "stream": "cam", "prompt": prompt})
        assert reply["ok"] is False and "model.max_prompt_tokens" in reply["error"], reply
        assert time.monotonic() - started < 5.0
    reply = idle_daemon.request({"cmd": "set_prompt", "stream": "cam", "prompt": " . "})
    assert reply["ok"] is False and "has no words" in reply["error"]
    status = idle_daemon.request({"cmd": "status"})
    assert status["processes"]["worker"]["restarts"] == 0 and status["streams"]["cam"]["prompt"] != " . "


# -- defect 11 (config) and 4/5 (prompts in the config) ------------------------------------------------------


def test_config_check_is_one_pass_and_never_dumps_the_config(tmp_path):
    """The check ran in two passes (a missing file appeared only after the schema errors were fixed) and the
    distinct-endpoints error printed the whole config as a dict; ports above 65535 were wrapped, not refused;
    heartbeat_seconds below 0.05 was accepted but not honoured."""
    from streamer.config import ConfigError, load_config

    path = tmp_path / "bad.toml"
    path.write_text("""
[[streams]]
id = "a"
url = "missing.mp4"
prompt = "a person ."
fps = -1

[publish]
endpoint = "tcp://127.0.0.1:70000"
control_endpoint = "tcp://127.0.0.1:5556"
heartbeat_seconds = 0.001

[metrics]
port = 65536
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    report = str(info.value)
    for expected in ("streams[0].fps", "missing.mp4", "publish.endpoint", "70000", "publish.heartbeat_seconds",
                     "metrics.port"):
        assert expected in report, report
    assert report.startswith(f"{path}: 5 problems"), report
    same = tmp_path / "same.toml"
    same.write_text('[[streams]]\nid = "a"\nurl = "rtsp://h/x"\nprompt = "a ."\n[publish]\n'
                    'endpoint = "tcp://127.0.0.1:5600"\ncontrol_endpoint = "tcp://127.0.0.1:5600"\n')
    with pytest.raises(ConfigError) as info:
        load_config(same)
    assert "must differ" in str(info.value) and "{" not in str(info.value), str(info.value)


BASE_CONFIG = b'[[streams]]\nid = "a"\nurl = "rtsp://h/x"\nprompt = "a box ."\n'


@pytest.mark.parametrize("data, expected", [
    pytest.param(BASE_CONFIG + b"# caf\xe9\n", "not UTF-8 text (line 5)", id="latin-1"),
    pytest.param(BASE_CONFIG + b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n", "not valid TOML: nested too deeply",
                 id="nested"),
])
def test_a_config_that_is_not_utf8_or_nests_too_deeply_is_a_config_error(tmp_path, data, expected, capsys):
    """A config saved as Latin-1 (UnicodeDecodeError: only OSError was caught around the read) or nesting arrays
    thousands deep (RecursionError from tomllib) ended `groundwatch run` and the `zones`/`rules` commands with a
    traceback (found by an audit). Each is one line naming the file."""
    from streamer.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {expected}"), info.value
    from streamer import cli

    for argv in (["zones", "a", str(path)], ["rules", str(path)]):
        assert cli.main([*argv, "--control", "tcp://127.0.0.1:1"]) == 2  # refused before any daemon is asked
        err = capsys.readouterr().err
        assert err.startswith(f"groundwatch {argv[0]}: {path}: {expected}") and err.count("\n") == 1, err


def test_prompts_are_checked_in_the_config(tmp_path):
    """`prompt = " . "` passed the config check and crash-looped the worker; a prompt of thousands of words had
    no limit. The config must refuse both with the words set_prompt uses."""
    from streamer.config import ConfigError, parse_config

    empty = {"streams": [{"id": "a", "url": "rtsp://h/x", "prompt": " . "}]}
    with pytest.raises(ConfigError, match=r"streams\[0\]\.prompt: the prompt ' \. ' has no words"):
        parse_config(empty, base_dir=tmp_path)
    huge = {"streams": [{"id": "a", "url": "rtsp://h/x", "prompt": "red car . " * 200}],
            "model": {"max_prompt_tokens": 300}}
    with pytest.raises(ConfigError, match=r"streams\[0\]\.prompt: the prompt has \d+ tokens, more than "
                                          r"model\.max_prompt_tokens = 300"):
        parse_config(huge, base_dir=tmp_path)
    fits = dict(huge, model={"max_prompt_tokens": 1024})
    assert parse_config(fits, base_dir=tmp_path).model.max_prompt_tokens == 1024


class _SlowOrBadDetector:
    """The test detector of test_streamer.py, with a prompt that takes seconds to encode and one it refuses."""

    def __init__(self, inner) -> None:
        self.inner, self.encoded = inner, []

    def encode(self, prompt):
        if "bad" in prompt:
            from gdino.text import PromptError

            raise PromptError(f"the prompt {prompt!r} cannot be encoded")
        if "slow" in prompt:
            time.sleep(1.5)
        self.encoded.append(prompt)
        return self.inner.encode(prompt)

    def detect(self, frames, encoding):
        return self.inner.detect(frames, encoding)


@contextlib.contextmanager
def _running_worker(mailbox_factory, stats_factory, streams):
    """A worker with `_SlowOrBadDetector` running its loop on a thread: (worker, mailboxes, stats, control queue,
    reply queue)."""
    import queue
    import threading

    from fakes import FakeDetector, FlagEvent, make_worker

    worker, mailboxes, _, _, stats = make_worker(mailbox_factory, stats_factory, streams)
    worker.detector = _SlowOrBadDetector(FakeDetector())
    worker.prepare_prompts()
    control, replies, stop = queue.Queue(), queue.Queue(), FlagEvent()
    thread = threading.Thread(target=worker.run, args=(stop, control, replies), daemon=True)
    thread.start()
    try:
        yield worker, mailboxes, stats, control, replies
    finally:
        stop.set()
        thread.join(10)


def test_prompt_encoding_never_stalls_the_frames(mailbox_factory, stats_factory):
    """set_prompt used to encode in the worker's frame loop, so a long prompt stopped every stream; frames of
    the other streams must keep flowing while the new prompt is encoded, and the reply comes when it is done."""
    import tracker
    from fakes import frame_with_value

    tracker.warm_up()  # compiling the tracker on its first frame is not what this test measures
    streams = [{"id": "a", "live": True, "prompt": "thing ."}, {"id": "b", "live": True, "prompt": "thing ."}]
    with _running_worker(mailbox_factory, stats_factory, streams) as (worker, mailboxes, stats, control, replies):
        control.put((1, "set_prompt", {"stream": "a", "prompt": "slow ."}))
        time.sleep(0.1)
        processed = stats.get("b", "frames_processed")
        for value in range(10):  # 1 s of frames while "slow ." takes 1.5 s to encode
            mailboxes["b"].put(frame_with_value(value), frame_index=value, pts=0, ts=time.time(), live=True)
            time.sleep(0.1)
        assert replies.empty(), "answered before the prompt was encoded"
        assert stats.get("b", "frames_processed") - processed >= 5, "stream b stalled during the encoding"
        request_id, reply = replies.get(timeout=10)
        assert request_id == 1 and reply["ok"] and reply["prompt"] == "slow ." and reply["encode_ms"] >= 1000
        control.put((2, "set_prompt", {"stream": "a", "prompt": "bad ."}))
        request_id, reply = replies.get(timeout=10)
        assert request_id == 2 and not reply["ok"] and "cannot be encoded" in reply["error"]
        assert worker.streams["a"].prompt == "slow ."


def test_the_last_prompt_change_of_a_stream_wins(mailbox_factory, stats_factory):
    """A prompt change to a prompt already encoded (a typo reverted at once) was applied at once, and an earlier
    change still being encoded was applied when it finished: the older request won, and both clients were told
    theirs was in force (found by an audit). The earlier one is now answered as superseded, not applied."""
    streams = [{"id": "a", "live": True, "prompt": "thing ."}]
    with _running_worker(mailbox_factory, stats_factory, streams) as (worker, _, _, control, replies):
        control.put((1, "set_prompt", {"stream": "a", "prompt": "slow typo ."}))
        control.put((2, "set_prompt", {"stream": "a", "prompt": "thing ."}))  # encoded already
        answers = dict(replies.get(timeout=10) for _ in range(2))
        assert answers[2]["ok"] and answers[2]["prompt"] == "thing ."
        assert not answers[1]["ok"] and "superseded" in answers[1]["error"], answers[1]
        assert worker.streams["a"].prompt == "thing ."
        control.put((3, "set_prompt", {"stream": "a", "prompt": "slow typo ."}))  # asked again: encoded, applied
        request_id, reply = replies.get(timeout=10)
        assert request_id == 3 and reply["ok"] and worker.streams["a"].prompt == "slow typo ."


def test_a_bad_prompt_at_start_costs_only_its_stream(mailbox_factory, stats_factory):
    """A prompt the detector refuses used to raise in the worker at every restart, taking every stream down.
    It must cost its own stream (an `error` event, frames skipped) and nothing else; a new prompt revives it."""
    from fakes import FakeDetector, frame_with_value, make_worker

    streams = [{"id": "a", "live": False, "prompt": "bad ."}, {"id": "b", "live": False, "prompt": "thing ."}]
    worker, mailboxes, _, sender, stats = make_worker(mailbox_factory, stats_factory, streams)
    worker.detector = _SlowOrBadDetector(FakeDetector())
    worker.prepare_prompts()
    for mailbox in mailboxes.values():
        for value in range(5):
            mailbox.put(frame_with_value(value), frame_index=value, pts=value / 10, ts=value / 10, live=False)
        mailbox.finish(1)
    for _ in range(20):
        worker.step()
    [error] = [e for e in sender.events if e["kind"] == "error"]
    assert error["stream"] == "a" and error["error_type"] == "bad_prompt" and "cannot be encoded" in error["message"]
    assert stats.get("b", "frames_processed") == 5 and stats.get("a", "frames_processed") == 0
    assert worker.streams["a"].finished and worker.streams["b"].finished  # the file ran to its end, skipped


# -- defect 2: SIGTERM could hang forever -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait_state(daemon: Daemon, stream: str, state: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while daemon.request({"cmd": "status"})["streams"][stream]["state"] != state:
        assert time.monotonic() < deadline, f"{stream} never {state}; log:\n{daemon.log()}"
        time.sleep(0.1)


def test_sigterm_to_the_process_group_after_a_child_died_mid_wait(tmp_path):
    """kill -9 of a decoder waiting to reconnect left the lock of the shared stop Event held by a dead process:
    the staged shutdown blocked in `.set()` forever, and a second signal was ignored. The same SIGTERM sent to
    the whole process group (what systemd does) must end the run in order, within its bound."""
    daemon = Daemon(tmp_path, f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."

[[streams]]
id = "door"
url = "{dead_rtsp_url()}"
prompt = "a person ."
""", """
[live]
reconnect_initial_seconds = 8
reconnect_max_seconds = 8
[supervisor]
restart_initial_seconds = 120
shutdown_timeout_seconds = 5
""")
    daemon.start()
    try:
        daemon.wait_ready()
        _wait_state(daemon, "cam", "reconnecting")
        pids = daemon.child_pids()
        time.sleep(0.5)  # the decoders are now inside their 8 s reconnect wait
        os.kill(pids["decoder-cam"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while daemon.request({"cmd": "status"})["processes"]["decoder-cam"]["alive"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(daemon.process.pid, signal.SIGTERM)
        code = daemon.wait_exit(30)  # 3 stages x 5 s at the very most, and nothing should overrun
        assert code == 0, f"exit {code}; log:\n{daemon.log()}"
        assert not [name for name, pid in pids.items() if _alive(pid)]
        assert not list(Path("/dev/shm").glob(f"groundwatch-{daemon.process.pid}-*"))
        door = [json.loads(line) for line in next((tmp_path / "recordings" / "door").glob("*.jsonl")).open()]
        last = [e for e in door if e["kind"] == "status"][-1]
        assert last["state"] == "offline" and last["reason"] == "shutdown"  # stopped in order, not killed
    finally:
        daemon.kill()


def test_a_second_signal_forces_the_exit(tmp_path):
    """While the ordered shutdown waits for a child that does not stop (here: SIGSTOP), a second SIGTERM or
    SIGINT must end the run at once, killing every child and removing the shared memory."""
    daemon = Daemon(tmp_path, f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."
""", """
[supervisor]
shutdown_timeout_seconds = 120
""")
    daemon.start()
    try:
        daemon.wait_ready()
        pids = daemon.child_pids()
        os.kill(pids["decoder-cam"], signal.SIGSTOP)
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(2) is None  # waiting for the stopped decoder, as it should
        daemon.process.send_signal(signal.SIGINT)
        code = daemon.wait_exit(10)
        assert code is not None and code != 0, daemon.log()
        time.sleep(0.5)
        assert not [name for name, pid in pids.items() if _alive(pid)]
        assert not list(Path("/dev/shm").glob(f"groundwatch-{daemon.process.pid}-*"))
        assert "forcing" in daemon.log()
    finally:
        daemon.kill()


def test_sighup_to_the_process_group_stops_in_order(tmp_path):
    """A closed terminal or SSH session sends SIGHUP to the whole foreground process group. Nobody handled it: the
    supervisor and every child died at once (exit -1), the hub's last events never reached the log, and the
    shared memory and runtime folder were left behind (found by an audit). It must stop like SIGTERM."""
    import tempfile

    daemon = Daemon(tmp_path, f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."
""", """
[supervisor]
shutdown_timeout_seconds = 5
""")
    daemon.start()
    try:
        daemon.wait_ready()
        pids = daemon.child_pids()
        os.killpg(daemon.process.pid, signal.SIGHUP)
        code = daemon.wait_exit(30)
        assert code == 0, f"exit {code}; log:\n{daemon.log()}"
        assert "SIGHUP" in daemon.log()
        time.sleep(0.5)
        assert not [name for name, pid in pids.items() if _alive(pid)]
        assert not list(Path("/dev/shm").glob(f"groundwatch-{daemon.process.pid}-*"))
        assert not list(Path(tempfile.gettempdir()).glob(f"groundwatch-{daemon.process.pid}-*"))
        cam = [json.loads(line) for line in next((tmp_path / "recordings" / "cam").glob("*.jsonl")).open()]
        last = [e for e in cam if e["kind"] == "status"][-1]
        assert last["state"] == "offline" and last["reason"] == "shutdown"  # stopped in order, not killed
    finally:
        daemon.kill()


def test_a_request_waiting_for_the_worker_is_answered_when_the_daemon_stops(tmp_path):
    """A prompt change waiting for the worker when the daemon was stopped was never answered: its client waited
    its whole timeout (60-90 s) for a reply from a daemon that had exited (found by an audit). It is now answered
    that the daemon stopped."""
    import threading

    daemon = Daemon(tmp_path, f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."
""", """
[supervisor]
shutdown_timeout_seconds = 2
""")
    daemon.start()
    try:
        daemon.wait_ready()
        os.kill(daemon.child_pids()["worker"], signal.SIGSTOP)  # a worker busy for longer than the client waits
        answer = {}
        client = threading.Thread(target=lambda: answer.update(daemon.request(
            {"cmd": "set_prompt", "stream": "cam", "prompt": "a dog ."}, timeout=40)))
        client.start()
        time.sleep(1.0)  # the request reached the worker's queue
        daemon.process.send_signal(signal.SIGTERM)
        client.join(60)
        assert answer and not answer["ok"] and "stopp" in answer["error"], answer
        assert daemon.wait_exit(30) is not None
    finally:
        daemon.kill()


# -- defect 3: a recording problem stopped live publishing -----------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    import subprocess

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Write a file until the filesystem is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_full_disk_never_stops_publishing(tmp_path, small_tmpfs):
    """With record.directory on a filesystem that fills up, the hub used to crash on flush and restart-loop
    while subscribers froze, and the run still exited 0. Publishing must go on; the failure must be an `error`
    event (record_failed), counted in heartbeats, retried (recording resumes once there is room), and the exit
    status must say the run was degraded."""
    daemon = Daemon(tmp_path, f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."
""", record_directory=str(small_tmpfs), heartbeat_seconds=0.05)
    subscriber = Subscriber(daemon.publish)
    daemon.start()
    try:
        daemon.wait_ready()
        subscriber.read(1.0)
        filler = _fill(small_tmpfs)
        error = subscriber.wait_for(20, kind="error", error_type="record_failed")
        assert "No space left on device" in error["message"] and error["fatal"] is False
        since = time.monotonic()
        heartbeats = [e for e in subscriber.read(3.0) if e["kind"] == "heartbeat"]
        assert len(heartbeats) >= 15, f"publishing stalled: {len(heartbeats)} heartbeats in 3 s"
        assert heartbeats[-1]["record_errors"] >= 1 and heartbeats[-1]["recording"] == "failing"
        status = daemon.request({"cmd": "status"})
        assert status["processes"]["hub"]["restarts"] == 0 and status["processes"]["hub"]["alive"]
        assert time.monotonic() - since < 10
        filler.unlink()  # room again: the retry (every <= 10 s) writes what waited
        subscriber.events.clear()
        subscriber.wait_for(30, kind="heartbeat", recording="ok")
        [log] = list((small_tmpfs / "cam").glob("events-*.jsonl"))
        size = log.stat().st_size
        time.sleep(1.0)
        assert log.stat().st_size > size
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(60) == 3, daemon.log()
        assert "degraded" in daemon.log()
        from streamer.recording import read_events

        events = list(read_events(log))  # whole lines only, in order
        assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    finally:
        subscriber.close()
        daemon.kill()


def test_a_snapshot_refused_by_a_full_disk_leaves_no_partial_file(small_tmpfs):
    """A snapshot written on a full disk raised with its half-written `.part` file left behind, and retention
    never deletes `.part` files (one may be being written): each refused snapshot kept its bytes on the full disk
    for good (found by an audit). The write must fail cleanly, with nothing left."""
    import numpy as np

    from streamer.snapshots import SnapshotKeeper

    keeper = SnapshotKeeper(small_tmpfs / "snapshots", capacity=1)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (480, 640, 3), np.uint8)  # noise: a JPEG bigger than the room left
    keeper.offer(pixels, np.array([0]), np.array([[10.0, 10.0, 300.0, 300.0]]), np.array([0.9]))
    (small_tmpfs / "snapshots").mkdir()
    _fill(small_tmpfs)
    with pytest.raises(OSError):
        keeper.write(0, "cam-run-1", "a person")
    assert not list((small_tmpfs / "snapshots").iterdir())


def test_read_only_record_directory_is_refused_at_start(tmp_path, small_tmpfs):
    """A record.directory the daemon cannot write used to be found by the hub crashing; it must be a clear
    error at start, before anything runs."""
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    daemon = Daemon(tmp_path, f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."
""", record_directory=str(small_tmpfs))
    daemon.start()
    try:
        assert daemon.wait_exit(60) == 2, daemon.log()
        assert "not writable" in daemon.log() and "Read-only file system" in daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        daemon.kill()


# -- defect 9: a taken metrics port left shared memory and a temp folder behind ---------------------------------


def test_metrics_beyond_loopback_need_a_token_and_a_scrape_must_send_it(stats_factory, monkeypatch):
    """`[metrics] host` could be bound beyond loopback with no authentication at all, unlike the console and the
    ZeroMQ endpoints (an audit). Now that needs `metrics.token` (or GROUNDWATCH_METRICS_TOKEN), and a scrape
    without `Authorization: Bearer <token>` gets 401."""
    import types
    import urllib.error
    import urllib.request

    from streamer.config import ConfigError, parse_config
    from streamer.metrics import start_metrics_server

    stream = {"id": "cam", "url": "rtsp://127.0.0.1/cam", "prompt": "a person ."}
    monkeypatch.delenv("GROUNDWATCH_METRICS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="metrics.host"):
        parse_config({"streams": [stream], "metrics": {"host": "0.0.0.0"}})
    token = "scrape-token-0123456789"
    monkeypatch.setenv("GROUNDWATCH_METRICS_TOKEN", token)
    assert parse_config({"streams": [stream], "metrics": {"host": "0.0.0.0"}}).metrics.token == token

    supervisor = types.SimpleNamespace(stats=stats_factory(["cam"]), _latest_rates={}, children=[])
    server, port = start_metrics_server(supervisor, "127.0.0.1", 0, token)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": token}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
            assert refused.value.code == 401
        answer = urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}),
                                        timeout=10)
        assert answer.status == 200 and b'groundwatch_frames_processed_total{stream="cam"}' in answer.read()
    finally:
        server.shutdown()
        server.server_close()


def test_taken_metrics_port_is_a_clear_error_and_stale_leftovers_are_removed(tmp_path):
    """The metrics port in use gave a traceback and left a 37 MB shared-memory buffer and a groundwatch-* temp
    folder behind; after kill -9 such leftovers piled up. Every endpoint is checked before anything is created,
    and what a dead daemon left (its pid no longer runs) is removed at the next start."""
    import socket
    import subprocess
    import sys
    import tempfile

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale_shm = Path("/dev/shm") / f"groundwatch-{dead.pid}-cam"
    stale_shm.write_bytes(b"\0" * 1024)
    stale_dir = Path(tempfile.gettempdir()) / f"groundwatch-{dead.pid}-abc123"
    stale_dir.mkdir()
    (stale_dir / "events").write_bytes(b"")
    live_dir = Path(tempfile.mkdtemp(prefix=f"groundwatch-{os.getpid()}-"))  # a running daemon's: kept
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        daemon = Daemon(tmp_path, f"""
[[streams]]
id = "cam"
url = "{dead_rtsp_url()}"
prompt = "a person ."
""", f"""
[metrics]
port = {taken.getsockname()[1]}
""")
        daemon.start()
        try:
            assert daemon.wait_exit(60) == 2, daemon.log()
            log = daemon.log()
            assert "metrics" in log and str(taken.getsockname()[1]) in log and "Traceback" not in log, log
            assert not list(Path("/dev/shm").glob(f"groundwatch-{daemon.process.pid}-*"))
            assert not [d for d in Path(tempfile.gettempdir()).glob(f"groundwatch-{daemon.process.pid}-*")]
            assert not stale_shm.exists() and not stale_dir.exists()
            assert live_dir.exists()
        finally:
            daemon.kill()
    finally:
        taken.close()
        stale_shm.unlink(missing_ok=True)
        import shutil

        shutil.rmtree(stale_dir, ignore_errors=True)
        shutil.rmtree(live_dir, ignore_errors=True)


# -- defect 11: the first status, the hub's crash report, and the reason tracks end at shutdown ------------------


def test_first_status_hub_crash_report_and_shutdown_reason(tmp_path):
    """A subscriber connected before the daemon started missed the first `online` status, and after a hub
    restart the `process_crashed` error (published by the new hub before subscribers had reconnected); on
    SIGTERM a file's tracks ended with `end_of_stream` instead of `shutdown`."""
    from gdino.shapes import render_video
    from streamer.media import write_video
    from streamer.hub import JOIN_SECONDS
    from streamer.recording import read_events

    frames, _ = render_video(3, 60, (120, 160), 10)
    write_video(tmp_path / "clip.mp4", frames, fps=10)
    daemon = Daemon(tmp_path, """
[[streams]]
id = "clip"
url = "clip.mp4"
prompt = "red circle . blue square ."
realtime = true
loop = true
""", """
[tracker]
min_hits = 1
[supervisor]
shutdown_timeout_seconds = 120
""", heartbeat_seconds=0.5)
    subscriber = Subscriber(daemon.publish, watch_connection=True)
    daemon.start()
    try:
        daemon.wait_ready()
        first = subscriber.wait_for(30, stream="clip", kind="status")
        assert first["state"] == "online", first
        subscriber.wait_for(60, stream="clip", kind="track", event="started")
        received = [e for e in subscriber.events if e["stream"] == "clip" and not e.get("cached")]  # not re-sent
        os.kill(daemon.child_pids()["hub"], signal.SIGKILL)
        error = subscriber.wait_for(90, stream="clip", kind="error", error_type="process_crashed")
        assert error["process"] == "hub"
        subscriber.events.clear()
        subscriber.wait_for(60, stream="clip", kind="track", event="started")
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(300) == 0, daemon.log()
        assert "did not stop" not in daemon.log()
        [log] = list((tmp_path / "recordings" / "clip").glob("events-*.jsonl"))
        events = list(read_events(log))
        # The first hub's events, up to the kill: it published nothing (heartbeats included) before subscribers
        # had JOIN_SECONDS to connect, and a subscriber that joined in that time got everything from seq 1
        # (heartbeats were published from 0.5 s; in one CI run the subscriber connected only after ~2 s). One that
        # joined later (a starved machine) gets at least everything made after it joined.
        first_hub = events[:next((i for i in range(1, len(events)) if events[i]["seq"] <= events[i - 1]["seq"]),
                                 len(events))]
        beat = next(e for e in first_hub if e["kind"] == "heartbeat")
        bound = beat["ts"] - beat["uptime"]  # when the hub had bound its sockets
        assert beat["ts"] >= bound + JOIN_SECONDS - 0.05, (beat["ts"] - bound, JOIN_SECONDS)
        seqs = [e["seq"] for e in received]
        # Its first handshake with the hub (an earlier one was with the daemon's probe of the endpoint, which a
        # loaded machine can leave seconds before the hub binds).
        joined = next(t for t in subscriber.joins if t >= bound - 0.2)
        if joined <= bound + JOIN_SECONDS - 0.3:
            assert seqs == list(range(1, len(seqs) + 1)), (seqs, joined - bound)  # nothing missed, in order
        else:
            made_after = {e["seq"] for e in first_hub if e["wall"] >= joined + 0.5 and e["seq"] <= seqs[-1]}
            assert made_after <= set(seqs), (joined - bound, sorted(made_after - set(seqs)))
        sigterm_at = [i for i, e in enumerate(events) if e["kind"] == "error"][-1]
        ended = [e for e in events[sigterm_at:] if e["kind"] == "track" and e["event"] == "ended"
                 and e.get("reason")]
        assert ended and {e["reason"] for e in ended} == {"shutdown"}, [
            (e["kind"], e.get("event"), e.get("reason"), e.get("state")) for e in events[-30:]]
    finally:
        subscriber.close()
        daemon.kill()


# -- defect 7: [model] threads had no effect ---------------------------------------------------------------------


def test_model_threads_hold_for_torch_numba_and_openmp():
    """The first call of the Numba CPU attention reset torch's thread count (set to 1, it read 2 afterwards).
    In a worker-like process the setting must hold after detections, for torch, Numba and OpenMP alike."""
    import subprocess
    import sys

    from daemon_harness import REPO

    code = """
import json, numpy as np, torch, numba
from threadpoolctl import threadpool_info
from streamer.inference import GdinoDetector
detector = GdinoDetector(weights="tiny", threads=1, short_side=64, max_side=96)
encoding = detector.encode("a red circle . a blue square .")
for _ in range(2):
    detector.detect([np.zeros((48, 64, 3), np.uint8), np.ones((48, 64, 3), np.uint8)], encoding)
openmp = sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "openmp"})
print(json.dumps({"torch": torch.get_num_threads(), "numba": numba.get_num_threads(), "openmp": openmp}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)
    env.pop("NUMBA_NUM_THREADS", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = json.loads(result.stdout.strip().splitlines()[-1])
    assert threads == {"torch": 1, "numba": 1, "openmp": [1]}, threads


# -- defect 10: stall detection took twice read_timeout_seconds, and said it in FFmpeg's errno text ------------


def test_stalled_camera_is_detected_within_the_read_timeout(mailbox_factory, stats_factory):
    """A server that stops answering (SIGSTOP) was detected after 2 x read_timeout_seconds (10 s for 5), and
    the reason read "[Errno 1414092869] Immediate exit requested". Detection must come within the setting
    (+ 1 s) and say what happened in words; a refused connection likewise."""
    import threading

    from rtsp_server import RtspServer, gstreamer_available
    from fakes import FlagEvent, ListSender

    from streamer.decoder import Decoder

    if not gstreamer_available():
        pytest.skip("GStreamer RTSP server not installed (scripts/setup.sh installs it)")
    server = RtspServer(width=160, height=120, fps=10)
    server.start()
    sender, stop = ListSender(), FlagEvent()
    decoder = Decoder(stream_id="cam", url=server.url, live=True, fps=0, max_width=160, max_height=120,
                      mailbox=mailbox_factory("stall", width=160, height=120), stats=stats_factory(["cam"]),
                      sender=sender, stop=stop, open_timeout=5, read_timeout=3, reconnect_initial=30,
                      reconnect_max=30)
    thread = threading.Thread(target=decoder.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while decoder.stats.get("cam", "frames_decoded") < 40:  # past the burst a server sends at connection
            assert time.monotonic() < deadline, sender.events
            time.sleep(0.05)
        server.stall()
        stalled_at = time.monotonic()
        while not [e for e in sender.events if e["kind"] == "status" and e["state"] == "reconnecting"]:
            assert time.monotonic() - stalled_at < 10, "the stall was never detected"
            time.sleep(0.02)
        detected_after = time.monotonic() - stalled_at
        reconnecting = [e for e in sender.events if e["kind"] == "status" and e["state"] == "reconnecting"][0]
        assert detected_after <= 3 + 1.0, f"detected after {detected_after:.1f} s for read_timeout 3 s"
        assert "Errno" not in reconnecting["reason"] and "no data from the source for 3 s" in reconnecting["reason"]
    finally:
        stop.set()
        server.resume()
        thread.join(10)
        server.kill()
    refused = Decoder(stream_id="cam", url=dead_rtsp_url(), live=True, fps=0, max_width=32, max_height=24,
                      mailbox=mailbox_factory("refused"), stats=stats_factory(["cam"]), sender=ListSender(),
                      stop=FlagEvent(), open_timeout=2, read_timeout=2, reconnect_initial=30, reconnect_max=30)
    threading.Timer(1.0, refused.stop.set).start()
    refused.run()
    status = [e for e in refused.sender.events if e["kind"] == "status" and e["state"] == "reconnecting"][0]
    assert "Errno" not in status["reason"] and "connection refused" in status["reason"], status["reason"]


# -- defect 6: track ids reused, file frames skipped and tracks left open by a worker restart -------------------


def _kill_mid_clip(tmp_path, total: int, child: str, after_frames: int, stream_extra: str, settings: str,
                   timeout: float, exit_timeout: float) -> list[dict]:
    """Run the daemon on a `total`-frame shapes clip, SIGKILL `child` once `after_frames` are processed (within
    `timeout` s), let it finish the file (exit 0 within `exit_timeout` s) and return the run's recorded events."""
    from gdino.shapes import render_video
    from streamer.media import write_video
    from streamer.recording import read_events

    frames, _ = render_video(5, total, (120, 160), 10)
    write_video(tmp_path / "clip.mp4", frames, fps=10)
    daemon = Daemon(tmp_path, """
[[streams]]
id = "clip"
url = "clip.mp4"
prompt = "red circle . blue square ."
""" + stream_extra, settings)
    daemon.start()
    try:
        daemon.wait_ready()
        deadline = time.monotonic() + timeout
        while daemon.request({"cmd": "status"})["streams"]["clip"]["frames_processed"] < after_frames:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        os.kill(daemon.child_pids()[child], signal.SIGKILL)
        assert daemon.wait_exit(exit_timeout) == 0, daemon.log()
    finally:
        daemon.kill()
    [log] = list((tmp_path / "recordings" / "clip").glob("events-*.jsonl"))
    return list(read_events(log))


def test_worker_restart_keeps_every_file_frame_and_track_ids_unique(tmp_path):
    """A killed worker silently skipped the file frames it had taken, restarted track ids at 1 and left its open
    tracks without `ended`. Every frame of the file must be published, ids must stay unique for the run, and
    the open tracks must end with `reason: worker_restarted`."""
    total = 24
    events = _kill_mid_clip(tmp_path, total, "worker", 4, "", """
[tracker]
min_hits = 1
max_age = 100
[supervisor]
exit_when_done = true
restart_initial_seconds = 0.2
shutdown_timeout_seconds = 120
""", timeout=120, exit_timeout=400)
    processed = sorted({e["frame"] for e in events if e["kind"] == "detections"})
    assert processed == list(range(total)), f"frames never published: {sorted(set(range(total)) - set(processed))}"
    crash = next(i for i, e in enumerate(events) if e["kind"] == "error" and e["error_type"] == "process_crashed")
    tracks = [e for e in events if e["kind"] == "track"]
    started = [e["track_id"] for e in tracks if e["event"] == "started"]
    assert started and len(started) == len(set(started)), "a track id was used twice"
    open_at_crash = set()
    for event in events[:crash]:
        if event["kind"] == "track" and event["event"] == "started":
            open_at_crash.add(event["track_id"])
        elif event["kind"] == "track" and event["event"] == "ended":
            open_at_crash.discard(event["track_id"])
    restarted = {e["track_id"] for e in tracks if e["event"] == "ended" and e.get("reason") == "worker_restarted"}
    # Every track open at the crash ends with worker_restarted. The set may hold a few more: tracks the killed
    # worker started whose `started` event died with it in its socket, or reached the hub after the supervisor's
    # crash report (two senders, no order between them); they end too, with ids below every later track's.
    assert open_at_crash and open_at_crash <= restarted
    later = [e["track_id"] for e in events[crash:] if e["kind"] == "track" and e["event"] == "started"
             and e["track_id"] not in restarted]
    assert later and min(later) > max(restarted)


@pytest.mark.slow
def test_decoder_restart_goes_on_from_the_next_file_frame(tmp_path):
    """A file's decoder killed mid-file was restarted from the file's first frame: every frame already published
    was detected and published again (frames 0..11 twice here, `frame` going back; found by an audit). The
    restarted decoder must go on from the first frame the worker has not taken: each frame once, in order."""
    total = 40
    events = _kill_mid_clip(tmp_path, total, "decoder-clip", 10, "realtime = true\n", """
[supervisor]
exit_when_done = true
restart_initial_seconds = 0.2
shutdown_timeout_seconds = 60
""", timeout=60, exit_timeout=120)
    assert any(e["kind"] == "error" and e.get("process") == "decoder-clip" for e in events)
    processed = [e["frame"] for e in events if e["kind"] == "detections"]
    assert processed == list(range(total)), processed


def test_track_ids_stay_unique_across_prompt_changes(mailbox_factory, stats_factory):
    """After a prompt change the new tracker numbered its tracks from 1 again, reusing the ids of tracks that had
    ended (docs/events.md: unique within the stream for the run)."""
    from fakes import frame_with_value, make_worker

    worker, mailboxes, _, sender, _ = make_worker(mailbox_factory, stats_factory,
                                                  [{"id": "cam", "live": True, "prompt": "old ."}])
    worker.encoding_for("old .")
    for value in range(8):
        if value == 4:
            worker.set_prompt("cam", "new .")
        mailboxes["cam"].put(frame_with_value(value), frame_index=value, pts=0, ts=time.time(), live=True)
        worker.step()
    started = [e["track_id"] for e in sender.events if e["kind"] == "track" and e["event"] == "started"]
    assert len(started) == 2 and started[1] > started[0], started
    boxes = [d["track_id"] for e in sender.events if e["kind"] == "detections" for d in e["detections"]]
    assert set(boxes) - {None} == set(started)


def test_one_ctrl_c_while_the_daemon_stops_by_itself_does_not_kill_its_children(monkeypatch):
    """Every file done, the daemon was stopping in order; one Ctrl-C then was taken for the second of two and
    killed every child on the spot ("second SIGINT while stopping: forcing the exit"), losing what the hub and the
    recorders still held (found with `groundwatch demo`, Ctrl-C at the video's end). Only a second signal forces."""
    from streamer.config import parse_config
    from streamer.daemon import Supervisor

    config = parse_config({"streams": [{"id": "cam", "url": "rtsp://127.0.0.1/cam", "prompt": "a person ."}]})
    supervisor = Supervisor(config)
    forced = []
    monkeypatch.setattr(supervisor, "force_exit", forced.append)
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        supervisor.install_signal_handlers()
        handler = signal.getsignal(signal.SIGINT)
        supervisor.request_stop("every stream finished")
        handler(signal.SIGINT, None)
        assert forced == [] and supervisor.stop_reason == "every stream finished"
        handler(signal.SIGINT, None)
        assert forced == [signal.SIGINT]
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
