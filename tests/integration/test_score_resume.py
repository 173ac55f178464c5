"""A scoring job killed mid-run and started again resumes: finished shards are kept untouched,
no row is scored twice, and every row read is scored or quarantined (with a reason)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from frugalray.budget.ledger import ComputeLedger
from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows

REPO = Path(__file__).resolve().parents[2]


def _shards(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*.parquet"))}


@pytest.mark.slow  # two job starts (each joins the cluster and loads the model): 1-3 min on a shared box
@pytest.mark.timeout(900)
def test_killed_score_job_resumes_without_rescoring(ray_cluster, default_model_path, tmp_path):
    rows = generate_tasks(GenerateConfig(n_rows=16, seed=11))
    rows[5] = {**rows[5], "response": " ".join(f"w{i}" for i in range(150))}  # > max_tokens: quarantined
    data = write_rows(rows, tmp_path / "tasks.jsonl")
    out = tmp_path / "scored"
    config = tmp_path / "score.yaml"
    config.write_text(yaml.safe_dump({
        "model": default_model_path, "input_path": str(data), "output_path": str(out),
        "scorers": ["perplexity"], "batch_size": 1, "shard_rows": 2, "max_length": 128, "max_tokens": 100,
        "num_actors": 1, "torch_threads": 1,
    }))
    command = [sys.executable, str(REPO / "jobs" / "score.py"), "--config", str(config), "--run-dir", str(tmp_path / "run")]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}

    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115 - a file, not a pipe: a full pipe would stall the job
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while len(_shards(out)) < 2:
        if first.poll() is not None:
            pytest.fail(f"the first run ended (rc {first.returncode}) before it could be killed:\n"
                        f"{(tmp_path / 'first.log').read_text()[-3000:]}")
        assert time.time() < deadline, "no shard written within 600 s"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    log.close()
    before = _shards(out)
    assert 2 <= len(before) < 8, f"the kill came too late to test resuming: {sorted(before)}"
    assert not (tmp_path / "run" / "ledger.jsonl").exists()  # the killed run never finished

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "rows_in 16 = scored 15 + quarantined 1" in second.stdout

    after = _shards(out)
    assert len(after) == 8  # source rows 0-15 in shards of 2 (shard 2 holds one row: row 5 is quarantined)
    for name, stamp in before.items():
        assert after[name] == stamp, f"{name} was written again"
    scored = pq.read_table(out).to_pylist()
    ids = [r["id"] for r in scored]
    assert len(ids) == len(set(ids)) == 15
    assert set(ids) == {r["id"] for i, r in enumerate(rows) if i != 5}
    assert all(r["perplexity"] > 0 for r in scored)
    (quarantined,) = [json.loads(line) for line in Path(str(out) + "_quarantine.jsonl").read_text().splitlines()]
    assert quarantined["id"] == rows[5]["id"] and quarantined["quarantine_reason"].startswith("too long:")
    assert "> max_tokens 100" in quarantined["quarantine_reason"]

    (entry,) = ComputeLedger(tmp_path / "run").entries()
    resumed_rows = sum(pq.read_metadata(out / name).num_rows for name in before)
    assert entry["shards_resumed"] == len(before)
    assert entry["rows_scored_now"] == 15 - resumed_rows  # no row scored twice
    sidecar = json.loads(Path(str(out) + "_scores.json").read_text())
    assert sidecar["rows_in"] == 16 and sidecar["rows_scored"] == 15 and sidecar["rows_quarantined"] == 1
    assert entry["flops"] < sidecar["flops"]  # this run paid only for the rows it scored
