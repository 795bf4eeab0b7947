"""A real RTSP server for the streamer tests: GStreamer's RTSP server serving a live H.264 test pattern.

Run as a script with Debian's /usr/bin/python3 (which has `gi`); the test side imports `RtspServer`, which
starts, kills, stalls (SIGSTOP) and resumes that subprocess on a fixed loopback port.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --width 160 --height 120 --fps 10
    -> rtsp://127.0.0.1:8554/live

With `--file VIDEO.mp4` (H.264 in MP4) it serves that video's packets instead, paced at its own frame rate, as a
camera would (a scene with known ground truth); each client that connects gets it from the start.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gstreamer_available() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert Gst.ElementFactory.find('x264enc') and Gst.ElementFactory.find('rtph264pay')")
    return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True).returncode == 0


class RtspServer:
    """The test side: one server subprocess on a fixed port that can be killed and started again."""

    def __init__(self, port: int | None = None, width: int = 160, height: int = 120, fps: int = 10,
                 file: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.width, self.height, self.fps = width, height, fps
        self.file = file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/live"

    def start(self, timeout: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [SYSTEM_PYTHON, __file__, "--port", str(self.port), "--width", str(self.width),
             "--height", str(self.height), "--fps", str(self.fps)] + (["--file", str(self.file)] if self.file else []),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()  # "READY" once the server is attached
        if not line.startswith("READY"):
            self.kill()
            raise RuntimeError(f"RTSP server did not start: {line!r}")
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("RTSP server not accepting connections")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stall(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--file", default=None)
    args = parser.parse_args()

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    if args.file:
        factory.set_launch(f'( filesrc location="{args.file}" ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 '
                           'config-interval=1 )')
        factory.set_shared(False)  # every client from the start
    else:
        factory.set_launch(
            f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={args.width},height={args.height},"
            f"framerate={args.fps}/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} "
            f"! rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
        factory.set_shared(True)
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        print("FAILED to attach", flush=True)
        sys.exit(1)
    print("READY", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
