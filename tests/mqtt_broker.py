"""A real Mosquitto broker for tests (Debian's `mosquitto`, installed by scripts/setup.sh).

Each broker runs from its own config file on a free loopback port and is stopped by its pid; the package's own
service is never used. `restart()` brings it back on the same port (without persistence, so retained messages
are gone: what reappears was published again by the client).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from rtsp_server import free_port  # noqa: F401  (the tests' one free-port finder, offered here too)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (path for path in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.access(path, os.X_OK)), None)


class Mosquitto:
    def __init__(self, directory: Path, users: dict[str, str] | None = None, persistence: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.users = users
        self.process: subprocess.Popen | None = None
        store = [f"persistence true", f"persistence_location {self.directory}/"] if persistence else [
            "persistence false"]
        lines = [f"listener {self.port} 127.0.0.1", *store, "user root", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if users:
            password_file = self.directory / "passwords"
            password_file.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines += ["allow_anonymous true"]
        self.config = self.directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = self.directory / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (scripts/setup.sh installs it)")
        self._log_file = open(self.log, "a")
        self.process = subprocess.Popen([binary, "-c", str(self.config)], stdout=self._log_file,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if getattr(self, "_log_file", None):
            self._log_file.close()
            self._log_file = None

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


class Recorder:
    """A paho-mqtt subscriber on the broker that keeps every message (topic, payload, retain flag)."""

    def __init__(self, port: int, topics: list[str], user: str | None = None, password: str | None = None,
                 client_id: str | None = None, clean_session: bool = True) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.topics = topics
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-recorder-{os.getpid()}-"
                             f"{id(self)}", clean_session=clean_session)
        if user:
            client.username_pw_set(user, password)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.reconnect_delay_set(0.1, 0.5)
        client.connect_async("127.0.0.1", port, keepalive=10)
        client.loop_start()
        self.client = client
        if not self.connected.wait(10):
            raise RuntimeError("the test subscriber could not connect to mosquitto")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe([(topic, 1) for topic in self.topics])
            self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def select(self, topic: str | None = None, since: int = 0, prefix: str | None = None) -> list[tuple]:
        with self.lock:
            messages = self.messages[since:]
        return [m for m in messages if (topic is None or m[0] == topic) and (prefix is None or m[0].startswith(prefix))]

    def mark(self) -> int:
        with self.lock:
            return len(self.messages)

    def wait_for(self, predicate, timeout: float, what: str = "a message", since: int = 0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [m for m in self.messages[since:] if predicate(m)]
            if found:
                return found
            time.sleep(0.05)
        with self.lock:
            last = [(t, p[:200]) for t, p, _ in self.messages[-8:]]
        raise AssertionError(f"no {what} within {timeout} s; last messages: {last}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_copy(port: int, topic: str, timeout: float = 15.0) -> bytes:
    """The broker's retained message on `topic`, as a new subscriber gets it (flagged retained). Asks again with
    a fresh subscriber until one comes (a publisher may still be on its way), or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        subscriber = Recorder(port, [topic])
        try:
            found = subscriber.wait_for(lambda m: m[0] == topic and m[2], 1.0, f"retained {topic}")
            return found[0][1]
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        finally:
            subscriber.close()
