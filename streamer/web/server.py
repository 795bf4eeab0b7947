"""The web process: uvicorn serving the console's app on the socket the supervisor bound.

The supervisor binds the listening socket once (so a taken port is an error at start-up, port 0 picks a free one,
and a restarted web process serves on the very same address) and hands it to each web process it starts.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from streamer.process import child_setup
from streamer.web.settings import WebSettings


def bind_listener(host: str, port: int) -> socket.socket:
    """The console's listening socket (raises OSError when the address is taken)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    listener = socket.create_server((host, port), family=family, backlog=128)
    listener.set_inheritable(True)
    return listener


def serve(settings: WebSettings, listener: socket.socket, stop) -> None:
    """Serve until `stop` (a multiprocessing or threading Event) is set."""
    import uvicorn

    from streamer.web.app import build_app

    app = build_app(settings)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=1, ws="none")

    class Server(uvicorn.Server):
        def capture_signals(self):
            # Signals belong to the supervisor (child_setup ignores SIGINT): it decides when we stop, via `stop`.
            return contextlib.nullcontext()

    server = Server(config)

    def watch() -> None:
        # Polled, never `stop.wait()`: a process killed while sleeping in a multiprocessing Event's wait leaves
        # the Event's condition counting a sleeper that never wakes, and the supervisor's `stop.set()` at
        # shutdown would then block forever.
        while not stop.is_set():
            time.sleep(0.2)
        server.should_exit = True

    threading.Thread(target=watch, name="web-stop", daemon=True).start()
    server.run(sockets=[listener])


def web_main(*, settings: WebSettings, listener: socket.socket, stop, parent_pid: int) -> None:
    """Entry point of the web process (spawned by the supervisor)."""
    child_setup("web", parent_pid)
    serve(settings, listener, stop)
