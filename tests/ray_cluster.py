"""A real local Ray cluster for the cluster tests: a head node and worker nodes, each a `ray start --block`
process on 127.0.0.1, stopped by pid (never `ray stop`, which would stop every Ray cluster on the machine).

    cluster = RayCluster(tmp_dir).start(head_cpus=2)
    node = cluster.add_node(cpus=1, resources={"site-a": 1})
    ... ray.init(address=cluster.address) ...
    cluster.kill_raylet(node)  # the node dies as a crashed host would
    cluster.stop()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rtsp_server import free_port  # noqa: E402


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
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


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class RayNode:
    def __init__(self, process: subprocess.Popen, resources: dict, log_path: Path) -> None:
        self.process, self.resources, self.log_path = process, resources, log_path

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
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[RayNode] = []
        self._all_pids: set[int] = set()

    def _start(self, arguments: list[str], resources: dict, name: str) -> RayNode:
        log_path = self.directory / f"{name}.log"
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0",
                   RAY_DEDUP_LOGS="0")
        env.pop("RAY_ADDRESS", None)
        with open(log_path, "w") as log:
            process = subprocess.Popen([_ray_command(), "start", "--block", "--disable-usage-stats",
                                        "--node-ip-address=127.0.0.1", f"--resources={json.dumps(resources)}",
                                        *arguments], stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        node = RayNode(process, resources, log_path)
        self.nodes.append(node)
        return node

    def start(self, head_cpus: int = 2, head_resources: dict | None = None, timeout: float = 180.0,
              attempts: int = 3) -> "RayCluster":
        """Start the head. Ray gives a node 30 s to register (hard-coded); on a machine loaded by other work
        that can pass, and the head exits: it is started again, on fresh ports."""
        for attempt in range(attempts):
            try:
                return self._start_head(head_cpus, head_resources, timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.stop()
                self.nodes, self.port = [], free_port()
                self.address = f"127.0.0.1:{self.port}"
        return self

    def _start_head(self, head_cpus: int, head_resources: dict | None, timeout: float) -> "RayCluster":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._start(["--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
                     f"--object-manager-port={free_port()}", f"--min-worker-port={free_port()}",
                     "--max-worker-port=0", "--object-store-memory=200000000",
                     f"--temp-dir={self.directory / 'ray'}", f"--dashboard-agent-listen-port={free_port()}",
                     f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                     f"--metrics-export-port={free_port()}"],
                    head_resources or {}, "head")
        self.wait_nodes(1, timeout)
        return self

    def add_node(self, cpus: int = 1, resources: dict | None = None, timeout: float = 180.0,
                 attempts: int = 3) -> RayNode:
        """Join a worker node (started again when it times out registering, as `start` does for the head)."""
        for attempt in range(attempts):
            try:
                return self._add_node(cpus, resources, timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                failed = self.nodes.pop()
                for pid in failed.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        raise AssertionError("unreachable")

    def _add_node(self, cpus: int, resources: dict | None, timeout: float) -> RayNode:
        node = self._start([f"--address={self.address}", f"--num-cpus={cpus}", "--object-store-memory=100000000",
                            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                            f"--dashboard-agent-listen-port={free_port()}",
                            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                            f"--metrics-export-port={free_port()}"],
                           resources or {}, f"node{len(self.nodes)}")
        self.wait_nodes(sum(1 for n in self.nodes if n.process.poll() is None), timeout, node)
        return node

    def alive_nodes(self) -> list[dict]:
        """The nodes the cluster's GCS knows alive (through the `ray` CLI's Python API, in a subprocess)."""
        probe = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                 "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % self.address)
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180,
                                env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        if result.returncode != 0:
            return []
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_nodes(self, count: int, timeout: float, starting: RayNode | None = None) -> None:
        deadline = time.monotonic() + timeout
        starting = starting or self.nodes[0]
        while time.monotonic() < deadline:
            for node in self.nodes:
                self._all_pids.update(node.pids())
            if starting.process.poll() is not None:
                raise RuntimeError(f"ray node exited while starting:\n{starting.log_path.read_text()[-3000:]}")
            if not (starting.log_path.exists() and "Ray runtime started" in starting.log_path.read_text()):
                time.sleep(0.5)
                continue
            if len(self.alive_nodes()) >= count:
                for node in self.nodes:
                    self._all_pids.update(node.pids())
                return
            time.sleep(0.5)
        raise RuntimeError(f"{count} ray nodes not up within {timeout} s:\n" +
                           "\n".join(n.log_path.read_text()[-2000:] for n in self.nodes))

    def kill_raylet(self, node: RayNode) -> int:
        """SIGKILL the node's raylet (as a crashed host): its workers die with it. Returns the pid killed."""
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError("no raylet under that node's process")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        """Stop every process this cluster started, by pid: SIGTERM to each `ray start --block` (it stops its
        own processes), then SIGKILL to whatever is left."""
        for node in self.nodes:
            self._all_pids.update(node.pids())
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        for pid in sorted(self._all_pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.wait(10)
