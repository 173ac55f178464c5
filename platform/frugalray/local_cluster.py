"""A real multi-node Ray cluster on one machine's loopback: a head plus worker nodes, each its own raylet.

Used by the scale-out tests and `bench/multinode_demo.py` to exercise what a laptop cannot show with a
single node: work spread across nodes, and a node dying mid-stage. Every node is a `ray start --block`
process in its own session, on free ports, so `kill_node` takes a whole node (raylet, object store,
workers) down at once, like a lost machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NODE_RESOURCE_PREFIX = "loopback_node_"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(session_id: int) -> list[int]:
    """Processes in one session (Linux /proc; elsewhere none, and kill_node falls back to the process group)."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    pids.append(int(entry))
            except OSError:  # gone, or not ours to ask about
                pass
    return pids


def kill_session(session_id: int) -> int:
    """SIGKILL every process of a `start_new_session` process tree; returns how many besides its group.

    Ray starts each worker process in a process group of its own (and vLLM's engine processes can
    outlive their raylet), so killing the group alone can leave them running: the whole session goes.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session_id, signal.SIGKILL)
    killed = 0
    for pid in _session_pids(session_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def stop_ray_nodes(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Stop `ray start --block` processes (each in its own session): SIGTERM all of them at once, give
    them `grace_s` together, then SIGKILL what is left of their sessions.

    Ray's own graceful stop of a head waits about 30 s on its GCS and dashboard processes (measured on
    these machines: 34 s for an idle head), which a throw-away loopback node does not need; waiting
    node by node multiplied that.
    """
    live = [proc for proc in processes if proc.poll() is None]  # a node killed earlier is already gone
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for proc in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.time()))
    for proc in live:
        kill_session(proc.pid)  # start_new_session: the session id is the pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def _agent_ports() -> list[str]:
    # Ray's fixed default agent ports collide between nodes on one machine; give each node its own.
    return [
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
    ]


def fake_autoscaler_config(gcs_address: str, head_cpus: int, node_types: dict[str, dict]) -> dict:
    """An autoscaler config for Ray's fake multi-node provider (the one `ray.cluster_utils.AutoscalingCluster`
    builds, whose template the Ray wheel does not ship): nodes are raylets on this machine."""
    types = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, spec in node_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **spec}
    return {
        "cluster_name": "frugalray-loopback",
        "max_workers": sum(int(t.get("max_workers", 1)) for t in node_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class LoopbackNode:
    name: str
    cpus: int
    process: subprocess.Popen
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LoopbackCluster:
    """Head (`head_cpus`; a 0-CPU head timed out in Ray 2.60's node startup on these machines) plus workers.

    Each worker node gets a custom resource `loopback_node_<name>` = 1 so tests can see where work landed
    and pin work to a node when they need to.
    """

    def __init__(self, head_cpus: int = 1, worker_cpus: tuple[int, ...] = (2, 2), ray_bin: str | None = None,
                 env: dict[str, str] | None = None, autoscaling_node_types: dict[str, dict] | None = None):
        """`autoscaling_node_types`: node types (`available_node_types` entries: resources, min/max_workers)
        that Ray's own autoscaler launches on demand through its fake multi-node provider, each new node
        a raylet on this machine, as `ray up` would launch machines."""
        self.ray_bin = ray_bin or str(Path(sys.executable).parent / "ray")
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(os.environ, **(env or {}))
        # A job's bare `python` must be this interpreter, as for a user who ran `ray start` in the venv.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.env.setdefault("RAY_AUTH_MODE", "disabled")
        self.nodes: dict[str, LoopbackNode] = {}
        self.log_dir = Path(tempfile.mkdtemp(prefix="frugalray-loopback-"))
        self._counter = 0
        self.autoscaler_config: Path | None = None
        if autoscaling_node_types:
            self.autoscaler_config = self.log_dir / "autoscaler.yaml"
            self.autoscaler_config.write_text(json.dumps(fake_autoscaler_config(
                self.address, head_cpus, autoscaling_node_types)))
            # RAY_FAKE_CLUSTER enables the fake provider; the job drivers on the head find the node types
            # where a `ray up` head keeps them (frugalray.devices reads this variable).
            self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                             "FRUGALRAY_AUTOSCALER_CONFIG": str(self.autoscaler_config)})

    # lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout_s: float = 180.0) -> LoopbackCluster:
        head = self._spawn("head", [
            "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
            "--num-cpus", str(self.head_cpus), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--disable-usage-stats",
            *([f"--autoscaling-config={self.autoscaler_config}"] if self.autoscaler_config else []),
        ], self.head_cpus, {})
        self.nodes["head"] = head
        self.wait_for_nodes(1, timeout_s)
        self.wait_for_job_agent(timeout_s)
        for cpus in self.worker_cpus:
            self.add_worker(cpus, timeout_s=timeout_s)
        return self

    def add_worker(self, cpus: int, timeout_s: float = 180.0, attempts: int = 3) -> str:
        """Start a worker node and wait until the cluster sees it alive.

        Ray gives a raylet 30 s to register with the GCS; on a busy 2-core machine that can run out,
        and the node exits. Such a start is retried (the cluster is otherwise unaffected).
        """
        self._counter += 1
        name = f"worker{self._counter}"
        resources = {f"{NODE_RESOURCE_PREFIX}{name}": 1.0}
        expected = sum(1 for n in self.nodes.values() if n.alive) + 1
        for attempt in range(1, attempts + 1):
            node = self._spawn(name, [
                "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
                "--resources", json.dumps(resources), "--disable-usage-stats",
            ], cpus, resources)
            self.nodes[name] = node
            deadline = time.time() + timeout_s
            while time.time() < deadline and node.alive:
                try:
                    if len(self.alive_nodes()) >= expected:
                        return name
                except Exception:  # noqa: BLE001 - the state API is busy; ask again
                    pass
                time.sleep(2)
            log.warning("worker node %s did not come up (attempt %d/%d)", name, attempt, attempts)
            if node.alive:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait(timeout=30)
        raise TimeoutError(f"worker node {name} did not join in {attempts} attempts; see {self.log_dir / name}.log")

    def _spawn(self, name: str, args: list[str], cpus: int, resources: dict[str, float]) -> LoopbackNode:
        cmd = [self.ray_bin, "start", "--block", *args, *_agent_ports()]
        log.info("starting node %s: %s", name, " ".join(cmd))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as out:  # why a node died is worth keeping
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return LoopbackNode(name, cpus, proc, resources)

    def kill_node(self, name: str) -> None:
        """SIGKILL a whole node (its `ray start` session: raylet, object store, workers): a lost machine.

        Killing the node's group alone left its workers running until they noticed the raylet was gone
        (a Serve replica answered a request after its node was "killed"): every process of the node's
        session goes at once.
        """
        node = self.nodes[name]
        if name == "head":
            raise ValueError("kill_node: the head holds the GCS; kill a worker node")
        killed = kill_session(node.process.pid)  # start_new_session: the session id is the pid
        node.process.wait(timeout=30)
        log.info("killed node %s (and %d other processes of its session)", name, killed)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every node at once (workers and head together), force-killing them after `grace_s`."""
        stop_ray_nodes([node.process for node in self.nodes.values()], grace_s)

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # state -------------------------------------------------------------------------------------
    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        # Filter here, not server-side: with a filter that drops dead nodes, Ray 2.60's state API
        # compares the unfiltered total with the filtered count and raises "data truncation"
        # as soon as any node has died.
        nodes = [n.__dict__ if hasattr(n, "__dict__") else dict(n)
                 for n in list_nodes(address=self.dashboard, limit=10_000, raise_on_missing_output=False)]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 180.0) -> None:
        deadline = time.time() + timeout_s
        last_error = None
        while time.time() < deadline:
            if self.nodes.get("head") is not None and not self.nodes["head"].alive:
                log_text = (self.log_dir / "head.log").read_text()[-3000:]
                raise RuntimeError(f"the head node exited while starting; its log:\n{log_text}")
            try:
                if len(self.alive_nodes()) >= count:
                    return
            except Exception as err:  # noqa: BLE001 - the dashboard is still coming up
                last_error = err
            time.sleep(2)
        raise TimeoutError(f"{count} alive nodes not reached in {timeout_s:.0f}s (last error: {last_error})")

    def wait_for_job_agent(self, timeout_s: float = 180.0) -> None:
        """Wait until the head's dashboard agent has registered, which Ray's Jobs API needs to take a job.

        A head is ALIVE before its agent is up; on a loaded 2-core machine the agent took long enough
        that every submission right after start was refused ("No available agent to submit job").
        """
        from ray._private import ray_constants
        from ray._raylet import GcsClient
        from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

        gcs = GcsClient(address=self.address)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            head_id = gcs.internal_kv_get(ray_constants.KV_HEAD_NODE_ID_KEY, namespace=ray_constants.KV_NAMESPACE_JOB,
                                          timeout=10)
            if head_id and gcs.internal_kv_get(f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head_id.decode()}".encode(),
                                               namespace=ray_constants.KV_NAMESPACE_DASHBOARD, timeout=10):
                return
            time.sleep(1)
        session = gcs.internal_kv_get(b"session_dir", namespace=ray_constants.KV_NAMESPACE_SESSION, timeout=10)
        agent_log = Path(session.decode() if session else "/nonexistent") / "logs" / "dashboard_agent.log"
        tail = agent_log.read_text()[-3000:] if agent_log.exists() else f"(no {agent_log})"
        raise TimeoutError(f"the head's dashboard agent did not register in {timeout_s:.0f}s; {agent_log}:\n{tail}")

    def node_names_by_id(self) -> dict[str, str]:
        """Ray node id -> our node name (head / workerN), from each node's custom resource."""
        out = {}
        for node in self.alive_nodes():
            resources = node.get("resources_total") or {}
            names = [k[len(NODE_RESOURCE_PREFIX):] for k in resources if k.startswith(NODE_RESOURCE_PREFIX)]
            out[node["node_id"]] = names[0] if names else "head"
        return out
