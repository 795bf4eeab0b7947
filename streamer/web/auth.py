"""Access to the web console: who may view, who may change prompts.

No token configured (only allowed on loopback): everyone on this machine has full access, and the Host header
must name loopback, so a web page elsewhere cannot reach the console through DNS rebinding. With `web.token`
(and optionally `web.read_token`) every request on every route, the live stream included, must carry one:
`Authorization: Bearer <token>`, or the `groundwatch_token` cookie that the login form sets (HttpOnly,
SameSite=Strict). Never a query parameter: URLs end up in logs and browser history. Tokens are compared in
constant time (`hmac.compare_digest`), both of them on every request.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie

COOKIE = "groundwatch_token"
ADMIN, VIEWER = "admin", "viewer"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
OPEN_ROUTES = {("POST", "/login")}  # checks the submitted token itself; a wrong one is a 401 too

LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>groundwatch: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>
body{font:15px system-ui,sans-serif;background:#111418;color:#e6e6e6;display:grid;place-items:center;height:100vh;margin:0}
form{background:#1b2027;padding:24px 28px;border-radius:8px;display:grid;gap:12px;min-width:300px}
input,button{font:inherit;padding:8px;border-radius:4px;border:1px solid #39414d;background:#0e1115;color:inherit}
button{background:#2f6fde;border:0;cursor:pointer}.error{color:#ff7b72}</style></head><body>
<form method="post" action="/login"><h1 style="margin:0;font-size:20px">groundwatch</h1>
<label>Access token <input name="token" type="password" autocomplete="current-password" autofocus required></label>
<button type="submit">Sign in</button>{message}</form></body></html>"""


def role_of(presented: str | None, token: str | None, read_token: str | None) -> str | None:
    """The role a presented token grants, in constant time; None when it grants nothing."""
    if token is None:
        return ADMIN
    candidate = (presented or "").encode()
    is_admin = hmac.compare_digest(candidate, token.encode())
    is_viewer = read_token is not None and hmac.compare_digest(candidate, read_token.encode())
    if presented and is_admin:
        return ADMIN
    if presented and is_viewer:
        return VIEWER
    return None


def presented_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    cookie_token = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return credential.strip()
        elif name == b"cookie":
            cookies = SimpleCookie()
            try:
                cookies.load(value.decode("latin-1"))
            except Exception:  # a malformed cookie header is no token, not a crash
                continue
            if COOKIE in cookies:
                cookie_token = cookies[COOKIE].value
    return cookie_token


class TokenAuth:
    """ASGI middleware in front of every route: sets `scope["groundwatch.role"]` or answers 401 (or 400 for a
    foreign Host header when no token is configured)."""

    def __init__(self, app, *, token: str | None, read_token: str | None) -> None:
        self.app, self.token, self.read_token = app, token, read_token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # no WebSocket routes: the router refuses those itself
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if self.token is None:
            host = next((v.decode("latin-1") for n, v in headers if n == b"host"), "")
            hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if hostname not in LOOPBACK_HOSTS:
                await _plain(send, 400, {"error": f"host {host!r} is not loopback; set web.token to serve others"})
                return
            scope["groundwatch.role"] = ADMIN
            await self.app(scope, receive, send)
            return
        role = role_of(presented_token(headers), self.token, self.read_token)
        if role is None and (scope.get("method"), scope["path"]) not in OPEN_ROUTES:
            accept = next((v for n, v in headers if n == b"accept"), b"")
            if b"text/html" in accept:
                await _html(send, 401, LOGIN_PAGE.replace("{message}", ""))
            else:
                await _plain(send, 401, {"error": "unauthorized: send Authorization: Bearer <web.token>"})
            return
        scope["groundwatch.role"] = role
        await self.app(scope, receive, send)


async def _plain(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"www-authenticate", b'Bearer realm="groundwatch"')]})
    await send({"type": "http.response.body", "body": data})


async def _html(send, status: int, page: str) -> None:
    data = page.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(data)).encode()), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": data})
