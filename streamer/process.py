"""What every child process shares: start-up hygiene and the socket it sends events on."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import zmq

from streamer.events import pack_internal

log = logging.getLogger("groundwatch")

_PR_SET_PDEATHSIG = 1

# Exit codes of the child processes, read by the supervisor (streamer.daemon) to decide on a restart.
EXIT_DONE = 0  # finished (end of file reached) or asked to stop: never restarted
EXIT_ORPHANED = 1  # the supervisor was already gone when the child started
EXIT_FATAL = 3  # can never work (a corrupt file, a model that cannot load): not restarted; its error is out


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
    # The terminal sends SIGINT to the whole process group; only the supervisor decides the shutdown order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.basicConfig(
        level=os.environ.get("GROUNDWATCH_LOG", "INFO").upper(),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        stream=sys.stderr,
    )


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
