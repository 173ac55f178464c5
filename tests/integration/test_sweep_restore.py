"""Real tiny sweeps on the session Ray cluster: a killed driver resumed under the same cap; asha and
marginal schedulers with a budget ladder."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import parse_config
from frugalray.tune.budget import FlopReservations, read_journal
from frugalray.tune.sweep import (
    STATE_FILE,
    SweepConfig,
    _pause_scratch,
    preflight_sweep,
    resume_sweep,
    run_sweep,
    trial_cost_bounds,
)

ROOT = Path(__file__).resolve().parents[2]


def write_sum_rows(path, n: int) -> str:
    with open(path, "w") as fh:
        for i in range(n):
            a, b = i % 7 + 1, i % 5 + 2
            fh.write(json.dumps({"prompt": f"What is {a} + {b}? Reply with only the number.", "response": str(a + b)}) + "\n")
    return str(path)


def tiny_sweep(tmp_path, model_path, learning_rates, max_steps, cap_chunks, **extra) -> dict:
    """A sweep config dict whose cap is `cap_chunks` chunk upper bounds (1 step + a 2-row eval each)."""
    raw = {
        "finetune": {
            "model": model_path, "data_path": write_sum_rows(tmp_path / "train.jsonl", 12), "method": "lora",
            "lora_rank": 4, "batch_size": 2, "seq_len": 48, "eval_rows": 2, "cpu_threads": 1,
            # The schedulers' decisions follow the loss curves: one dtype on every machine (auto is
            # bf16 on AVX512-BF16 CPUs and fp32 elsewhere, and the curves differ enough to change them).
            "compute_dtype": "float32",
        },
        "search_space": {"learning_rate": learning_rates},
        "steps_per_report": 1,
        "max_steps_per_trial": max_steps,
        "flop_cap": 1e18,
        **extra,
    }
    probe = parse_config(SweepConfig, raw)
    data, shape, _ = preflight_sweep(probe)
    step, evaluation = trial_cost_bounds(probe.finetune, shape, len(data.eval_rows))
    raw["flop_cap"] = cap_chunks * (step + evaluation)
    return raw


@pytest.mark.slow
def test_a_killed_sweep_driver_resumes_and_the_cap_and_ledger_stay_consistent(ray_cluster, default_model_path, tmp_path):
    # 2 trials x 3 chunks; the cap pays for 5 chunk upper bounds (the one charged at restart included).
    raw = tiny_sweep(tmp_path, default_model_path, [3e-3, 1e-5], max_steps=3, cap_chunks=5)
    cap = raw["flop_cap"]
    config_path = tmp_path / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config", str(config_path), "--run-dir", str(run_dir)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        # Kill the driver once the first trial's first chunk has settled and Tune saved its state.
        deadline = time.time() + 420
        while True:
            state = json.loads((run_dir / STATE_FILE).read_text()) if (run_dir / STATE_FILE).exists() else None
            settles = [e for e in read_journal(run_dir / state["journal"]) if e["op"] == "settle"] if state else []
            saved = list((run_dir / "ray_tune").glob("*/experiment_state-*.json"))
            if settles and saved:
                break
            assert driver.poll() is None, f"driver ended before it could be killed:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"no trial result in time:\n{log_path.read_text()[-3000:]}"
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)

    journal = run_dir / state["journal"]
    before = FlopReservations.from_journal(cap, read_journal(journal))
    assert 0 < before.spent <= cap
    assert ComputeLedger(run_dir).entries() == []  # the killed driver never reached its ledger record

    result = resume_sweep(run_dir)

    assert result.resumed and result.sweep_id == state["sweep_id"]
    assert len(result.trials) == 2
    assert all(t.error is None for t in result.trials), [t.error for t in result.trials]
    for t in result.trials:  # every trial ran its schedule out or was stopped by the cap
        assert t.steps == 3 or t.stopped_by_cap, t
    # The journal is the spend across both drivers: nothing before the kill is forgotten, nothing is
    # counted twice, and the total (with the open holds charged in full) is within the cap.
    replayed = FlopReservations.from_journal(cap, read_journal(journal))
    assert result.flops_spent == pytest.approx(replayed.spent)
    assert before.spent <= result.flops_spent <= cap
    assert result.flops_charged_at_restart == pytest.approx(replayed.charged_at_restart)
    assert result.flops_spent >= sum(t.flops for t in result.trials)
    (entry,) = [e for e in ComputeLedger(run_dir).entries() if e["stage"] == "sweep"]
    assert entry["sweep_id"] == state["sweep_id"] and entry["resumed"] is True
    assert entry["flops"] == pytest.approx(result.flops_spent) and entry["flops"] <= cap

    # Resuming a finished sweep runs nothing and records nothing more.
    again = resume_sweep(run_dir)
    assert again.flops_spent == pytest.approx(result.flops_spent)
    assert len([e for e in ComputeLedger(run_dir).entries() if e["stage"] == "sweep"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["asha", "marginal"])
def test_asha_and_marginal_sweeps_stay_under_the_cap_and_report_a_ladder(
    scheduler, ray_cluster, default_model_path, tmp_path
):
    raw = tiny_sweep(tmp_path, default_model_path, [3e-3, 1e-5], max_steps=3, cap_chunks=5,
                     scheduler=scheduler, grace_period_flops=None)
    cap = raw.pop("flop_cap")
    raw["flop_caps"] = [cap * 0.4, cap]  # flop_cap comes from the largest
    cfg = parse_config(SweepConfig, raw)
    assert cfg.flop_cap == cap
    result = run_sweep(cfg, tmp_path / "run")

    assert all(t.error is None for t in result.trials), [t.error for t in result.trials]
    assert 0 < result.flops_spent <= cap
    # No trial died, so every hold was settled, including those of trials the scheduler stopped:
    # a hold left open would be cap that no trial could ever use.
    (entry,) = [e for e in ComputeLedger(tmp_path / "run").entries() if e["stage"] == "sweep"]
    assert entry["flops_held_open"] == pytest.approx(0.0, abs=1e-6 * cap), entry
    assert result.best_metric is not None and math.isfinite(result.best_metric)
    ladder = result.ladder
    assert [r.cap for r in ladder.rungs] == sorted(cfg.flop_caps)
    top = ladder.rungs[-1]
    assert top.status == "exact" and top.best_metric == pytest.approx(result.best_metric)
    assert ladder.rungs[0].flops_used <= cap * 0.4
    if scheduler == "marginal":  # its decisions read the remaining budget: a smaller cap is an estimate
        assert all(r.status == "estimate" for r in ladder.rungs if r.flops_used < result.flops_spent)
    for name in ("ladder_json", "ladder_markdown", "ladder_png", "scaling"):
        assert Path(result.reports[name]).stat().st_size > 100
    assert "| cap (FLOPs) |" in Path(result.reports["ladder_markdown"]).read_text()


@pytest.mark.slow
def test_marginal_sweep_pauses_trials_and_resumes_them_where_they_stopped(ray_cluster, default_model_path, tmp_path):
    # One trial at a time (the default): without pausing, the first config would be trained out before
    # the others were tried. With checkpoints at every report the scheduler screens each config for
    # its grace period, pauses it, and resumes the promising ones from their checkpoints.
    # The best config (lr 3e-4 in fp32) is screened first, so it must wait, paused, while the others get
    # their grace periods, and then be resumed for the budget that is left.
    raw = tiny_sweep(tmp_path, default_model_path, [3e-4, 1e-5, 3e-3], max_steps=8, cap_chunks=16,
                     scheduler="marginal", grace_period_flops=None)
    cfg = parse_config(SweepConfig, raw)
    assert cfg.pause_trials and cfg.max_concurrent_trials == 1
    result = run_sweep(cfg, tmp_path / "run")

    assert all(t.error is None for t in result.trials), [t.error for t in result.trials]
    assert 0 < result.flops_spent <= cfg.flop_cap
    (entry,) = [e for e in ComputeLedger(tmp_path / "run").entries() if e["stage"] == "sweep"]
    assert entry["flops_held_open"] == pytest.approx(0.0, abs=1e-6 * cfg.flop_cap), entry
    # Every report in the order the sweep spent its FLOPs: (sweep FLOPs, trial, step, trial FLOPs).
    events = sorted((sf, h["trial_id"], int(step), fl) for h in result.histories
                    for sf, step, fl in zip(h["sweep_flops"], h["step"], h["flops"]) if step > 0)
    order = [tid for _, tid, _, _ in events]
    print("\nreports in spend order:", [(tid[-5:], step) for _, tid, step, _ in events])
    assert len(set(order)) == 3, "every config got its grace period before any was trained out"
    resumed = []
    for h in result.histories:
        trained = [i for i, c in enumerate(h["chunk_flops"]) if c > 0]  # a refusal at resumption trains nothing
        steps = [int(h["step"][i]) for i in trained]
        # A paused trial continues its own count: no step is trained twice, none skipped.
        assert steps == list(range(1, len(steps) + 1)), (h["trial_id"], h["step"])
        flops = [h["flops"][i] for i in trained]
        assert flops == sorted(flops) and len(set(flops)) == len(flops)
        spent_at = [h["sweep_flops"][i] for i in trained]
        others = [sf for g in result.histories if g is not h
                  for sf, c in zip(g["sweep_flops"], g["chunk_flops"]) if c > 0]
        if any(spent_at[0] < sf < spent_at[-1] for sf in others):  # it waited while others trained
            resumed.append(h["trial_id"])
        # The trial's result is its real last metric, not a placeholder from a refused resumption.
        finite = [m for m in h["metric"] if m is not None]
        assert finite and h["metric"][-1] == finite[-1]
    assert resumed, "no trial was paused and resumed"
    # The local scratch copies of the pause checkpoints are gone (Tune's storage keeps the checkpoints).
    assert not [h["trial_id"] for h in result.histories if _pause_scratch(h["trial_id"]).exists()]
    paused = [t for t in result.trials if 0 < t.steps < cfg.max_steps_per_trial and not t.stopped_by_cap]
    assert not paused or result.flops_spent > 0.8 * cfg.flop_cap, "a trial was left paused with budget to spare"
