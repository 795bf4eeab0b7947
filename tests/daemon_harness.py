"""A real daemon for the hardening tests: `python -m streamer.cli run` in a subprocess, on free loopback ports.

`Daemon` writes a config with the tiny random model (plumbing, not answers), starts the daemon in its own process
group (as a service manager does), and kills every process it started when the test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).parent))
from rtsp_server import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def dead_rtsp_url() -> str:
    """An RTSP URL with nothing listening (a camera that is off)."""
    return f"rtsp://127.0.0.1:{free_port()}/live"


class Daemon:
    def __init__(self, root: Path, streams: str, extra: str = "", *, record_directory: str = "recordings",
                 heartbeat_seconds: float = 0.2) -> None:
        self.root = Path(root)
        self.publish = f"tcp://127.0.0.1:{free_port()}"
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.config = self.root / "config.toml"
        sections = {"model", "tracker", "live", "publish", "record", "metrics", "supervisor", "web"}
        defaults = {
            "model": 'weights = "tiny"\nshort_side = 64\nmax_side = 96\nbatch_size = 2\nbox_threshold = 0.9\n',
            "live": "open_timeout_seconds = 2\nread_timeout_seconds = 2\nreconnect_initial_seconds = 0.3\n"
                    "reconnect_max_seconds = 1\n",
            "publish": f'endpoint = "{self.publish}"\ncontrol_endpoint = "{self.control}"\n'
                       f"heartbeat_seconds = {heartbeat_seconds}\n",
            "record": f'directory = "{record_directory}"\nflush_seconds = 0.2\n',
            "metrics": "port = 0\n",
            "tracker": "",
            "supervisor": "exit_when_done = false\nshutdown_timeout_seconds = 20\n",
            "web": "enabled = false\nport = 0\n",  # the console has its own tests (test_web*.py)
        }
        # `extra` adds keys to a section with "[section]" lines; keys given there win over the defaults.
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
        self.config.write_text(text)
        self.log_path = self.root / "daemon.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONPATH=str(REPO), GROUNDWATCH_LOG="INFO")
        self.process = subprocess.Popen([sys.executable, "-m", "streamer.cli", "run", str(self.config)],
                                        cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict:
        from streamer.client import wait_ready

        try:
            return wait_ready(self.control, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"daemon not ready; log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def request(self, message: dict, timeout: float = 10.0) -> dict:
        from streamer.client import request

        return request(self.control, message, timeout)

    def child_pids(self) -> dict[str, int]:
        return {name: p["pid"] for name, p in self.request({"cmd": "status"})["processes"].items() if p["pid"]}

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

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
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


class Subscriber:
    """A SUB socket read on demand (the test decides when to read)."""

    def __init__(self, endpoint: str, prefix: bytes = b"") -> None:
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, prefix)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.events: list[dict] = []

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
        self.socket.close()
