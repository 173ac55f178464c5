"""A Ray cluster of the benchmark's own: `ray start --head` on loopback with free ports.

On a heavily loaded machine `ray.init()` starting a local cluster can fail: the raylet waits
a fixed 15 s for the dashboard agent's port file and exits (ray-project/ray#65983). Giving
every agent a fixed free port, as tests/conftest.py does, avoids that wait. The cluster is
stopped when the benchmark exits. Nothing here joins another user's cluster.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_ray(num_cpus: int = 8, timeout_s: float = 300) -> str:
    """Start a head node, connect this process to it, export RAY_ADDRESS; returns the address."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    gcs = _free_port()
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--num-cpus", str(num_cpus), "--include-dashboard", "false",
         "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
         "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
         "--disable-usage-stats"],
        env=env, stdout=open(os.environ.get("BENCH_RAY_LOG", os.devnull), "w"),  # noqa: SIM115 - lives with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop() -> None:
        try:
            ray.shutdown()
        finally:
            from frugalray.local_cluster import stop_ray_nodes

            stop_ray_nodes([proc])

    atexit.register(stop)
    address = f"127.0.0.1:{gcs}"
    deadline = time.time() + timeout_s
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except Exception as err:  # still starting, or a real failure
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"could not start `ray start --head` at {address}: {err}") from err
            time.sleep(3)
    os.environ["RAY_ADDRESS"] = address  # init_ray() inside frugalray now joins this cluster
    return address
