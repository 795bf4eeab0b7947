"""The control socket: JSON requests validated against a registry of command schemas, answered on a ROUTER.

Why ROUTER and not REP: a REP socket has a state machine (receive, then send, then receive) that a client can
break from outside (a request in two frames, a DEALER that skips the envelope), and pyzmq then raises in the
supervisor. A ROUTER has no such state: each request arrives with its sender's envelope, the reply goes back
with it whenever it is ready (so a slow command such as a prompt change is answered later without holding up
`status`), and a peer that vanished is simply dropped.

Every request is one frame holding a UTF-8 JSON object with a `cmd` field; its schema is chosen by `cmd`
(a pydantic discriminated union over the registered commands, unknown keys refused). Anything else gets
`{"ok": false, "error": "..."}` and the next request is served as usual. Components add commands with
`ControlServer.register(Schema, handler)`; a schema is a `ControlRequest` subclass with `cmd: Literal["name"]`.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Callable, Literal, Union

import zmq
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, field_validator

from streamer.auth import serve_curve
from streamer.prompts import prompt_problem

log = logging.getLogger("groundwatch.control")

MAX_REQUEST_BYTES = 1 << 20  # a request is a few hundred bytes; a prompt is capped far below this
DEFERRED = object()  # returned by a handler that answers later through its `Reply`


class ControlRequest(BaseModel):
    """Base of every command's schema: unknown keys are refused, strings are never coerced from other types."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    cmd: str


class StatusRequest(ControlRequest):
    cmd: Literal["status"]


class PingRequest(ControlRequest):
    cmd: Literal["ping"]


class StopRequest(ControlRequest):
    cmd: Literal["stop"]


StreamId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class SetPromptRequest(ControlRequest):
    cmd: Literal["set_prompt"]
    stream: StreamId
    prompt: str  # bounded by `prompt_problem` (characters) here, by the worker in tokens

    @field_validator("prompt")
    @classmethod
    def _has_words(cls, prompt: str) -> str:
        problem = prompt_problem(prompt)
        if problem:
            raise ValueError(problem)
        return prompt


class Reply:
    """Where a request's answer goes: the sender's envelope on the ROUTER socket. Answer once."""

    def __init__(self, server: "ControlServer", envelope: list[bytes]) -> None:
        self._server, self._envelope, self.sent = server, envelope, False

    def send(self, reply: dict) -> None:
        if not self.sent:
            self.sent = True
            self._server._send(self._envelope, reply)


Handler = Callable[[Any, Reply], "dict | object"]


class ControlServer:
    """Serves the control endpoint. `serve()` answers every waiting request without blocking."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None,
                 curve_keys: tuple[bytes, bytes] | None = None) -> None:
        self.socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        serve_curve(self.socket, curve_keys)  # beyond loopback: a CURVE server (streamer.auth)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_REQUEST_BYTES)  # larger frames drop the peer, unread
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        self.socket.setsockopt(zmq.RCVHWM, 1000)
        self.socket.bind(endpoint)
        self._handlers: dict[str, tuple[type[ControlRequest], Handler]] = {}
        self._adapter: TypeAdapter | None = None
        self.bad_requests = 0

    # -- the registry --------------------------------------------------------------------------------------

    def register(self, schema: type[ControlRequest], handler: Handler) -> None:
        """Add a command. `handler(request, reply)` returns the reply dict, or `DEFERRED` and calls
        `reply.send(...)` later."""
        name = schema.model_fields["cmd"].annotation.__args__[0]
        self._handlers[name] = (schema, handler)
        schemas = tuple(schema for schema, _ in self._handlers.values())
        union = schemas[0] if len(schemas) == 1 else Annotated[Union[schemas], Field(discriminator="cmd")]
        self._adapter = TypeAdapter(union)

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    def parse(self, body: bytes) -> ControlRequest:
        """One request frame -> its validated schema; raises ValueError with a readable reason."""
        if len(body) > MAX_REQUEST_BYTES:
            raise ValueError(f"a request must be at most {MAX_REQUEST_BYTES} bytes (got {len(body)})")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a request must be UTF-8 JSON") from None
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"a request must be a JSON object: {str(exc)[:120]}") from None
        if not isinstance(message, dict):
            raise ValueError(f'a request must be a JSON object with a "cmd" field, got {type(message).__name__}')
        command = message.get("cmd")
        if not isinstance(command, str):
            raise ValueError(f'"cmd" must be one of: {", ".join(self.commands)} (got {command!r:.60})')
        if command not in self._handlers:
            raise ValueError(f"unknown command {command[:60]!r} (commands: {', '.join(self.commands)})")
        try:
            return self._adapter.validate_python(message)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None

    # -- serving -------------------------------------------------------------------------------------------

    def serve(self, limit: int = 100) -> int:
        """Answer up to `limit` waiting requests. Returns how many were read."""
        count = 0
        while count < limit:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            count += 1
            envelope, body = _split_envelope(frames)
            reply = Reply(self, envelope)
            try:
                if len(body) != 1:
                    raise ValueError(f"a request must be exactly one frame (got {len(body)})")
                request = self.parse(body[0])
            except ValueError as exc:
                self.bad_requests += 1
                reply.send({"ok": False, "error": str(exc)})
                continue
            _, handler = self._handlers[request.cmd]
            try:
                answer = handler(request, reply)
            except Exception as exc:  # a handler's bug answers this request; it never ends the control loop
                log.exception("control command %s failed", request.cmd)
                answer = {"ok": False, "error": f"{request.cmd} failed: {type(exc).__name__}: {exc}"}
            if answer is not DEFERRED:
                reply.send(answer)
        return count

    def _send(self, envelope: list[bytes], reply: dict) -> None:
        try:
            self.socket.send_multipart([*envelope, json.dumps(reply).encode()], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the peer is gone or not reading: its answer is dropped, nobody else waits
            pass

    def close(self) -> None:
        self.socket.close()


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames -> (envelope to reply with, request frames). REQ and DEALER-with-delimiter clients put an
    empty frame between the two; a bare DEALER sends no delimiter, and then the envelope is its identity."""
    identity, rest = frames[:1], frames[1:]
    if rest and rest[0] == b"":
        return identity + [b""], rest[1:]
    return identity, rest


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors as one line per field, without echoing large inputs back."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"][1:]) or "request"  # loc[0] is the command's tag
        if error["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown field")
        elif error["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
