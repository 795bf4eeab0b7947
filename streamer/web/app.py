"""The console's ASGI app (Starlette): thin, typed routes over the bus, the control socket and the recordings.

    GET  /                                        the page (static files: index.html, CSS, ES modules)
    GET  /api/streams                             streams, prompts, figures (control `status`) and permissions
    GET  /api/live?previews=a,b                   Server-Sent Events: every event, previews of the named streams
    GET  /api/events?stream=&kind=&phrase=&limit= recent track/status/error events (the page's first fill)
    POST /api/streams/{stream}/prompt             {"prompt": "..."} -> control `set_prompt` (full access only)
    GET  /api/recordings                          per stream, what can be replayed
    GET  /api/recordings/{stream}/{id}/events     the recording's events, read from the event log
    GET  /api/recordings/{stream}/{id}/video      its video (range requests: seeking works)
    POST /login, POST /logout                     the token cookie (only when web.token is set)

Errors are JSON `{"error": "..."}` with the status that says what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from streamer import client
from streamer.web.auth import ADMIN, COOKIE, LOGIN_PAGE, TokenAuth, role_of
from streamer.web.bus import Bus, sse
from streamer.web.recordings import NotFound, VideoCache, list_recordings, recording_events
from streamer.web.settings import MAX_PROMPT_CHARS, WebSettings

STATIC = Path(__file__).parent / "static"
KEEPALIVE_SECONDS = 15.0
COUNTERS_SECONDS = 2.0


MAX_BODY_BYTES = 64 * 1024


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes (read no further: a huge body costs nothing)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(settings: WebSettings, *, bus: Bus | None = None) -> Starlette:
    bus = bus or Bus(settings.publish_endpoint, settings.viewer_queue, server_key=settings.server_key)
    videos = VideoCache()

    async def control(message: dict, timeout: float) -> dict:
        return await asyncio.to_thread(client.request, settings.control_endpoint, message, timeout,
                                       settings.server_key)

    def stream_or_404(stream_id: str):
        stream = settings.stream(stream_id)
        if stream is None:
            raise HTTPException(404, f"no stream {stream_id!r} (streams: {', '.join(s.id for s in settings.streams)})")
        return stream

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def streams(request: Request) -> Response:
        try:
            status = await control({"cmd": "status"}, 3.0)
        except TimeoutError:
            status = {"ok": False, "error": "the daemon's control socket did not answer"}
        figures = status.get("streams", {}) if status.get("ok") else {}
        return JSONResponse({
            "streams": [{"id": s.id, "source": "live" if s.live else "file", "recording_video": bool(
                s.video_directory), **figures.get(s.id, {})} for s in settings.streams],
            "daemon": {"ok": bool(status.get("ok")), "error": status.get("error"), "uptime": status.get("uptime"),
                       "pid": status.get("pid"), "worker_ready": status.get("worker_ready")},
            "role": request.scope.get("groundwatch.role"), "can_change_prompts":
                request.scope.get("groundwatch.role") == ADMIN, "auth": settings.token is not None,
            "web": {**bus.counters(), "preview_fps": settings.preview_fps}, **bus.snapshot()})

    async def live(request: Request) -> Response:
        wanted = {s for s in request.query_params.get("previews", "").split(",") if s}
        unknown = sorted(s for s in wanted if settings.stream(s) is None)
        if unknown:
            return _error(404, f"no stream {', '.join(map(repr, unknown))}")
        viewer = bus.add_viewer(wanted)

        async def body():
            try:
                yield b"retry: 1000\n" + sse(json.dumps(bus.snapshot(), separators=(",", ":")).encode(), "hello")
                next_counters = asyncio.get_running_loop().time() + COUNTERS_SECONDS
                while not bus.closed.is_set():
                    loop_time = asyncio.get_running_loop().time()
                    timeout = max(0.05, min(KEEPALIVE_SECONDS, next_counters - loop_time))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(viewer.wake.wait(), timeout)
                    viewer.wake.clear()
                    chunk = viewer.take()
                    if asyncio.get_running_loop().time() >= next_counters:
                        next_counters = asyncio.get_running_loop().time() + COUNTERS_SECONDS
                        chunk += sse(json.dumps(viewer.counters()).encode(), "viewer")
                    yield chunk or b": keep-alive\n\n"
            finally:
                bus.remove_viewer(viewer)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def events(request: Request) -> Response:
        query = request.query_params
        stream, kind, phrase = query.get("stream"), query.get("kind"), query.get("phrase")
        if stream:
            stream_or_404(stream)
        try:
            limit = int(query.get("limit", "200"))
        except ValueError:
            return _error(422, "limit must be an integer")
        if not 1 <= limit <= 500:
            return _error(422, "limit must be between 1 and 500")
        found = [e for e in bus.recent if (not stream or e.get("stream") == stream)
                 and (not kind or e.get("kind") == kind) and (not phrase or phrase in str(e.get("phrase", "")))]
        return JSONResponse({"events": found[-limit:]})

    async def set_prompt(request: Request) -> Response:
        stream = stream_or_404(request.path_params["stream"])
        if request.scope.get("groundwatch.role") != ADMIN:
            return _error(403, "this token may view but not change prompts")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "send the prompt as JSON: {\"prompt\": \"a person .\"}")
        raw = await read_limited(request, MAX_BODY_BYTES)
        if raw is None:
            return _error(413, f"request too large (at most {MAX_BODY_BYTES} bytes)")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON")
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(prompt, str):
            return _error(422, "\"prompt\" must be a string")
        prompt = prompt.strip()
        if not prompt:
            return _error(422, "the prompt is empty: say what to look for, e.g. \"a person . a car .\"")
        if len(prompt) > MAX_PROMPT_CHARS:
            return _error(422, f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
        try:
            reply = await control({"cmd": "set_prompt", "stream": stream.id, "prompt": prompt}, 90.0)
        except TimeoutError:
            return _error(504, "the daemon did not answer in time")
        if not reply.get("ok"):
            return _error(400, str(reply.get("error", "the daemon refused the prompt")))
        return JSONResponse(reply)

    async def recordings(request: Request) -> Response:
        return JSONResponse({"recordings": await asyncio.to_thread(list_recordings, settings)})

    async def recording_events_route(request: Request) -> Response:
        stream = stream_or_404(request.path_params["stream"])
        try:
            found = await asyncio.to_thread(recording_events, settings, stream, request.path_params["recording"])
        except NotFound as exc:
            return _error(404, str(exc))
        return JSONResponse(found)

    async def recording_video(request: Request) -> Response:
        stream = stream_or_404(request.path_params["stream"])
        try:
            path = await asyncio.to_thread(videos.video_for, stream, request.path_params["recording"])
        except NotFound as exc:
            return _error(404, str(exc))
        except Exception as exc:  # a segment torn beyond reading
            return _error(500, f"cannot read the recording's video: {type(exc).__name__}: {exc}")
        return FileResponse(path, media_type="video/mp4")

    async def login(request: Request) -> Response:
        # The form is urlencoded; parsed with the standard library (Starlette's form parser needs another package).
        raw = await read_limited(request, 4096)
        try:
            token = parse_qs(raw.decode("utf-8"), max_num_fields=4).get("token", [None])[0] if raw else None
        except (UnicodeDecodeError, ValueError):
            token = None
        role = role_of(token, settings.token, settings.read_token)
        if settings.token is None:
            return RedirectResponse("/", status_code=303)
        if role is None:
            page = LOGIN_PAGE.replace("{message}", '<p class="error">That token is not valid.</p>')
            return Response(page, status_code=401, media_type="text/html")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                            max_age=30 * 24 * 3600)
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def not_found(request: Request, exc: HTTPException) -> Response:
        message = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else (
            f"no route {request.method} {request.url.path}")
        return _error(exc.status_code, message)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        bus.start()
        try:
            yield
        finally:
            await bus.close()
            videos.close()

    routes = [
        Route("/", index),
        Route("/api/streams", streams),
        Route("/api/live", live),
        Route("/api/events", events),
        Route("/api/streams/{stream}/prompt", set_prompt, methods=["POST"]),
        Route("/api/recordings", recordings),
        Route("/api/recordings/{stream}/{recording}/events", recording_events_route),
        Route("/api/recordings/{stream}/{recording}/video", recording_video),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found},
                    middleware=[Middleware(TokenAuth, token=settings.token, read_token=settings.read_token)])
    app.state.bus = bus
    return app
