"""`frugalray submit` / `frugalray jobs` against the session's real Ray cluster (Jobs SDK)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "frugalray.cli"]


def run_cli(*args, timeout=600):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)


def test_submit_streams_logs_and_returns_the_jobs_status(ray_cluster, tmp_path):
    from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows

    tasks = tmp_path / "tasks.jsonl"
    write_rows(generate_tasks(GenerateConfig(n_rows=12, seed=3, noise_rate=0.25)), tasks)
    run_dir = tmp_path / "run"
    address = ray_cluster["dashboard"]
    proc = run_cli(
        "submit", "score", "--config", "jobs/configs/score.yaml", "--address", address,
        "--run-dir", str(run_dir),
        "--set", f"input_path={tasks}", "--set", f"output_path={tmp_path / 'scored'}",
        "--set", "scorers=[heuristics]", "--env", "FRUGALRAY_TEST_TOKEN=do-not-print-me",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SUCCEEDED" in proc.stderr
    assert "scored" in proc.stdout  # the job's own summary line, streamed back
    assert "do-not-print-me" not in out
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in ledger] == ["score"] and ledger[0]["rows_in"] == 12
    submission_id = proc.stderr.split("job ")[-1].split(":")[0].strip()

    status = run_cli("jobs", "status", submission_id, "--address", address)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED", status.stderr
    logs = run_cli("jobs", "logs", submission_id, "--address", address)
    assert "scored" in logs.stdout
    listed = run_cli("jobs", "list", "--address", address)
    assert submission_id in listed.stdout and "score" in listed.stdout


def test_bad_config_never_reaches_the_cluster(ray_cluster):
    address = ray_cluster["dashboard"]
    before = run_cli("jobs", "list", "--address", address).stdout.count("\n")
    proc = run_cli("submit", "finetune", "--config", "jobs/configs/finetune.yaml", "--address", address,
                   "--set", "lora_rnak=8")
    assert proc.returncode == 2
    assert "lora_rnak" in proc.stderr
    assert run_cli("jobs", "list", "--address", address).stdout.count("\n") == before


def test_stop_a_running_job(ray_cluster, tmp_path):
    address = ray_cluster["dashboard"]
    proc = run_cli("submit", "pipeline", "--config", "jobs/configs/pipeline_small.yaml", "--address", address,
                   "--run-dir", str(tmp_path / "p"), "--no-wait")
    assert proc.returncode == 0, proc.stderr[-3000:]
    submission_id = proc.stdout.strip().splitlines()[-1]
    deadline = time.time() + 120
    while time.time() < deadline:
        state = json.loads(run_cli("jobs", "status", submission_id, "--address", address).stdout)["status"]
        if state != "PENDING":
            break
        time.sleep(1)
    assert state == "RUNNING", state
    stopped = run_cli("jobs", "stop", submission_id, "--address", address)
    assert stopped.stdout.strip().endswith("STOPPED"), stopped.stdout + stopped.stderr
    follow = run_cli("jobs", "logs", submission_id, "--address", address, "--follow")
    assert follow.returncode == 1  # a stopped job is not a success
