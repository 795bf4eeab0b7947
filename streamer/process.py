"""What every child process shares: start-up hygiene and the socket it sends events on."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

import zmq

from streamer.events import pack_internal

log = logging.getLogger("groundwatch")

_PR_SET_PDEATHSIG = 1

# Exit codes of the child processes, read by the supervisor (streamer.daemon) to decide on a restart.
EXIT_DONE = 0  # finished (end of file reached) or asked to stop: never restarted
EXIT_ORPHANED = 1  # the supervisor was already gone when the child started
EXIT_FATAL = 3  # can never work (a corrupt file, a model that cannot load): not restarted; its error is out

# Exit status of `groundwatch run` itself (the supervisor), besides 0 (done) and 1 (the model could not load).
EXIT_DEGRADED = 3  # the run ended normally but lost part of its recording (see docs/events.md, "Exit status")


def child_setup(name: str, parent_pid: int) -> None:
    """Run first in a child: die with the parent, leave Ctrl-C to the supervisor, name the process."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        # The kernel kills us if the supervisor dies, even by SIGKILL: no orphan keeps a camera open.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(15, ctypes.c_char_p(f"gw-{name}"[:15].encode()))  # PR_SET_NAME: visible in ps/top
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)
    # The terminal sends SIGINT (and SIGHUP when it closes), and a service manager SIGTERM, to the whole process
    # group; only the supervisor decides the shutdown order (it stops us through our stop flag, and kills us if we
    # overrun).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("GROUNDWATCH_LOG", "INFO").upper(),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )


class SharedFlag:
    """A yes/no flag in shared memory, with the `Event` methods the processes use (`set`, `clear`, `is_set`,
    `wait`).

    Not a `multiprocessing.Event`: its condition's lock and semaphores can be left held by a child killed inside
    `wait()`, and then the supervisor's `set()` blocks forever (that hung the shutdown). A single byte written
    by one side and read by the other needs no lock; `wait` polls it.
    """

    def __init__(self, context) -> None:
        self._value = context.RawValue(ctypes.c_int8, 0)

    def set(self) -> None:
        self._value.value = 1

    def clear(self) -> None:
        self._value.value = 0

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float | None = None, poll_seconds: float = 0.02) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._value.value:
            remaining = poll_seconds if deadline is None else min(poll_seconds, deadline - time.monotonic())
            if remaining <= 0:
                break
            time.sleep(remaining)
        return self.is_set()


class EventSender:
    """PUSH socket to the hub. Sending never blocks: when the hub is behind, the event is dropped and counted."""

    def __init__(self, endpoint: str, high_water_mark: int = 100_000) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, high_water_mark)
        self.socket.setsockopt(zmq.LINGER, 2000)  # on close, give queued events 2 s to reach the hub
        self.socket.connect(endpoint)
        self.dropped = 0

    def send(self, event: dict) -> bool:
        try:
            self.socket.send_multipart(pack_internal(event), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def send_frames(self, frames: list[bytes]) -> bool:
        """A message that is not an event (a preview frame: `streamer.web.preview`); dropped like one."""
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def close(self) -> None:
        self.socket.close()

    def flush_and_close(self, timeout: float = 2.0) -> None:
        """Close and wait (at most `timeout`) until queued events reached the hub: for a process about to leave
        with os._exit, which would otherwise take its last events (the reason it is leaving) with it."""
        self.socket.close(linger=int(timeout * 1000))
        waiter = threading.Thread(target=self.context.term, daemon=True)
        waiter.start()
        waiter.join(timeout + 0.5)
