"""Access control for the daemon's sockets: ZeroMQ CURVE (encryption and server authentication).

Loopback endpoints (`tcp://127.*`, `tcp://localhost`, `tcp://[::1]`, `ipc://`) stay open: only users of this
machine reach them. Binding the event or control endpoint to anything else needs a CURVE key pair (written by
`groundwatch keys`): the daemon serves with its secret key, and a client must know the server's public key to
complete the handshake; without it the client's connection never carries a message. Keys are ZeroMQ's own
certificate files (`zmq.auth.create_certificates`), loaded with `zmq.auth.load_certificate`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import zmq
import zmq.auth

_TCP_HOST = re.compile(r"^tcp://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/]+)):(?P<port>[^/]+)$")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message says which and why."""


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach. `tcp://*`, `0.0.0.0`, interface names and every other
    address are not."""
    if endpoint.startswith("ipc://") or endpoint.startswith("inproc://"):
        return True
    match = _TCP_HOST.match(endpoint)
    if not match:
        return False
    host = match.group("v6") or match.group("host")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name (eth0) or a host name: may reach beyond this machine


def connectable(endpoint: str) -> str:
    """The address a local client connects to for a bound endpoint (`tcp://*:P` / `tcp://0.0.0.0:P` bind every
    interface, loopback included)."""
    match = _TCP_HOST.match(endpoint)
    if match and (match.group("host") in ("*", "0.0.0.0") or match.group("v6") in ("::",)):
        return f"tcp://127.0.0.1:{match.group('port')}"
    return endpoint


def write_key_pair(directory: str | Path, name: str = "server") -> tuple[Path, Path]:
    """Write `<name>.key` (public: give it to clients) and `<name>.key_secret` (the daemon's; mode 0600).
    Refuses to overwrite an existing pair: clients hold the old public key."""
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it first (clients that hold its public key lose access)")
    directory.mkdir(parents=True, exist_ok=True)
    # The secret is created unreadable to others (umask), not made so after being written: a chmod afterwards left
    # a moment in which anyone on the machine could read it. The public key is then opened to all.
    previous = os.umask(0o077)
    try:
        public_path, secret_path = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(previous)
    os.chmod(public_path, 0o644)
    return Path(public_path), Path(secret_path)


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a `.key_secret` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the key pair {path}: {exc}") from None
    if not secret:
        raise KeyFileError(f"{path} holds no secret key (give the daemon the .key_secret file, not the .key)")
    return public, secret


def load_public(key: str | Path) -> bytes:
    """A server's public key: a 40-character Z85 string or a `.key`/`.key_secret` file holding it."""
    text = str(key)
    if len(text) == 40 and not Path(text).exists():
        return text.encode()
    try:
        public, _ = zmq.auth.load_certificate(text)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the public key {text}: {exc}") from None
    return public


def serve_curve(socket: zmq.Socket, keys: tuple[bytes, bytes] | None) -> None:
    """Make `socket` a CURVE server (before `bind`). `keys` is (public, secret); None leaves it open."""
    if keys is None:
        return
    socket.curve_publickey, socket.curve_secretkey = keys
    socket.curve_server = True


def client_curve(socket: zmq.Socket, server_public: bytes | None) -> None:
    """Make `socket` a CURVE client of a server with this public key (before `connect`), with a fresh key pair
    of its own. None leaves it a plain client."""
    if server_public is None:
        return
    public, secret = zmq.curve_keypair()
    socket.curve_publickey, socket.curve_secretkey = public, secret
    socket.curve_serverkey = server_public
