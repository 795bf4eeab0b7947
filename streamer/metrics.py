"""Prometheus metrics, read from the shared per-stream counters at each scrape (nothing to keep in sync)."""

from __future__ import annotations

import hmac
from http.server import ThreadingHTTPServer
from threading import Thread

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from streamer.stats import BRIDGE_STATE_CODES, STATE_CODES

COUNTERS = {
    "frames_decoded": "Frames decoded from the source.",
    "frames_processed": "Frames run through the detector.",
    "frames_dropped": "Stale live frames dropped to stay on the freshest frame.",
    "detections": "Boxes detected.",
    "track_events": "Track lifecycle events emitted.",
    "reconnects": "Times a live source was lost after being online.",
    "decode_errors": "Corrupt packets skipped.",
    "events_published": "Events published on the PUB socket.",
    "prompt_changes": "Prompt changes through the control socket.",
    "mqtt_published": "Messages the MQTT bridge handed to the broker.",
    "mqtt_dropped": "MQTT messages dropped (broker away or slow past mqtt.queue_size).",
    "webhook_delivered": "Webhook deliveries answered with 2xx.",
    "webhook_failed": "Webhook deliveries given up (every attempt failed, or a 4xx answer).",
    "webhook_retries": "Webhook attempts retried after a failure.",
    "webhook_dropped": "Webhook events dropped from a full queue (oldest first).",
    "webhook_skipped": "Webhook events skipped within cooldown_seconds.",
}


class SupervisorCollector:
    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor

    def collect(self):
        supervisor = self.supervisor
        stats = supervisor.stats
        for column, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"groundwatch_{column}", help_text, labels=["stream"])
            for stream in stats.stream_ids:
                family.add_metric([stream], stats.get(stream, column))
            yield family
        dropped = CounterMetricFamily("groundwatch_events_dropped", "Events dropped inside the daemon (hub behind).",
                                      labels=["stream"])
        fps = GaugeMetricFamily("groundwatch_fps", "Frames processed per second.", labels=["stream"])
        latency = GaugeMetricFamily("groundwatch_latency_seconds", "Decode to events sent, last frame.",
                                    labels=["stream"])
        inference = GaugeMetricFamily("groundwatch_inference_seconds", "Detector time per frame, last batch.",
                                      labels=["stream"])
        state = GaugeMetricFamily("groundwatch_stream_state", "1 for the stream's current state.",
                                  labels=["stream", "state"])
        for stream in stats.stream_ids:
            row = stats.row(stream)
            dropped.add_metric([stream], row["decoder_events_dropped"] + row["worker_events_dropped"])
            fps.add_metric([stream], supervisor._latest_rates.get(stream, {}).get("frames_processed", 0.0))
            latency.add_metric([stream], row["latency_ms"] / 1000)
            inference.add_metric([stream], row["inference_ms"] / 1000)
            for name, code in STATE_CODES.items():
                state.add_metric([stream, name], 1.0 if row["state"] == code else 0.0)
        mqtt_state = GaugeMetricFamily("groundwatch_mqtt_connected", "1 while the MQTT bridge is connected.",
                                       labels=[])
        mqtt_state.add_metric([], 1.0 if stats.stream_ids and stats.get(stats.stream_ids[0], "mqtt_state")
                              == BRIDGE_STATE_CODES["connected"] else 0.0)
        yield from (dropped, fps, latency, inference, state, mqtt_state)
        restarts = CounterMetricFamily("groundwatch_process_restarts", "Child processes restarted.",
                                       labels=["process"])
        for child in supervisor.children:
            restarts.add_metric([child.name], child.restarts)
        yield restarts
        placement = supervisor.cluster_placement() if hasattr(supervisor, "cluster_placement") else None
        if placement is not None:
            yield from cluster_metrics(placement)


def cluster_metrics(placement: dict):
    """With [cluster]: which node and actor serve each stream, and each detector actor's state."""
    where = GaugeMetricFamily("groundwatch_stream_placement", "1 for the node and actor serving a stream's stage.",
                              labels=["stream", "stage", "actor", "node", "host"])
    for stream, info in placement.get("streams", {}).items():
        decoder = info.get("decoder", {})
        if decoder.get("node"):
            where.add_metric([stream, "decoder", f"decoder-{stream}", decoder["node"], decoder.get("host") or ""], 1)
        if info.get("detector"):
            where.add_metric([stream, "detector", info["detector"], info.get("detector_node") or "",
                              info.get("detector_host") or ""], 1)
    ready = GaugeMetricFamily("groundwatch_detector_ready", "1 while a detector actor is up.", labels=["actor"])
    restarts = CounterMetricFamily("groundwatch_detector_restarts", "Times a detector actor was lost.",
                                   labels=["actor"])
    for name, detector in placement.get("detectors", {}).items():
        ready.add_metric([name], 1.0 if detector.get("state") == "ready" else 0.0)
        restarts.add_metric([name], detector.get("restarts", 0))
    nodes = GaugeMetricFamily("groundwatch_cluster_nodes", "Alive nodes of the Ray cluster.", labels=[])
    nodes.add_metric([], placement.get("nodes", 0))
    yield from (where, ready, restarts, nodes)


def _guarded(handler: type, token: str | None) -> type:
    """`handler` answering only requests with `Authorization: Bearer <token>` (401 otherwise) when a token is set
    (Prometheus: `authorization: {credentials: ...}` in the scrape config)."""
    if not token:
        return handler
    expected = f"Bearer {token}".encode()

    class TokenHandler(handler):
        def do_GET(self) -> None:
            if hmac.compare_digest(self.headers.get("Authorization", "").encode(), expected):
                super().do_GET()
                return
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="groundwatch metrics"')
            self.send_header("Content-Length", "0")
            self.end_headers()

    return TokenHandler


def start_metrics_server(supervisor, host: str, port: int, token: str | None = None):
    """Serve /metrics on a daemon thread (behind `token` when given). Returns (server, bound port)."""
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(supervisor))
    server = ThreadingHTTPServer((host, port), _guarded(MetricsHandler.factory(registry), token))
    server.daemon_threads = True
    Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server, server.server_address[1]
