"""A real local Ray cluster for the cluster tests: a head node and worker nodes, each a `ray start --block`
process on a loopback address, stopped by pid (never `ray stop`, which would stop every Ray cluster on the machine).

    cluster = RayCluster(tmp_dir).start(head_cpus=2)
    node = cluster.add_node(cpus=1, resources={"site-a": 1})
    ... ray.init(address=cluster.address) ...
    cluster.kill_raylet(node)  # the node dies as a crashed host would
    cluster.stop()

Two things of Ray 2.60 this works around (docs/cluster.md, "A local test cluster"):

- Ray replaces the node address `127.0.0.1` (and `localhost`) by the host's outward address
  (`services.resolve_ip_for_localhost`, for `--node-ip-address` and for a worker's `--address` alike), so a cluster
  "on 127.0.0.1" really listens and advertises on the VM's network address. Every node here uses `127.0.0.2`:
  loopback as well (all of 127/8 is), and Ray keeps it as given.
- A raylet waits 15 s (fixed) for its dashboard agent to write the port it listens on, and aborts when the agent
  is slower; on a 2-core machine busy with other work the agent's imports alone take longer. The port is one
  this helper chose, so it writes it for the agent (the node's id is fixed by `RAY_OVERRIDE_NODE_ID_FOR_TESTING`).
- Token auth: `ray start --head` turns it on when `~/.ray/auth_token` exists, but a worker node's `ray start
  --address` and a driver's `ray.init(address=...)` send no token unless `RAY_AUTH_MODE=token` is set (the GCS
  logs "Missing authorization header"), so the second node never registered and no driver connected. This
  cluster has its own token: `cluster.env` (`RAY_AUTH_MODE`, `RAY_AUTH_TOKEN`) is set for every node, and a
  driver must run with it too (`cluster.driver_env()`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rtsp_server import free_port  # noqa: E402

LOOPBACK = "127.0.0.2"


def ray_available() -> bool:
    """Ray and its `ray` command are installed (found without importing Ray: its config is read from the
    environment once, at import, and `RayCluster.use_in_this_process` must come first)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return False
    return shutil.which("ray") is not None or Path(sys.executable).with_name("ray").exists()


def _ray_command() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), deepest last."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        by_parent.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (from /proc): with the pid, it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RayNode:
    def __init__(self, process: subprocess.Popen, resources: dict, log_path: Path, node_id: str) -> None:
        self.process, self.resources, self.log_path, self.node_id = process, resources, log_path, node_id

    def raylet_pid(self) -> int | None:
        for pid in _children(self.process.pid):
            if "/raylet/raylet " in _command_line(pid) or _command_line(pid).startswith("raylet"):
                return pid
        return None

    def pids(self) -> list[int]:
        return [self.process.pid, *_children(self.process.pid)]


class RayCluster:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.temp_dir = self.directory / "ray"
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.nodes: list[RayNode] = []
        # This cluster's own token (never the user's ~/.ray/auth_token): nodes and drivers send it.
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
        self._all_pids: dict[int, str | None] = {}  # every process of the cluster seen: pid -> start time

    def _start(self, arguments: list[str], resources: dict, name: str) -> RayNode:
        log_path = self.directory / f"{name}.log"
        node_id = os.urandom(28).hex()  # a Ray NodeID: 28 bytes
        listen_port = free_port()
        env = dict(os.environ, **self.env, RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0",
                   RAY_DEDUP_LOGS="0", RAY_OVERRIDE_NODE_ID_FOR_TESTING=node_id,
                   # generous start-up waits for a loaded machine (those Ray lets us set)
                   RAY_agent_register_timeout_ms="180000", RAY_raylet_start_wait_time_s="180",
                   RAY_worker_register_timeout_seconds="180")
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        with open(log_path, "w") as log:
            process = subprocess.Popen([_ray_command(), "start", "--block", "--disable-usage-stats",
                                        f"--node-ip-address={LOOPBACK}", f"--resources={json.dumps(resources)}",
                                        f"--dashboard-agent-listen-port={listen_port}",
                                        "--include-log-monitor=false", *arguments],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        node = RayNode(process, resources, log_path, node_id)
        self.nodes.append(node)
        threading.Thread(target=self._announce_agent_port, args=(node, listen_port), daemon=True,
                         name=f"ray-{name}-agent-port").start()
        return node

    def _announce_agent_port(self, node: RayNode, port: int, timeout: float = 300.0) -> None:
        """Write the dashboard agent's listen port where the node's raylet waits for it, as soon as the session
        directory exists (the agent writes the same port again once it listens)."""
        from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, get_port_filename, persist_port

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and node.process.poll() is None:
            sessions = [p for p in self.temp_dir.glob("session_2*") if p.is_dir()]
            if sessions:
                newest = max(sessions, key=lambda p: p.stat().st_mtime)
                if not (newest / get_port_filename(node.node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME)).exists():
                    persist_port(str(newest), node.node_id, DASHBOARD_AGENT_LISTEN_PORT_NAME, port)
                return
            time.sleep(0.05)

    def start(self, head_cpus: int = 2, head_resources: dict | None = None, timeout: float = 240.0,
              attempts: int = 2) -> "RayCluster":
        """Start the head; a head that fails to come up is started once more, on fresh ports."""
        for attempt in range(attempts):
            try:
                return self._start_head(head_cpus, head_resources, timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    self.stop()
                    raise
                self.stop()
                self.nodes, self.port = [], free_port()
                self.address = f"{LOOPBACK}:{self.port}"
        return self

    def _start_head(self, head_cpus: int, head_resources: dict | None, timeout: float) -> "RayCluster":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start(["--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--include-dashboard=false",
                     "--no-monitor", f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
                     f"--object-manager-port={free_port()}", f"--min-worker-port={free_port()}",
                     "--max-worker-port=0", "--object-store-memory=200000000",
                     f"--temp-dir={self.temp_dir}", f"--dashboard-agent-grpc-port={free_port()}",
                     f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
                    head_resources or {}, "head")
        self.wait_nodes(1, timeout)
        return self

    def add_node(self, cpus: int = 1, resources: dict | None = None, timeout: float = 240.0,
                 attempts: int = 2) -> RayNode:
        """Join a worker node (started once more when it does not come up)."""
        for attempt in range(attempts):
            try:
                return self._add_node(cpus, resources, timeout)
            except RuntimeError:
                failed = self.nodes.pop()
                self._kill({pid: _start_time(pid) for pid in failed.pids()})
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _add_node(self, cpus: int, resources: dict | None, timeout: float) -> RayNode:
        node = self._start([f"--address={self.address}", f"--num-cpus={cpus}", "--object-store-memory=100000000",
                            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                            f"--metrics-export-port={free_port()}"],
                           resources or {}, f"node{len(self.nodes)}")
        self.wait_nodes(len(self.nodes), timeout, node)
        return node

    def alive_nodes(self) -> list[dict]:
        """The nodes the cluster's GCS knows alive (through Ray's Python API, in a subprocess)."""
        probe = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                 "print(json.dumps([[n['NodeID'], n['Resources']] for n in ray.nodes() if n['Alive']]))"
                 % self.address)
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180,
                                env=self.driver_env())
        if result.returncode != 0:
            return []
        return json.loads(result.stdout.strip().splitlines()[-1])

    def driver_env(self) -> dict[str, str]:
        """The environment of a process that connects to this cluster (its token)."""
        env = dict(os.environ, **self.env, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        return env

    def use_in_this_process(self) -> None:
        """Connect drivers of this process (`ray.init(address=cluster.address)`) and its children with the
        cluster's token: the environment, and Ray's config if Ray was imported already (read once at import)."""
        os.environ.update(self.driver_env())
        if "ray._raylet" in sys.modules:
            from ray._raylet import Config

            Config.initialize("")

    def _log_tails(self, node: RayNode) -> str:
        """The node's `ray start` output and the tails of its session's raylet and GCS logs."""
        parts = [f"--- {node.log_path.name}:\n{node.log_path.read_text(errors='replace')[-2000:]}"]
        logs = self.temp_dir / "session_latest" / "logs"
        for name in ("raylet.out", "raylet.err", "gcs_server.out", "dashboard_agent.log"):
            for path in sorted(logs.glob(name.replace(".", "*.", 1)))[-2:]:
                text = path.read_text(errors="replace")
                failures = [line for line in text.splitlines() if " C " in line[:40] or "Check failed" in line]
                parts.append(f"--- {path.name}:\n" + "\n".join(failures[-3:]) + "\n" + text[-1200:])
        return "\n".join(parts)

    def wait_nodes(self, count: int, timeout: float, starting: RayNode | None = None) -> None:
        """Until `count` nodes are alive in the GCS and `starting` (default: the head) among them; a clear error
        with the logs' tails when its process exits or the time is up."""
        deadline = time.monotonic() + timeout
        starting = starting or self.nodes[0]
        while time.monotonic() < deadline:
            for node in self.nodes:
                self._remember(node)
            if starting.process.poll() is not None:
                raise RuntimeError(f"ray node exited while starting (status {starting.process.returncode}):\n"
                                   + self._log_tails(starting))
            if "Ray runtime started" not in starting.log_path.read_text(errors="replace"):
                time.sleep(0.5)
                continue
            alive = self.alive_nodes()
            if len(alive) >= count and any(node_id == starting.node_id for node_id, _ in alive):
                for node in self.nodes:
                    self._remember(node)
                return
            time.sleep(2)
        raise RuntimeError(f"ray node {starting.log_path.stem} not registered with the head within {timeout:g} s:\n"
                           + self._log_tails(starting))

    def kill_raylet(self, node: RayNode) -> int:
        """SIGKILL the node's raylet (as a crashed host): its workers die with it. Returns the pid killed."""
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError("no raylet under that node's process")
        os.kill(pid, signal.SIGKILL)
        return pid

    def _remember(self, node: RayNode) -> None:
        for pid in node.pids():
            self._all_pids.setdefault(pid, _start_time(pid))

    @staticmethod
    def _kill(pids: dict[int, str | None]) -> None:
        """SIGKILL each process that is still the one seen (a pid reused by another process is left alone)."""
        for pid, started in sorted(pids.items()):
            if started is None or _start_time(pid) != started:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> None:
        """Stop every process this cluster started, by pid: SIGTERM to each `ray start --block` (it stops its
        own processes), then SIGKILL to whatever is left."""
        for node in self.nodes:
            self._remember(node)
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes:  # processes started since (workers of a node that was still running)
            self._remember(node)
        self._kill(self._all_pids)
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.wait(10)
