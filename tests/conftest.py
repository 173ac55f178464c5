"""Shared fixtures: one local Ray cluster and one prepared default model per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Offline by construction: nothing may reach for a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray 2.60 turns on token auth for a `ray start --head` whenever ~/.ray/auth_token exists
# (any earlier local ray.init() writes one). The test cluster binds to loopback only, and one
# explicit mode for the head, the pytest driver and `ray job submit` keeps them consistent.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from frugalray.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real `ray start --head` cluster on loopback, shared by every test that needs Ray.

    Yields {"address": GCS address, "dashboard": job-server URL}. The pytest process itself
    is connected as a driver, so tests can call Ray Data / Train / Tune / Serve directly.
    """
    import ray

    gcs_port, dash_port = free_port(), free_port()
    env = dict(os.environ)
    # As for a user who ran `ray start` in the activated venv: a job entrypoint's bare `python`
    # must be this interpreter (`make test` calls .venv/bin/python without activating).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.Popen(
        [
            ray_cli(), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1",
            "--port", str(gcs_port),
            "--num-cpus", "8",
            "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash_port),
            # Ray's fixed default ports for the per-node agents collide with any other Ray
            # cluster on the machine; a busy agent port leaves the job server with
            # "No available agent to submit job". Free ports make the session cluster independent.
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{gcs_port}"

    def stop_cluster():
        from frugalray.local_cluster import stop_ray_nodes

        # A throw-away cluster: Ray's graceful head stop alone took 34 s here.
        stop_ray_nodes([proc], grace_s=5.0)

    deadline = time.time() + 120
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except Exception as err:  # noqa: BLE001 - still starting, or a real failure
            if proc.poll() is not None or time.time() > deadline:
                stop_cluster()
                raise RuntimeError(f"could not join `ray start --head` at {address}: {err}") from err
            time.sleep(2)
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dash_port}"}
    try:
        from ray import serve

        serve.shutdown()
    except Exception as err:  # noqa: BLE001 - best effort; stopping the cluster ends Serve anyway
        print(f"serve.shutdown failed during teardown: {err}")
    ray.shutdown()
    stop_cluster()
