"""A real daemon for the end-to-end tests: `python -m streamer.cli run` in a subprocess, on free loopback ports.

`Daemon` writes a config (by default with the tiny random model: plumbing, not answers; or the test's own text),
starts the daemon in its own process group (as a service manager does), waits until its worker is ready (failing at
once, with the log, if it exits first), stops it with SIGTERM and a timeout, and kills every process it started
when the test ends. `Subscriber` reads events when the test asks; `Collector` keeps every event on a thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).parent))
from rtsp_server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def dead_rtsp_url() -> str:
    """An RTSP URL with nothing listening (a camera that is off)."""
    return f"rtsp://127.0.0.1:{free_port()}/live"


def loopback_endpoint() -> str:
    """A tcp:// endpoint on a free loopback port."""
    return f"tcp://127.0.0.1:{free_port()}"


class Daemon:
    """`streams` and `extra` make a config with the tiny model (see `tiny_config`); `config_text` is written as it is
    instead, with `publish` and `control` the endpoints a client reaches it at. `env` adds environment variables;
    `server_key` is the daemon's CURVE public key, for the control requests made here."""

    def __init__(self, root: Path, streams: str = "", extra: str = "", *, record_directory: str = "recordings",
                 heartbeat_seconds: float = 0.2, config_text: str | None = None, publish: str | None = None,
                 control: str | None = None, env: dict[str, str] | None = None,
                 server_key: bytes | None = None) -> None:
        self.root = Path(root)
        self.publish = publish or loopback_endpoint()
        self.control = control or loopback_endpoint()
        self.env = dict(env or {})
        self.server_key = server_key
        self.config = self.root / "config.toml"
        if config_text is None:
            config_text = tiny_config(streams, extra, self.publish, self.control, record_directory=record_directory,
                                      heartbeat_seconds=heartbeat_seconds)
        self.config.write_text(config_text)
        self.log_path = self.root / "daemon.log"
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, log_name: str | None = None) -> "Daemon":
        """`log_name`: the log file in `root` from now on (a restarted daemon's, beside the first run's)."""
        if log_name is not None:
            self.log_path = self.root / log_name
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(REPO), "GROUNDWATCH_LOG": "INFO", **self.env}
        self.process = subprocess.Popen([sys.executable, "-m", "streamer.cli", "run", str(self.config)],
                                        cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """The status reply once the worker has loaded the model; a daemon that exits first (a bad config) fails
        here at once, with its log."""
        from streamer.client import wait_ready

        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before it was ready; "
                                     f"log:\n{self.log()}")
            try:
                return wait_ready(self.control, min(5.0, deadline - time.monotonic()), self.server_key)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"daemon not ready within {timeout:g} s; log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def request(self, message: dict, timeout: float = 10.0) -> dict:
        from streamer.client import request

        return request(self.control, message, timeout, self.server_key)

    def child_pids(self) -> dict[str, int]:
        return {name: p["pid"] for name, p in self.request({"cmd": "status"})["processes"].items() if p["pid"]}

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to the supervisor (as a service manager stops it), then SIGKILL to its whole group if it has not
        exited within `timeout` s. Returns its exit code, None when it had to be killed."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            code = self.wait_exit(timeout)
        self.kill()
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own process group: every child goes too
            except ProcessLookupError:
                pass
            self.process.wait(10)
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # children of a supervisor that already exited
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
            if os.environ.get("GROUNDWATCH_TEST_LOG"):
                print(self.log())


def tiny_config(streams: str, extra: str, publish: str, control: str, *, record_directory: str = "recordings",
                heartbeat_seconds: float = 0.2) -> str:
    """`streams` and defaults for every section (the tiny model, fast reconnects and flushes, no web console);
    `extra` adds keys to a section with "[section]" lines, and keys given there win over the defaults."""
    sections = {"model", "tracker", "live", "publish", "record", "metrics", "supervisor", "web"}
    defaults = {
        "model": 'weights = "tiny"\nshort_side = 64\nmax_side = 96\nbatch_size = 2\nbox_threshold = 0.9\n',
        "live": "open_timeout_seconds = 2\nread_timeout_seconds = 2\nreconnect_initial_seconds = 0.3\n"
                "reconnect_max_seconds = 1\n",
        "publish": f'endpoint = "{publish}"\ncontrol_endpoint = "{control}"\n'
                   f"heartbeat_seconds = {heartbeat_seconds}\n",
        "record": f'directory = "{record_directory}"\nflush_seconds = 0.2\n',
        "metrics": "port = 0\n",
        "tracker": "",
        "supervisor": "exit_when_done = false\nshutdown_timeout_seconds = 20\n",
        "web": "enabled = false\nport = 0\n",  # the console has its own tests (test_web*.py)
    }
    current, added = None, {name: "" for name in sections}
    for line in extra.strip().splitlines():
        if line.strip().startswith("[") and line.strip()[1:-1] in sections:
            current = line.strip()[1:-1]
        elif current is not None:
            added[current] += line + "\n"
    text = streams.strip() + "\n"
    for name in ("model", "tracker", "live", "publish", "record", "metrics", "supervisor", "web"):
        keys = {line.split("=")[0].strip() for line in added[name].splitlines() if "=" in line}
        kept = "".join(line + "\n" for line in defaults[name].splitlines() if line.split("=")[0].strip() not in keys)
        text += f"\n[{name}]\n{kept}{added[name]}"
    return text


class Subscriber:
    """A SUB socket read on demand (the test decides when to read). With `watch_connection`, `joins` lists the wall
    times at which it completed a handshake with a publisher (the daemon's start-up probe of the endpoint is one
    too; then the hub, and each hub after a restart)."""

    def __init__(self, endpoint: str, prefix: bytes = b"", *, watch_connection: bool = False) -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.joins: list[float] = []
        self._monitor = self._watcher = None
        self._closing = threading.Event()
        if watch_connection:
            self._monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
        self.socket.connect(endpoint)
        self.events: list[dict] = []

    def _watch(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while not self._closing.is_set():
            if self._monitor.poll(20):
                recv_monitor_message(self._monitor)
                self.joins.append(time.time())

    def read(self, seconds: float) -> list[dict]:
        from streamer.events import decode_payload

        deadline = time.monotonic() + seconds
        new = []
        while time.monotonic() < deadline:
            if self.socket.poll(50):
                while True:
                    try:
                        _, payload = self.socket.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    new.append(decode_payload(payload))
        self.events.extend(new)
        return new

    def wait_for(self, timeout: float, **fields) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if all(event.get(k) == v for k, v in fields.items()):
                return event
        while time.monotonic() < deadline:
            for event in self.read(0.1):
                if all(event.get(k) == v for k, v in fields.items()):
                    return event
        raise AssertionError(f"no event {fields} within {timeout} s; last: {self.events[-5:]}")

    def close(self) -> None:
        if self._watcher is not None:
            self._closing.set()
            self._watcher.join()
            self.socket.disable_monitor()
            self._monitor.close()
        self.socket.close()


class Collector:
    """A subscriber on its own thread that keeps every event it receives."""

    def __init__(self, endpoint: str) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from streamer.events import decode_payload

        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self.stop.is_set():
            if not poller.poll(100):
                continue
            while True:
                try:
                    frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2:  # a web console preview, not an event (docs/events.md)
                    continue
                topic, payload = frames
                event = decode_payload(payload)
                assert topic.decode() == f"{event['stream']}/{event['kind']}"
                with self.lock:
                    self.events.append(event)

    def select(self, stream=None, kind=None, since: int = 0, predicate=None, **fields) -> list[dict]:
        """The events so far (from index `since`) of `stream` and `kind` with these `fields`, for which
        `predicate(event)` holds when one is given."""
        with self.lock:
            events = self.events[since:]
        return [e for e in events if (stream is None or e["stream"] == stream) and (kind is None or e["kind"] == kind)
                and all(e.get(k) == v for k, v in fields.items()) and (predicate is None or predicate(e))]

    def mark(self) -> int:
        with self.lock:
            return len(self.events)

    def wait_for(self, timeout: float, stream=None, kind=None, since: int = 0, count: int = 1, predicate=None,
                 **fields) -> list[dict]:
        """Every matching event (as `select`) once there are at least `count` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.select(stream, kind, since, predicate, **fields)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {stream}/{kind} {fields} within {timeout} s; "
                             f"last events: {self.select(since=max(0, self.mark() - 5))}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.socket.close()
