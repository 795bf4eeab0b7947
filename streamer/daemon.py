"""The supervisor: starts the processes, restarts crashed ones with backoff, serves the control socket and the
Prometheus metrics, and shuts everything down in one ordered place.

Processes (all spawned, never forked: torch and ZeroMQ do not survive a fork):
    hub      PULL events from children -> PUB socket + event logs + heartbeats
    worker   mailboxes -> detector (batched across streams) -> tracker per stream -> events
    decoder  one per stream: PyAV -> RGB frames -> the stream's shared-memory mailbox
    mqtt     with [mqtt]: event bus -> MQTT broker (Frigate topics, Home Assistant discovery); prompts from MQTT
    webhooks with [[webhooks]]: event bus -> signed JSON POSTs
    web      with [web] enabled (the default): the operator's console (streamer/web), a client of PUB and control

Shutdown (SIGINT, SIGTERM, SIGHUP, or every file done): decoders stop first, then the worker drains what they decoded
and ends open tracks, then the hub publishes and records what is in flight and closes the logs. Each stage has
its own stop event so the order is explicit; a stage that overruns its timeout is killed. The bridges (mqtt,
webhooks) stop last, after the hub, so that they still carry its final events. Children also get
PR_SET_PDEATHSIG, so even a SIGKILL of the supervisor leaves no orphan.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zmq

from streamer.auth import load_secret
from streamer.alerts import stream_alert_args
from streamer.alerts_control import SetRulesRequest, SetZonesRequest
from streamer.config import Config, ConfigError, parse_places, parse_rules, rule_warnings
from streamer.control import (DEFERRED, ControlServer, PingRequest, Reply, SetPromptRequest, StatusRequest,
                              StopRequest)
from streamer.decoder import decoder_main
from streamer.events import make_event
from streamer.frames import FrameMailbox, remove_stale_mailboxes
from streamer.hub import hub_main
from streamer.inference import worker_main
from streamer.lastvalue import StateWatch
from streamer.opentracks import OpenTracks
from streamer.process import EXIT_DEGRADED, EXIT_DONE, EXIT_FATAL, EventSender, SharedFlag
from streamer.recording import run_stamp
from streamer.redaction import build_redaction_settings
from streamer.retention import build_retention
from streamer.stats import RateMeter, StreamStats, snapshot

log = logging.getLogger("groundwatch")


def remove_stale_runtime_dirs() -> None:
    """Delete `groundwatch-<pid>-*` folders in the temp directory whose daemon no longer runs (kill -9)."""
    for path in Path(tempfile.gettempdir()).glob("groundwatch-*-*"):
        parts = path.name.split("-")
        if len(parts) < 3 or not parts[1].isdigit() or not path.is_dir():
            continue
        if int(parts[1]) != os.getpid() and not Path(f"/proc/{parts[1]}").exists():
            shutil.rmtree(path, ignore_errors=True)


class StartupError(RuntimeError):
    """The daemon cannot start (nothing has been created yet); the message says why."""


class EndpointError(StartupError):
    """A ZeroMQ endpoint of the config cannot be bound."""


@dataclass
class Child:
    name: str
    stage: int  # shutdown order: lower stops first
    target: Callable
    kwargs: Callable[[], dict]  # built at each start: a restarted worker gets the current prompts
    stop: object
    stream: str | None = None
    process: multiprocessing.Process | None = None
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    done: bool = False  # exited for good (file finished, fatal error): never restarted
    exit_codes: list = field(default_factory=list)


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.context = multiprocessing.get_context("spawn")
        self.stream_ids = [stream.id for stream in config.streams]
        self.prompts = {stream.id: stream.prompt for stream in config.streams}
        # Lock-free flags (see SharedFlag): a child killed at any point can never block the shutdown.
        self.stage_stops = {stage: SharedFlag(self.context) for stage in (0, 1, 2, 3)}  # 3: bridges, after the hub
        self.worker_ready = SharedFlag(self.context)
        self.worker_control = self.worker_replies = None
        self._new_worker_queues()
        self.detect_stamp = self.context.Value("d", 0.0, lock=False)  # see streamer.watchdog
        self.children: list[Child] = []
        self.stop_reason: str | None = None
        self.signalled = False  # a stop signal has come (a second one forces the exit)
        self.exit_code = 0
        self.run_stamp = f"{run_stamp()}-{os.getpid()}"
        self.started = time.time()
        self.metrics_url: str | None = None
        self.web_url: str | None = None
        self.web_listener = None
        self._metrics_server = None
        self._request_id = 0
        self._rates = None
        self._latest_rates: dict[str, dict] = {}
        self._closed = False
        self.places = {stream.id: stream for stream in config.streams}  # zones and lines, as set at run time
        self.rules = list(config.rules)
        self.retention = build_retention(config.record, self.run_stamp) if config.record.enabled else None
        self._next_expiry = 0.0
        for warning in rule_warnings(self.rules, self.prompts):
            log.warning("%s", warning)
        self._state_watch: StateWatch | None = None
        key_file = config.publish.curve_secret_key_file
        self.curve_keys = load_secret(key_file) if key_file else None  # checked by the config already
        self.control: ControlServer | None = None
        self._after_hub_restart: list[dict] = []  # events to publish once a restarted hub can be heard
        self._pending: dict[int, tuple[float, Callable[[dict], None]]] = {}  # worker requests awaiting a reply
        self.cluster = config.cluster if config.cluster.address else None  # [cluster]: stages as Ray actors

    # -- set-up --------------------------------------------------------------------------------------------

    @property
    def record_paths(self) -> dict[str, str]:
        if not self.config.record.enabled:
            return {}
        directory = Path(self.config.record.directory)
        return {s: str(directory / s / f"events-{self.run_stamp}.jsonl") for s in self.stream_ids}

    def video_directory(self, stream) -> str | None:
        """Where a stream's recorded video goes: a live source's (copied packets), or a redacted stream's (the
        worker's re-encoded redacted frames, files too)."""
        if not (stream.record_video and (stream.is_live or stream.redact)):
            return None
        video = Path(self.config.record.directory) / stream.id / "video"
        # A file's segments are named by media time, the same in every run over it: each run has its own folder,
        # named like its event log (`events-<run>.jsonl`), so a later run never replaces an earlier one's video.
        return str(video if stream.is_live else video / self.run_stamp)

    def decoder_video_directory(self, stream) -> str | None:
        """The decoder copies packets only of streams without `redact`: a redacted stream's raw pixels never
        reach the disk, so its recording is the worker's (streamer/redaction.py)."""
        return None if stream.redact else self.video_directory(stream)

    def start(self) -> None:
        """Bind the sockets, create the shared memory, spawn the processes (hub first). Raises
        `EndpointError` when an endpoint is taken, before anything is started."""
        config = self.config
        try:
            self.control = ControlServer(config.publish.control_endpoint, curve_keys=self.curve_keys)
            probe = zmq.Context.instance().socket(zmq.PUB)  # the hub binds it; fail here, not in a restart loop
            probe.setsockopt(zmq.LINGER, 0)
            try:
                probe.bind(config.publish.endpoint)
            finally:
                probe.close()
        except zmq.ZMQError as exc:
            if self.control is not None:
                self.control.close()
            raise EndpointError(f"cannot bind {config.publish.control_endpoint} / {config.publish.endpoint}: {exc} "
                                "(is another groundwatch running? change [publish] endpoints)") from None
        self._bind_web()
        self._register_commands()
        remove_stale_mailboxes()  # what a daemon killed with SIGKILL left: only ones whose pid no longer runs
        remove_stale_runtime_dirs()
        self._check_record_directory()
        self._check_cluster()
        try:
            self._start_metrics()  # the last endpoint: checked before any shared memory or folder is created
        except OSError as exc:
            self.control.close()
            raise StartupError(f"cannot serve metrics on {self.config.metrics.host}:{self.config.metrics.port}: "
                               f"{exc.strerror or exc} (is another groundwatch running? change [metrics] port, "
                               "or port = 0 for any free port)") from None
        self.runtime_dir = tempfile.mkdtemp(prefix=f"groundwatch-{os.getpid()}-")
        self.events_endpoint = f"ipc://{self.runtime_dir}/events"
        self.stats = StreamStats.create(self.stream_ids)
        self.open_tracks = OpenTracks.create(self.stream_ids)
        self._rates = RateMeter(self.stats)
        self.mailboxes: dict[str, FrameMailbox] = {}
        for stream in config.streams if self.cluster is None else ():  # on a cluster, frames live in Ray
            # live: one slot being read, one being written, one freshest waiting; file: a batch in flight too
            slots = 3 if stream.is_live else config.model.batch_size + 2
            self.mailboxes[stream.id] = FrameMailbox.create(
                stream.id, slots, stream.max_width, stream.max_height, self.context.Lock()
            )
        self.sender = EventSender(self.events_endpoint)

        pid = os.getpid()
        stats_spec = self.stats.spec()
        self.children.append(Child("hub", 2, hub_main, lambda: dict(
            pull_endpoint=self.events_endpoint, pub_endpoint=config.publish.endpoint,
            high_water_mark=config.publish.high_water_mark, heartbeat_seconds=config.publish.heartbeat_seconds,
            stats_spec=stats_spec, record_directory=config.record.directory if config.record.enabled else None,
            flush_seconds=config.record.flush_seconds, run_stamp=self.run_stamp, stop=self.stage_stops[2],
            parent_pid=pid, curve_secret_key_file=config.publish.curve_secret_key_file), self.stage_stops[2]))
        if self.cluster is not None:
            self.children.append(self._cluster_child(stats_spec, pid))
        self.children.extend([] if self.cluster is not None else [Child("worker", 1, worker_main, lambda: dict(
            streams=[s.model_copy(update={"prompt": self.prompts[s.id]}) for s in config.streams],
            mailbox_specs={s: m.spec() for s, m in self.mailboxes.items()}, stats_spec=stats_spec,
            events_endpoint=self.events_endpoint, model=config.model,
            tracker=config.tracker, batch_size=config.model.batch_size, stop=self.stage_stops[1],
            control=self.worker_control, replies=self.worker_replies, ready=self.worker_ready,
            parent_pid=pid, oom_recover_seconds=config.model.oom_recover_seconds, detect_stamp=self.detect_stamp,
            preview=self._preview_settings(), open_tracks_spec=self.open_tracks.spec(),
            alerts={s.id: stream_alert_args(config, s, self.run_stamp, self.video_directory(s),
                                            places=self.places[s.id], rules=self.rules) for s in config.streams},
            redactions={s.id: build_redaction_settings(s, self.video_directory(s), config.live.segment_seconds)
                        for s in config.streams if s.redact}),
            self.stage_stops[1])])
        for stream in config.streams if self.cluster is None else ():  # on a cluster: decoder actors
            self.children.append(Child(f"decoder-{stream.id}", 0, decoder_main, lambda s=stream: dict(
                stream=s, mailbox_spec=self.mailboxes[s.id].spec(), stats_spec=stats_spec,
                events_endpoint=self.events_endpoint, live=config.live,
                video_directory=self.decoder_video_directory(s), stop=self.stage_stops[0], parent_pid=pid),
                self.stage_stops[0], stream=stream.id))
        for child in sorted(self.children, key=lambda c: -c.stage):  # hub first: its sockets must be bound
            self._spawn(child)
            if child.name == "hub":
                self._wait_hub_published()
        self._state_watch = StateWatch(config.publish.endpoint, self.stream_ids,
                                       self.curve_keys[0] if self.curve_keys else None)
        for child in self._bridge_children(stats_spec, pid):
            self.children.append(child)
            self._spawn(child)

    def _check_cluster(self) -> None:
        """With [cluster]: the address must answer within `connect_timeout_seconds`, before anything starts."""
        if self.cluster is None:
            return
        from streamer.cluster.runner import ClusterError, check_reachable

        redacted = [s.id for s in self.config.streams if s.redact]
        if redacted:  # fail closed: the detector actors do not redact, and raw pixels must not reach the disk
            self.control.close()
            raise StartupError(f"streams {', '.join(redacted)}: redact is not supported with [cluster] yet; run "
                               "them on one machine (without --cluster)")
        try:
            check_reachable(self.cluster.address, self.cluster.connect_timeout_seconds)
        except ClusterError as exc:
            self.control.close()
            raise StartupError(str(exc)) from None

    def _cluster_child(self, stats_spec: dict, pid: int) -> Child:
        """The Ray driver in the inference worker's place: same stop flag, control queues, counters, events."""
        from streamer.cluster.runner import cluster_main

        config = self.config
        self.placement_path = str(Path(self.runtime_dir) / "cluster.json")
        return Child("worker", 1, cluster_main, lambda: dict(
            streams=[s.model_copy(update={"prompt": self.prompts[s.id]}) for s in config.streams],
            cluster=self.cluster, model=config.model, tracker=config.tracker, live=config.live,
            batch_size=config.model.batch_size, stats_spec=stats_spec, events_endpoint=self.events_endpoint,
            stop=self.stage_stops[1], control=self.worker_control, replies=self.worker_replies,
            ready=self.worker_ready, parent_pid=pid, placement_path=self.placement_path,
            video_directories={s.id: self.decoder_video_directory(s) for s in config.streams},
            alerts={s.id: stream_alert_args(config, s, self.run_stamp, self.video_directory(s),
                                            places=self.places[s.id], rules=self.rules) for s in config.streams},
            run_name=f"gw-{self.run_stamp}"), self.stage_stops[1])

    def cluster_placement(self) -> dict | None:
        """Where each stream's decoder and detector run (written by the Ray driver), or None on one machine."""
        if self.cluster is None or not getattr(self, "placement_path", None):
            return None
        try:
            return json.loads(Path(self.placement_path).read_text())
        except (OSError, ValueError):
            return {"address": self.cluster.address, "detectors": {}, "streams": {}, "nodes": 0}

    def _bridge_children(self, stats_spec: dict, pid: int) -> list[Child]:
        """The MQTT bridge and the webhooks: clients of the event bus and the control socket, stopped after the
        hub so that they still carry its last events."""
        config, children = self.config, []
        if config.mqtt is not None and config.mqtt.enabled:
            from streamer.mqtt_bridge import mqtt_main

            children.append(Child("mqtt", 3, mqtt_main, lambda: dict(
                config=config.mqtt, prompts=dict(self.prompts), events_endpoint=config.publish.endpoint,
                control_endpoint=config.publish.control_endpoint, internal_endpoint=self.events_endpoint,
                stats_spec=stats_spec, stop=self.stage_stops[3], parent_pid=pid,
                server_key=self.curve_keys[0] if self.curve_keys else None), self.stage_stops[3]))
        if config.webhooks:
            from streamer.webhooks import webhooks_main

            children.append(Child("webhooks", 3, webhooks_main, lambda: dict(
                webhooks=list(config.webhooks), stream_ids=list(self.stream_ids),
                events_endpoint=config.publish.endpoint, internal_endpoint=self.events_endpoint,
                stats_spec=stats_spec, stop=self.stage_stops[3], parent_pid=pid,
                server_key=self.curve_keys[0] if self.curve_keys else None), self.stage_stops[3]))
        if self.web_listener is not None:
            from streamer.web.server import web_main
            from streamer.web.settings import build_web_settings

            web_settings = build_web_settings(config, server_key=self.curve_keys[0] if self.curve_keys else None)
            children.append(Child("web", 3, web_main, lambda: dict(
                settings=web_settings, listener=self.web_listener, stop=self.stage_stops[3], parent_pid=pid),
                self.stage_stops[3]))
        return children

    def _bind_web(self) -> None:
        """Bind the console's port here, once: a taken port fails the start, and restarts reuse the socket."""
        web = self.config.web
        if not web.enabled:
            return
        from streamer.web.server import bind_listener

        try:
            self.web_listener = bind_listener(web.host, web.port)
        except OSError as exc:
            self.control.close()
            raise EndpointError(f"cannot bind the web console to {web.host}:{web.port}: {exc.strerror or exc} "
                                "(is another groundwatch running? change [web] port, or enabled = false)") from None
        host, port = self.web_listener.getsockname()[:2]
        self.web_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def _preview_settings(self):
        if not self.config.web.enabled:
            return None  # nobody to show them to: the worker encodes no previews
        from streamer.web.preview import PreviewSettings

        web = self.config.web
        return PreviewSettings(fps=web.preview_fps, short_side=web.preview_short_side, quality=web.preview_quality)

    def _check_record_directory(self) -> None:
        """Refuse to start when recordings cannot be written at all (a full disk later is survived and reported,
        see `Hub`); checked by writing a probe file in every stream's folder."""
        if not self.config.record.enabled:
            return
        for stream in self.stream_ids:
            folder = Path(self.config.record.directory) / stream
            probe = folder / f".groundwatch-probe-{os.getpid()}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with open(probe, "wb") as file:
                    file.write(b"probe\n")
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as exc:
                self.control.close()
                raise StartupError(f"record.directory {str(folder)!r} is not writable: {exc.strerror or exc} "
                                   "(fix the folder or set [record] enabled = false)") from None
            finally:
                try:
                    probe.unlink()
                except OSError:
                    pass

    def _start_metrics(self) -> None:
        if not self.config.metrics.enabled:
            return
        from streamer.metrics import start_metrics_server

        metrics = self.config.metrics
        self._metrics_server, port = start_metrics_server(self, metrics.host, metrics.port, metrics.token)
        self.metrics_url = f"http://{self.config.metrics.host}:{port}/metrics"

    def _new_worker_queues(self) -> None:
        """Fresh request/reply queues for each worker: a worker killed while holding a queue's lock must not
        take its successor (or the supervisor) with it. Requests the dead worker never answered fail now."""
        for old in (self.worker_control, self.worker_replies):
            if old is not None:
                old.cancel_join_thread()
                old.close()
        self.worker_control = self.context.Queue()
        self.worker_replies = self.context.Queue()
        self.worker_control.cancel_join_thread()  # never wait at exit for a dead worker to read its requests
        self._fail_pending("the inference worker restarted; try again")

    def _fail_pending(self, error: str) -> None:
        """Answer every request still waiting for the worker with `error` (its clients would wait out their
        timeouts otherwise)."""
        pending, self._pending = getattr(self, "_pending", {}), {}
        for _, on_reply in pending.values():
            on_reply({"ok": False, "error": error})

    def _spawn(self, child: Child) -> None:
        if child.name == "hub":
            for stream in self.stream_ids:
                self.stats.set(stream, "hub_started", 0.0)  # set again by the new hub once it has bound
        if child.name == "worker":
            for stream in self.config.streams:  # a file's frames the dead worker held are processed again
                if stream.id in self.mailboxes:
                    self.mailboxes[stream.id].recover_reading(redeliver=not stream.is_live)
            self.worker_ready.clear()
            self.detect_stamp.value = 0.0
            if child.process is not None:
                self._new_worker_queues()
        child.process = self.context.Process(target=child.target, kwargs=child.kwargs(), name=f"gw-{child.name}",
                                             daemon=True)
        child.process.start()
        child.started_at = time.monotonic()
        child.restart_at = None

    # -- supervision -----------------------------------------------------------------------------------------

    def _check_children(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.done:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    log.warning("restarting %s (restart %d)", child.name, child.restarts)
                    self._spawn(child)
                continue
            process = child.process
            if child.name == "worker" and process is not None and process.is_alive():
                self._watch_detector(process)
            if process is None or process.is_alive():
                continue
            code = process.exitcode
            process.join()
            child.exit_codes.append(code)
            if child.stream is not None and code in (EXIT_DONE, EXIT_FATAL):
                child.done = True  # file finished, or a source that can never work (its error event is out)
                continue
            if child.name == "worker" and code == EXIT_FATAL:
                child.done = True
                self.request_stop("the model could not be loaded" if self.cluster is None else
                                  "the Ray cluster could not be used (see the error events)")
                self.exit_code = 1
                continue
            if now - child.started_at > 60:
                child.failures = 0
            child.failures += 1
            initial = self.config.supervisor.restart_initial_seconds
            delay = min(self.config.supervisor.restart_max_seconds, initial * 2 ** (child.failures - 1))
            child.restart_at = now + delay
            message = f"process {child.name} exited with code {code}; restarting in {delay:.1f} s"
            log.error(message)
            events = [make_event(stream, "error", message=message, error_type="process_crashed", fatal=False,
                                 process=child.name) for stream in ([child.stream] if child.stream else self.stream_ids)]
            if child.name == "hub":
                self._after_hub_restart.extend(events)  # the dead hub cannot publish them; its successor will
                for stream in self.stream_ids:
                    self.stats.set(stream, "hub_started", 0.0)
            else:
                for event in events:
                    self.sender.send(event)

    def _hub_published_since(self) -> float:
        """Wall time at which the running hub bound its sockets (0 until it has)."""
        return self.stats.get(self.stream_ids[0], "hub_started")

    def _wait_hub_published(self, timeout: float = 120.0) -> None:
        """At start: let the hub bind before the producers start (it holds what they send until subscribers had
        `streamer.hub.JOIN_SECONDS` to connect, so they get the first `online` status)."""
        deadline = time.monotonic() + timeout
        hub = next(c for c in self.children if c.name == "hub")
        while not self._hub_published_since() and time.monotonic() < deadline and hub.process.is_alive():
            time.sleep(0.02)

    def _send_after_hub_restart(self) -> None:
        """Send the restarted hub's crash report once it has bound (it publishes it when subscribers have had time to
        reconnect)."""
        if self._after_hub_restart and self._hub_published_since():
            events, self._after_hub_restart = self._after_hub_restart, []
            for event in events:
                self.sender.send(event)

    def _watch_detector(self, process) -> None:
        """Kill a worker whose detector call overran `model.watchdog_seconds`; it is restarted like a crash."""
        from streamer.watchdog import DetectorWatchdog

        limit = self.config.model.watchdog_seconds
        elapsed = DetectorWatchdog.overrun(self.detect_stamp, limit)
        if elapsed is None:
            return
        message = f"a detector call has run {elapsed:.1f} s (model.watchdog_seconds = {limit:g}); killing the worker"
        log.error(message)
        for stream in self.stream_ids:
            self.sender.send(make_event(stream, "error", message=message, error_type="detector_hung", fatal=False,
                                        process="worker"))
        self.detect_stamp.value = 0.0
        process.kill()
        process.join(5)

    def _all_done(self) -> bool:
        if not self.config.supervisor.exit_when_done:
            return False
        return all(self.stats.get(stream, "worker_finished") >= 1 for stream in self.stream_ids)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("stopping: %s", reason)

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            # A hang-up can come twice (the shell passes it on to its jobs, then the kernel sends it to the
            # foreground group): only a second SIGINT or SIGTERM is someone asking for the exit now. A first
            # signal during a stop the daemon began itself (every file done) asks for nothing more: it stops.
            if self.signalled and signum != signal.SIGHUP:
                self.force_exit(signum)
            self.signalled = True
            if self.stop_reason is not None:
                log.info("%s: already stopping (%s); send it again to force the exit", signal.Signals(signum).name,
                         self.stop_reason)
            self.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        # A closed terminal or SSH session hangs up: stop in order too (its default action killed us on the spot,
        # leaving shared memory, the runtime folder and the hub's last events behind).
        signal.signal(signal.SIGHUP, handler)

    def run(self, on_ready: Callable[["Supervisor"], None] | None = None) -> int:
        """Start, supervise until asked to stop (or every file is done), shut down. Returns the exit code."""
        try:
            self.start()  # raises StartupError before creating anything when an endpoint is taken
        except BaseException:
            self._abandon_start()
            raise
        if on_ready is not None:
            on_ready(self)
        poller = zmq.Poller()
        poller.register(self.control.socket, zmq.POLLIN)
        next_check = next_rates = 0.0
        try:
            while self.stop_reason is None:
                if poller.poll(20 if self._pending else 100):
                    self.control.serve()
                self._collect_worker_replies()
                now = time.monotonic()
                if now >= next_rates:
                    next_rates = now + 1.0
                    self._latest_rates = {s: self._rates.rates(s, now) for s in self.stream_ids}
                    if self._state_watch is not None:
                        self._state_watch.drain()
                if self.retention is not None and now >= self._next_expiry:
                    self._next_expiry = now + self.config.record.retain.expire_interval_seconds
                    self.expire()
                if now >= next_check:
                    next_check = now + 0.2
                    self._check_children()
                    self._send_after_hub_restart()
                    if self._all_done():
                        self.request_stop("every stream finished")
        finally:
            self.shutdown()
        if self.exit_code == 0 and self._recording_degraded():
            self.exit_code = EXIT_DEGRADED
        return self.exit_code

    def _recording_degraded(self) -> bool:
        return bool(getattr(self, "_record_health", None)) and any(
            errors or lost for errors, lost in self._record_health.values())

    # -- control socket ----------------------------------------------------------------------------------------

    def status(self) -> dict:
        streams = {}
        for stream in self.config.streams:
            figures = snapshot(self.stats, stream.id, self._latest_rates.get(stream.id))
            figures.update(prompt=self.prompts[stream.id], source="live" if stream.is_live else "file")
            if self._state_watch is not None:
                figures.update(self._state_watch.state(stream.id))
            streams[stream.id] = figures
        placement = self.cluster_placement()
        if placement is not None:
            for stream_id, where in placement.get("streams", {}).items():
                if stream_id in streams:
                    streams[stream_id]["cluster"] = where
        processes = {
            child.name: {"pid": child.process.pid if child.process else None,
                         "alive": bool(child.process and child.process.is_alive()), "restarts": child.restarts}
            for child in self.children
        }
        return {"ok": True, "uptime": round(time.time() - self.started, 3), "pid": os.getpid(),
                "worker_ready": self.worker_ready.is_set(), "streams": streams, "processes": processes,
                "publish": self.config.publish.endpoint, "metrics": self.metrics_url, "recordings": self.record_paths,
                "web": self.web_url, **({"cluster": placement} if placement is not None else {})}

    def _register_commands(self) -> None:
        """The control socket's commands (docs/events.md). Others register theirs on `self.control` too."""
        self.control.register(StatusRequest, lambda request, reply: self.status())
        self.control.register(PingRequest, lambda request, reply: {"ok": True})
        self.control.register(StopRequest, self._stop_command)
        self.control.register(SetPromptRequest, self._set_prompt_command)
        self.control.register(SetZonesRequest, self._set_zones_command)
        self.control.register(SetRulesRequest, self._set_rules_command)

    def _stop_command(self, request: StopRequest, reply: Reply) -> dict:
        self.request_stop("stop requested on the control socket")
        return {"ok": True}

    def _set_prompt_command(self, request: SetPromptRequest, reply: Reply):
        """Answered when the worker has encoded the prompt (or refused it); `status` is served meanwhile."""
        stream, prompt = request.stream, request.prompt
        if stream not in self.prompts:
            return {"ok": False, "error": f"no stream {stream!r} (streams: {', '.join(self.stream_ids)})"}

        def done(answer: dict) -> None:
            if answer.get("ok"):
                self.prompts[stream] = prompt  # a restarted worker starts with the new prompt
            reply.send(answer)

        self.worker_request("set_prompt", {"stream": stream, "prompt": prompt}, done)
        return DEFERRED

    def expire(self) -> None:
        """One retention pass (at start and every `expire_interval_seconds`); a full disk is an error event."""
        try:
            deleted, report = self.retention.run()
        except OSError as exc:
            log.error("retention pass failed: %s", exc)
            return
        if report.get("disk_low"):
            streams = sorted({f.stream for f in deleted if f.stream in self.prompts}) or self.stream_ids
            message = (f"disk almost full (under {self.config.record.retain.min_free_gigabytes} GB free): deleted "
                       f"{report['low_disk']} oldest video files ({report['freed_bytes'] / 2**20:.1f} MB)")
            log.error(message)
            for stream in streams:
                self.sender.send(make_event(stream, "error", message=message, error_type="disk_low", fatal=False,
                                            deleted=report["low_disk"]))

    def _set_zones_command(self, request: SetZonesRequest, reply: Reply):
        """Replace one stream's zones and lines, validated like the config; the rules must still find theirs."""
        stream = request.stream
        if stream not in self.prompts:
            return {"ok": False, "error": f"no stream {stream!r} (streams: {', '.join(self.stream_ids)})"}
        try:
            places = parse_places({"zones": request.zones, "lines": request.lines})
            parse_rules({"rules": [r.model_dump() for r in self.rules]}, {**self.places, stream: places},
                        source=f"the rules with these zones of {stream!r}")
        except ConfigError as exc:
            return {"ok": False, "error": str(exc)}
        from streamer.zones import build_zones

        zones, lines = build_zones(places.zones, places.lines)

        def done(answer: dict) -> None:
            if answer.get("ok"):
                self.places[stream] = places  # a restarted worker starts with these
            reply.send(answer)

        self.worker_request("set_zones", {"stream": stream, "zones": zones, "lines": lines}, done)
        return DEFERRED

    def _set_rules_command(self, request: SetRulesRequest, reply: Reply):
        """Replace every rule, validated like the config; a phrase in no prompt is a warning in the reply."""
        try:
            update = parse_rules({"rules": request.rules}, self.places)
        except ConfigError as exc:
            return {"ok": False, "error": str(exc)}
        from streamer.rules import build_rules

        def done(answer: dict) -> None:
            if answer.get("ok"):
                self.rules = list(update.rules)
                answer["warnings"] = rule_warnings(self.rules, self.prompts)
            reply.send(answer)

        self.worker_request("set_rules", {"rules": build_rules(update.rules)}, done)
        return DEFERRED

    def worker_request(self, command: str, args: dict, on_reply: Callable[[dict], None],
                       timeout: float = 60.0) -> None:
        """Send the inference worker a command; `on_reply(answer)` runs in the supervisor's loop when it answers
        (or with an error after `timeout` seconds). Never blocks."""
        self._request_id += 1
        self._pending[self._request_id] = (time.monotonic() + timeout, on_reply)
        self.worker_control.put((self._request_id, command, args))

    def _collect_worker_replies(self) -> None:
        while self._pending:
            try:
                request_id, answer = self.worker_replies.get_nowait()
            except (queue.Empty, OSError, EOFError, ValueError):
                break
            entry = self._pending.pop(request_id, None)
            if entry is not None:
                entry[1](answer)
        now = time.monotonic()
        for request_id, (deadline, on_reply) in list(self._pending.items()):
            if now >= deadline:
                del self._pending[request_id]
                on_reply({"ok": False, "error": "the inference worker did not answer in time"})

    # -- shutdown ------------------------------------------------------------------------------------------------

    def force_exit(self, signum: int) -> None:
        """A second SIGINT/SIGTERM during the shutdown: kill every child, remove what we created, exit now
        (status 128 + signal number, as a shell reports a process ended by that signal)."""
        log.warning("second %s while stopping: forcing the exit (children killed)", signal.Signals(signum).name)
        for child in self.children:
            if child.process is not None and child.process.pid is not None:
                try:
                    os.kill(child.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._remove_created()
        logging.shutdown()
        os._exit(128 + signum)

    def _abandon_start(self) -> None:
        """A start that failed half-way (shared memory full...): leave nothing behind."""
        for child in self.children:
            if child.process is not None and child.process.pid is not None and child.process.is_alive():
                child.process.kill()
                child.process.join(5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.control is not None:
            self.control.close()
        self._remove_created()

    def _remove_created(self) -> None:
        """Delete the shared memory and the runtime folder (safe to call twice, and from a signal handler)."""
        for path in [m.path for m in getattr(self, "mailboxes", {}).values()] + (
                [self.stats.path] if getattr(self, "stats", None) is not None else []) + (
                [self.open_tracks.path] if getattr(self, "open_tracks", None) is not None else []):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if getattr(self, "runtime_dir", None):
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop decoders, then the worker (which drains), then the hub (which flushes); clean up."""
        if self._closed:
            return
        self._closed = True
        timeout = self.config.supervisor.shutdown_timeout_seconds
        for stage in (0, 1, 2, 3):
            self.stage_stops[stage].set()
            members = [c for c in self.children if c.stage == stage and c.process is not None]
            deadline = time.monotonic() + timeout
            for child in members:
                child.process.join(max(0.0, deadline - time.monotonic()))
            for child in members:
                if child.process.is_alive():
                    log.warning("%s did not stop within %.0f s; killing it", child.name, timeout)
                    child.process.kill()
                    child.process.join(5)
        # Not read from the worker's reply queue here: a worker killed mid-reply leaves a message a read would wait on.
        self._fail_pending("the daemon stopped before the inference worker answered")
        self.sender.close()
        self.control.close()
        if self.web_listener is not None:
            self.web_listener.close()
        if self._state_watch is not None:
            self._state_watch.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        for mailbox in self.mailboxes.values():
            mailbox.close()
        self._record_health = {s: (self.stats.get(s, "record_errors"), self.stats.get(s, "record_lost"))
                               for s in self.stream_ids}
        degraded = {s: figures for s, figures in self._record_health.items() if any(figures)}
        if degraded:
            log.warning("run degraded: event logs could not be written (failed writes, events lost): %s",
                        ", ".join(f"{s} {int(e)}/{int(n)}" for s, (e, n) in degraded.items()))
        self.stats.close()
        self.open_tracks.close()
        self._remove_created()
        self.worker_control.close()
        self.worker_replies.close()
