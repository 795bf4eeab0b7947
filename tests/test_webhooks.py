"""Webhooks against local HTTP servers run by the test: signatures, retries with backoff, the queue bound,
snapshots, filters. (The daemon-level check, a hanging endpoint while frames flow, is in test_bridges_e2e.)"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streamer.config import WebhookConfig
from streamer.webhooks import SIGNATURE_HEADER, Counters, Endpoint, matches, sign, verify


class Server:
    """Answers POSTs with the statuses in `script` (then 204), or never (`hang`); keeps (time, headers, body)."""

    def __init__(self, script=(), hang: bool = False) -> None:
        self.script, self.hang = list(script), hang
        self.requests: list[tuple[float, dict, bytes]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append((time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                if outer.hang:
                    outer.release.wait(60)
                    return
                self.send_response(outer.script.pop(0) if outer.script else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(**kwargs):
        servers.append(Server(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def alert(n: int = 0, **fields) -> dict:
    return {"v": 1, "seq": n + 1, "stream": "door", "kind": "alert", "ts": 1.0, "wall": 2.0, "rule": "van",
            "n": n, **fields}


def test_signature_verifies_over_the_body_as_received(server_factory):
    """The X-Groundwatch-Signature-256 header is sha256=<hex HMAC-SHA256(secret, raw body)>; a receiver
    recomputing it over the bytes it got agrees, and a changed byte or another secret does not."""
    server = server_factory()
    config = WebhookConfig(url=server.url, secret="k3y", headers={"Authorization": "Bearer t"})
    endpoint = Endpoint(0, config, Counters(None, None))
    assert endpoint.deliver(alert(7))
    [(_, headers, body)] = server.requests
    assert headers[SIGNATURE_HEADER.lower()].startswith("sha256=")
    assert verify("k3y", body, headers[SIGNATURE_HEADER.lower()])
    assert not verify("other", body, headers[SIGNATURE_HEADER.lower()])
    assert not verify("k3y", body.replace(b'"n":7', b'"n":8'), headers[SIGNATURE_HEADER.lower()])
    import hashlib
    import hmac

    assert headers[SIGNATURE_HEADER.lower()] == "sha256=" + hmac.new(b"k3y", body, hashlib.sha256).hexdigest()
    document = json.loads(body)
    assert document["event"] == alert(7) and headers["x-groundwatch-delivery"] == document["delivery"]
    assert headers["authorization"] == "Bearer t" and headers["content-type"] == "application/json"
    assert headers["x-groundwatch-event"] == "alert"
    assert sign("k3y", b"") == "sha256=" + hmac.new(b"k3y", b"", hashlib.sha256).hexdigest()


def test_retries_with_exponential_backoff_on_500(server_factory):
    """Two 500 answers, then 204: three attempts, the gaps at least 0.2 s then 0.4 s (initial, doubled)."""
    server = server_factory(script=[500, 503])
    counters = Counters(None, None)
    endpoint = Endpoint(0, WebhookConfig(url=server.url, retry_initial_seconds=0.2, max_attempts=5), counters)
    assert endpoint.deliver(alert())
    times = [t for t, _, _ in server.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4
    assert counters.totals == {"webhook_retries": 2, "webhook_delivered": 1}
    bodies = {body for _, _, body in server.requests}
    assert len(bodies) == 1  # a retry sends the same delivery (same id, same signature)


def test_gives_up_after_max_attempts_and_does_not_retry_4xx(server_factory):
    failing = server_factory(script=[500] * 10)
    counters = Counters(None, None)
    endpoint = Endpoint(0, WebhookConfig(url=failing.url, retry_initial_seconds=0.05, max_attempts=3), counters)
    assert not endpoint.deliver(alert())
    assert len(failing.requests) == 3 and counters.totals["webhook_failed"] == 1
    refusing = server_factory(script=[403])
    endpoint = Endpoint(1, WebhookConfig(url=refusing.url, retry_initial_seconds=0.05), counters)
    assert not endpoint.deliver(alert())
    assert len(refusing.requests) == 1 and counters.totals["webhook_failed"] == 2


def test_queue_bound_holds_against_a_hanging_endpoint(server_factory):
    """An endpoint that never answers holds one request in flight; offering 50 events never waits, and the
    queue stays at queue_size with the oldest dropped and counted."""
    server = server_factory(hang=True)
    counters = Counters(None, None)
    endpoint = Endpoint(0, WebhookConfig(url=server.url, timeout_seconds=30, queue_size=5), counters)
    endpoint.thread.start()
    endpoint.offer(alert(0))
    deadline = time.monotonic() + 5
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.requests) == 1  # event 0 is in flight, hanging
    started = time.perf_counter()
    for n in range(1, 50):
        endpoint.offer(alert(n))
    assert time.perf_counter() - started < 1.0  # never waits on the endpoint
    assert [e["n"] for e in endpoint.queue] == [45, 46, 47, 48, 49]
    assert counters.totals["webhook_dropped"] == 44
    server.release.set()
    endpoint.stop(grace_seconds=0.0)


def test_snapshot_attached_as_base64(server_factory, tmp_path):
    jpeg = bytes([0xFF, 0xD8, 0xFF, 0xE0]) + b"groundwatch" * 10 + bytes([0xFF, 0xD9])
    (tmp_path / "snap.jpg").write_bytes(jpeg)
    server = server_factory()
    endpoint = Endpoint(0, WebhookConfig(url=server.url, secret="k"), Counters(None, None))
    assert endpoint.deliver(alert(has_snapshot=True, snapshot=str(tmp_path / "snap.jpg")))
    assert endpoint.deliver(alert(has_snapshot=True, snapshot=str(tmp_path / "gone.jpg")))  # sent without it
    first, second = (json.loads(body) for _, _, body in server.requests)
    assert base64.b64decode(first["snapshot"]["data_base64"]) == jpeg
    assert first["snapshot"]["content_type"] == "image/jpeg"
    assert "snapshot" not in second


def test_filters_and_cooldown():
    config = WebhookConfig(url="http://127.0.0.1:9/x", kinds=["alert"], rule="van", streams=["door"],
                           cooldown_seconds=60)
    assert matches(config, alert())
    assert not matches(config, alert(rule="person"))
    assert not matches(config, dict(alert(), stream="yard"))
    assert not matches(config, dict(alert(), kind="track"))
    counters = Counters(None, None)
    endpoint = Endpoint(0, config, counters)
    endpoint.offer(alert(0))
    endpoint.offer(alert(1))  # within the cooldown of the same stream, kind and rule
    endpoint.offer(dict(alert(2), rule="other"))
    assert [e["n"] for e in endpoint.queue] == [0, 2] and counters.totals["webhook_skipped"] == 1
