"""What the daemon benchmarks share: their config files, free loopback endpoints, `groundwatch run` started and
stopped by pid, the steady-state rate from the daemon's own `detections` events, and the machine's CPU model.

Used by ``benchmarks/web.py``, ``benchmarks/live_redaction.py``, ``benchmarks/cluster.py``, ``benchmarks/soak.py``
and (the free port) ``benchmarks/pipeline.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

REPO = Path(__file__).resolve().parents[1]

# The default model at the scale it was trained for, and the lower tracker thresholds its scores need (as the
# bundled demo, streamer/assets/demo.toml, runs it).
DEFAULT_MODEL = {"weights": "default", "box_threshold": 0.3, "short_side": 192, "max_side": 256}
DEFAULT_TRACKER = {"high_score": 0.3, "new_track_score": 0.3, "low_score": 0.1}


def config_text(streams: list[dict], *, model: dict, endpoint: str, control_endpoint: str, record_directory: Path,
                tracker: dict | None = None, web: bool | None = False, exit_when_done: bool = True,
                **sections: dict | None) -> str:
    """A benchmarked daemon's config (TOML): `streams` as its [[streams]], `model` as [model], `tracker` as [tracker]
    (None: the daemon's defaults), events published on `endpoint`, control on `control_endpoint`, recordings in
    `record_directory`, metrics off, the web console on a free port or off (None: the daemon's default), and
    `exit_when_done`. `sections` adds tables (None: left out) or keys to those above (e.g.
    ``publish={"heartbeat_seconds": 1.0}``)."""
    tables: dict[str, dict] = {
        "model": model,
        "tracker": tracker,
        "publish": {"endpoint": endpoint, "control_endpoint": control_endpoint},
        "record": {"directory": record_directory},
        "metrics": {"enabled": False},
        "supervisor": {"exit_when_done": exit_when_done},
        "web": None if web is None else {"enabled": True, "port": 0} if web else {"enabled": False},
    }
    for name, keys in sections.items():
        if keys is not None:
            tables[name] = {**(tables.get(name) or {}), **keys}
    text = "".join("[[streams]]\n" + _toml_keys(stream) + "\n" for stream in streams)
    return text + "\n".join(f"[{name}]\n{_toml_keys(keys)}" for name, keys in tables.items() if keys is not None)


def _toml_keys(keys: dict) -> str:
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in keys.items())


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_endpoint() -> str:
    """A tcp:// endpoint on a free loopback port."""
    return f"tcp://127.0.0.1:{free_port()}"


def daemon_env() -> dict[str, str]:
    """The environment of a benchmarked daemon: this checkout's code, warnings only in its log."""
    return dict(os.environ, PYTHONPATH=str(REPO), GROUNDWATCH_LOG="WARNING")


def command(config: Path) -> list[str]:
    return [sys.executable, "-m", "streamer.cli", "run", str(config)]


def start(config: Path, *, cwd: Path | None = None, log: TextIO | None = None) -> subprocess.Popen:
    """`groundwatch run config` in the background; its output goes to `log` (an open file) or nowhere."""
    output = log if log is not None else subprocess.DEVNULL
    return subprocess.Popen(command(config), cwd=cwd, env=daemon_env(), stdout=output, stderr=subprocess.STDOUT)


def run_to_end(config: Path, *, cwd: Path | None = None, timeout: float) -> subprocess.CompletedProcess:
    """`groundwatch run config` to its exit (a config with `exit_when_done`), its output captured."""
    return subprocess.run(command(config), cwd=cwd, env=daemon_env(), capture_output=True, text=True,
                          timeout=timeout)


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (a clean shutdown); SIGKILL if the daemon has not exited within `timeout` s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class DetectionStamps:
    """Stamps every `detections` event of one stream, on a subscriber thread, until the stream's `end_of_file`.

    `stamp(event)` gives the time recorded for an event (its `wall`, or the time it was received). Start it before
    the daemon so that the first frames are not missed."""

    def __init__(self, publish: str, stream: str, stamp: Callable[[dict], float], timeout: float) -> None:
        self.publish, self.stream, self.stamp, self.timeout = publish, stream, stamp, timeout
        self.stamps: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()
        time.sleep(0.3)  # the subscription reaches the daemon's publisher as soon as it binds

    def _listen(self) -> None:
        from streamer.client import subscribe

        for event in subscribe(self.publish, self.stream, timeout=self.timeout):
            if event["kind"] == "detections":
                self.stamps.append(self.stamp(event))
            if event["kind"] == "status" and event.get("reason") == "end_of_file":
                break
        self.done.set()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


def steady_rate(stamps: list[float]) -> float:
    """Frames per second from the first frame out to the last (model loading and start-up left out)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def cpu_model() -> str | None:
    """The CPU's model name as lscpu gives it (None where it gives none)."""
    output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Model name")),
                None)
