"""Faults: a worker process killed mid-run, Ray Train restarts from the last checkpoint; --resume-from.

The kill is real: rank 0 SIGKILLs its own process at the start of step 4 (once; a marker
file keeps the restarted worker alive). Checkpoints every 2 steps, so the run restarts from
step 2 and recomputes step 3 only. Because a checkpoint holds the adapter, optimizer, LR
schedule, data position and every rank's RNG state, the recovered run's loss curve equals
the uninterrupted one.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from frugalray.budget.ledger import ComputeLedger
from frugalray.config import parse_config
from frugalray.train.finetune import FinetuneConfig, run_finetune

from test_finetune_fsdp import MAX_FAILURES, base_cfg, write_rows


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_resume_from_continues(ray_cluster, default_model_path, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", 12)
    common = dict(batch_size=2, num_workers=2, max_steps=6, checkpoint_every=2, learning_rate=1e-3,
                  lr_scheduler="linear", warmup_steps=1)
    clean_cfg = parse_config(FinetuneConfig, base_cfg(default_model_path, data, "lora", **common))
    clean = run_finetune(clean_cfg, tmp_path / "clean")
    assert clean.restarts == 0 and clean.repeated_steps == 0

    marker = tmp_path / "killed.json"
    faulty_cfg = parse_config(
        FinetuneConfig,
        base_cfg(default_model_path, data, "lora", **common, max_failures=MAX_FAILURES,
                 inject_fault={"at_step": 4, "rank": 0, "marker": str(marker)}),
    )
    faulty = run_finetune(faulty_cfg, tmp_path / "faulty")
    assert marker.is_file(), "the fault hook never fired"
    killed_pid = json.loads(marker.read_text())["pid"]

    records = [json.loads(line) for line in Path(faulty.steps_file).read_text().splitlines()]
    attempts = list(dict.fromkeys(r["attempt"] for r in records))
    print("\nsteps per attempt:", {a: [r["step"] for r in records if r["attempt"] == a] for a in attempts})
    print("clean  losses:", [round(x, 5) for x in clean.losses])
    print("faulty losses:", [round(x, 5) for x in faulty.losses])
    assert len(attempts) == 2 and faulty.restarts == 1
    first = [r["step"] for r in records if r["attempt"] == attempts[0]]
    second = [r["step"] for r in records if r["attempt"] == attempts[1]]
    assert first == [1, 2, 3]  # killed at the start of step 4
    assert second == [3, 4, 5, 6]  # restarted from the step-2 checkpoint
    counts = Counter(r["step"] for r in records)
    assert counts[1] == counts[2] == 1  # nothing before the checkpoint ran twice
    assert faulty.repeated_steps == 1
    assert faulty.steps == 6 and [h for h in range(1, 7)] == list(range(1, len(faulty.losses) + 1))
    for a, b in zip(clean.losses, faulty.losses):
        assert abs(a - b) <= 1e-3, (clean.losses, faulty.losses)
    assert killed_pid > 0

    # The ledger charges the recomputed step too (what was really spent), once per run.
    entries = [e for e in ComputeLedger(tmp_path / "faulty").entries() if e["stage"] == "finetune"]
    assert len(entries) == 1 and entries[0]["repeated_steps"] == 1
    assert entries[0]["train_flops"] > clean.train_flops

    # --resume-from a finished run: two more steps, history continuous, nothing redone.
    more_cfg = parse_config(
        FinetuneConfig,
        base_cfg(default_model_path, data, "lora", **{**common, "max_steps": 8}, resume_from=str(tmp_path / "clean")),
    )
    more = run_finetune(more_cfg, tmp_path / "more")
    assert more.start_step == 6 and more.steps == 8
    assert more.losses[:6] == pytest.approx(clean.losses, abs=1e-9)
    executed = [json.loads(line)["step"] for line in Path(more.steps_file).read_text().splitlines()]
    assert executed == [7, 8]
