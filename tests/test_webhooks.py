"""Webhooks against local HTTP servers run by the test: signatures, retries with backoff, the queue bound,
snapshots, filters, answers that trickle or flood. (The daemon-level check, a hanging endpoint while frames flow,
is in test_bridges_e2e.)"""

from __future__ import annotations

import base64
import json
import resource
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streamer.config import WebhookConfig
from streamer.webhooks import SIGNATURE_HEADER, Counters, Endpoint, matches, sign, verify


class Server:
    """Answers POSTs with the statuses in `script` (then 204), or never (`hang`), or with the raw bytes that
    `answer(write, release)` writes; keeps (time, headers, body)."""

    def __init__(self, script=(), hang: bool = False, answer=None) -> None:
        self.script, self.hang, self.answer = list(script), hang, answer
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
                if outer.answer is not None:
                    try:
                        outer.answer(self.wfile.write, outer.release)
                    except OSError:
                        pass  # the client hung up, as it should
                    self.close_connection = True
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


def trickle(head: bytes, drip: bytes):
    """An answer: `head` at once, then `drip` a byte every 0.3 s until the client hangs up (or the test ends);
    every read sees a byte well inside any read timeout."""

    def answer(write, release):
        write(head)
        for byte in drip:
            if release.wait(0.3):
                return
            write(bytes([byte]))

    return answer


def deliver_in_thread(endpoint: Endpoint, event: dict) -> tuple[threading.Event, list]:
    done, result = threading.Event(), []
    threading.Thread(target=lambda: (result.append(endpoint.deliver(event)), done.set()), daemon=True).start()
    return done, result


def test_trickling_answer_body_does_not_hold_the_delivery_thread(server_factory):
    """A server that answered 200 and then sent its (chunked) body a byte every 0.3 s held the endpoint's only
    delivery thread forever: httpx's timeout is per read, and the whole body was read. Every later event for that
    endpoint waited behind it and was dropped. Now the status is all that counts: the delivery returns at once."""
    server = server_factory(answer=trickle(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                           b"1\r\nx\r\n" * 10_000))
    counters = Counters(None, None)
    endpoint = Endpoint(0, WebhookConfig(url=server.url, timeout_seconds=2.0, max_attempts=1), counters)
    started = time.monotonic()
    done, result = deliver_in_thread(endpoint, alert(0))
    assert done.wait(10), "the delivery thread was still reading the trickled body 10 s later (timeout 2 s)"
    assert result == [True] and time.monotonic() - started < 4.0
    # A short body that trickles is read under the same deadline: within timeout_seconds, still delivered.
    slow_short = server_factory(answer=trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 100))
    endpoint = Endpoint(1, WebhookConfig(url=slow_short.url, timeout_seconds=1.5, max_attempts=1), counters)
    started = time.monotonic()
    done, result = deliver_in_thread(endpoint, alert(1))
    assert done.wait(10), "the delivery thread was still reading a 100-byte body trickled over 30 s"
    assert result == [True] and time.monotonic() - started < 3.5
    assert counters.totals == {"webhook_delivered": 2}


def test_trickling_status_line_fails_the_attempt_at_its_deadline(server_factory):
    """timeout_seconds is the bound of one attempt, not of one read: a server that sent its status line and
    headers a byte every 0.3 s never tripped httpx's read timeout and held the delivery thread for as long as it
    liked. Each attempt now ends by its deadline, is counted as failed and retried like any timeout."""
    server = server_factory(answer=trickle(b"", b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000))
    counters = Counters(None, None)
    config = WebhookConfig(url=server.url, timeout_seconds=1.0, max_attempts=2, retry_initial_seconds=0.1)
    endpoint = Endpoint(0, config, counters)
    started = time.monotonic()
    done, result = deliver_in_thread(endpoint, alert())
    assert done.wait(12), "two attempts of timeout_seconds=1 still had not ended 12 s later"
    elapsed = time.monotonic() - started
    assert result == [False] and 2.0 <= elapsed < 5.0, elapsed
    assert len(server.requests) == 2
    assert counters.totals == {"webhook_retries": 1, "webhook_failed": 1}


def gzip_of_zeros(mebibytes: int) -> bytes:
    """A gzip stream of `mebibytes` MiB of zeros (about 1 KB per MiB), made a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(mebibytes)) + packer.flush()


def test_compressed_answer_body_is_not_read_into_memory(server_factory):
    """A 200 whose body was ~250 KB of gzip (256 MiB inflated) grew the webhooks process's peak memory by about
    twice the inflated size: the whole answer was read and decompressed, so a hostile or broken endpoint could get
    the process killed. The body is not read now (nor inflated): peak memory stays put."""
    bomb = gzip_of_zeros(256)

    def answer(write, release):
        write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Encoding: gzip\r\n"
              b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb)

    server = server_factory(answer=answer)
    counters = Counters(None, None)
    endpoint = Endpoint(0, WebhookConfig(url=server.url, timeout_seconds=20.0, max_attempts=1), counters)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    assert endpoint.deliver(alert())
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB for one answer to one POST"
    assert counters.totals == {"webhook_delivered": 1}
