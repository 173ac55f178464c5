"""sweep on a real Ray Tune cluster: two LoRA configs under a cap that cannot pay for both schedules."""

from __future__ import annotations

import json
import math

import pytest
from frugalray.budget.ledger import ComputeLedger
from frugalray.config import parse_config
from frugalray.tune.sweep import SweepConfig, preflight_sweep, run_sweep, trial_cost_bounds


def write_sum_rows(path, n: int) -> str:
    with open(path, "w") as fh:
        for i in range(n):
            a, b = i % 7 + 1, i % 5 + 2
            fh.write(json.dumps({"prompt": f"What is {a} + {b}? Reply with only the number.", "response": str(a + b)}) + "\n")
    return str(path)


@pytest.mark.slow
def test_sweep_stops_at_the_flop_cap_and_reports_the_best(ray_cluster, default_model_path, tmp_path):
    base = {
        "model": default_model_path,
        "data_path": write_sum_rows(tmp_path / "train.jsonl", 12),
        "method": "lora",
        "lora_rank": 4,
        "batch_size": 2,
        "seq_len": 48,
        "eval_rows": 2,
        "cpu_threads": 1,  # a shared 2-core CI box: 2 OpenMP threads per process thrash
    }
    raw = {
        "finetune": base,
        "search_space": {"learning_rate": [3e-3, 1e-5]},
        "steps_per_report": 1,
        "max_steps_per_trial": 4,
        "flop_cap": 1.0,  # set below from the real bound
    }
    # Each chunk (1 step + eval) holds an upper bound U, padded to seq_len; the real cost is
    # lower (short rows) and the rest is handed back. A cap of 2.5 U cannot pay for the full
    # schedule of 8 chunks unless a real chunk cost under a fifth of its bound.
    probe = parse_config(SweepConfig, {**raw, "flop_cap": 1e18})
    data, shape, _ = preflight_sweep(probe)
    step, evaluation = trial_cost_bounds(probe.finetune, shape, len(data.eval_rows))
    chunk_bound = step + evaluation
    raw["flop_cap"] = 2.5 * chunk_bound
    cfg = parse_config(SweepConfig, raw)

    run_dir = tmp_path / "run"
    result = run_sweep(cfg, run_dir)

    assert len(result.trials) == 2
    assert all(t.error is None for t in result.trials), [t.error for t in result.trials]
    assert 0 < result.flops_spent <= cfg.flop_cap
    assert result.flops_spent == pytest.approx(sum(t.flops for t in result.trials))
    # Settling handed back the padding, so the holds taken add up to more than was spent.
    assert result.flops_reserved - result.flops_released == pytest.approx(result.flops_spent)
    assert result.flops_released > 0
    for t in result.trials:
        assert t.flops <= t.reserved_flops  # no chunk spent more than it held
    assert sum(t.steps for t in result.trials) < 8  # the cap cut the schedule short
    assert any(t.stopped_by_cap for t in result.trials)
    # the trial that ran first always gets at least one chunk, since the cap exceeds one bound
    assert result.best_metric is not None and math.isfinite(result.best_metric)
    best = min((t for t in result.trials if t.metric is not None), key=lambda t: t.metric)
    assert result.best_config == best.config
    # The grid's first trial (3e-3) runs first (FIFO, one at a time) and always gets a chunk. The
    # second (1e-5) gets one only if 4 steps of the first left a chunk's bound under the cap, and
    # then its adapter barely moves (300x smaller steps) while the first trained all 4 steps.
    assert result.best_config == {"learning_rate": 3e-3}

    (entry,) = [e for e in ComputeLedger(run_dir).entries() if e["stage"] == "sweep"]
    assert entry["flops"] == pytest.approx(result.flops_spent)
    assert entry["flops"] <= entry["flop_cap"] == cfg.flop_cap
    assert entry["trials_stopped_by_cap"] >= 1
