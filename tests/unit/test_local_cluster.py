"""Stopping loopback nodes: the whole session goes, within the grace period, even when SIGTERM is ignored."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from frugalray.local_cluster import _session_pids, stop_ray_nodes

# A stand-in for `ray start --block` that will not stop on SIGTERM, with a child in a process group of
# its own (as Ray gives its workers), so killing the node's group alone would leave the child running.
STUBBORN_NODE = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], process_group=0)
time.sleep(300)
"""


def _spawn_stubborn_node() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN_NODE], start_new_session=True)
    deadline = time.time() + 30
    while len(_session_pids(proc.pid)) < 2:  # the node and its own-group child
        assert time.time() < deadline, "the stand-in node never started its child"
        time.sleep(0.1)
    return proc


def _running(session_id: int) -> list[int]:
    """Processes of the session that still run (a SIGKILLed orphan stays a zombie until init reaps it)."""
    alive = []
    for pid in _session_pids(session_id):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def test_nodes_that_ignore_sigterm_are_killed_with_their_whole_session_after_the_grace_period():
    nodes = [_spawn_stubborn_node(), _spawn_stubborn_node()]
    sessions = [node.pid for node in nodes]
    child_groups = {os.getpgid(pid) for s in sessions for pid in _session_pids(s)} - set(sessions)
    assert len(child_groups) == 2  # each child really sits outside its node's process group

    started = time.time()
    stop_ray_nodes(nodes, grace_s=1.0)
    took = time.time() - started

    assert all(node.poll() is not None for node in nodes)
    deadline = time.time() + 10  # SIGKILL is delivered asynchronously
    while any(_running(s) for s in sessions) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_running(s) for s in sessions), "a process of a stopped node is still running"
    # One shared grace period for all nodes, not one per node; generous slack for a loaded machine.
    assert took < 1.0 + 20.0, took


def test_a_node_that_already_died_is_left_alone():
    node = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    node.wait(timeout=30)
    stop_ray_nodes([node], grace_s=1.0)  # no error, nothing signalled
    assert node.returncode == 0
