"""`frugalray serve` stops on SIGTERM as on Ctrl-C: process managers and Kubernetes send SIGTERM.

A driver joined to the session's Ray cluster (so Ray's own signal handlers are installed, as in
`frugalray serve`) waits in `serve_until_stopped`; SIGTERM must run the shutdown and exit 0, not
die with Ray's fatal-signal trace. (Deploying a second served model here would cost minutes for
no more evidence: the shutdown itself is `serve.delete` of the app.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

DRIVER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
from frugalray.cli.main import serve_until_stopped
sys.exit(serve_until_stopped(lambda: print("app deleted", flush=True), "waiting"))
"""


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_sigterm_and_ctrl_c(ray_cluster, sent):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, ray_cluster["address"]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        started = time.time()
        first = proc.stdout.readline()
        while first and "waiting" not in first and time.time() - started < 120:
            first = proc.stdout.readline()
        assert "waiting" in first, first
        proc.send_signal(sent)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert f"{sent.name}: shutting down" in out and "app deleted" in out, out[-3000:]
    assert "SIGTERM received" not in out  # Ray's fatal-signal trace
