"""The replay harness and bench/tune_compare.py in --quick mode (pure simulation, no Ray)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from frugalray.tune.replay import METHODS, Asha, replay, synthetic_space

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("cap_trials", [0.3, 1.5])
def test_every_method_stays_under_the_cap(name, cap_trials):
    space = synthetic_space(6, seed=3, reports_per_trial=16)
    cap = cap_trials * space.max_trial_flops
    run = replay(space, METHODS[name](space), cap=cap, seed=3)
    assert 0 < run.spent <= cap
    assert all(b[0] >= a[0] for a, b in zip(run.trace, run.trace[1:]))
    assert run.final_true >= space.best_final() - 1e-12  # nothing beats the best curve's end


def test_fifo_with_a_cap_for_everything_finds_the_best_final():
    space = synthetic_space(6, seed=1, reports_per_trial=16)
    run = replay(space, METHODS["fifo"](space), cap=6 * space.max_trial_flops, seed=1)
    assert run.spent == pytest.approx(6 * space.max_trial_flops)
    assert run.flops_to_reach(space.best_final() * 1.01) <= run.spent
    assert math.isinf(run.flops_to_reach(space.best_final() * 0.99))


def test_asha_keeps_only_the_top_third_at_a_rung():
    asha = Asha(grace_flops=1.0, reduction_factor=3)
    space = synthetic_space(3, seed=0)
    asha.start(space, cap=1e30)
    for i, loss in enumerate([1.0, 2.0, 3.0, 0.5, 2.5]):
        decision = asha.result(i, 1.0, loss)
        # i=0 first at the rung: continue; i=1, 2: worse than the top third: stop; i=3 best: continue
        assert decision.value == ("CONTINUE" if i in (0, 3) else "STOP")


def test_tune_compare_quick_mode_writes_the_design_json(tmp_path):
    spec = importlib.util.spec_from_file_location("tune_compare", ROOT / "bench" / "tune_compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(quick=True, out=tmp_path, plot=True, methods=["fifo", "asha", "marginal"])
    data = json.loads((tmp_path / "tune_compare.json").read_text())
    assert set(data) == {"bench", "date", "machine", "config", "metrics", "targets", "met"}
    assert data["bench"] == "tune_compare" and data["config"]["recorded_real_curves"] is False
    assert set(data["targets"]) == set(data["met"]) and data["targets"]
    assert data["metrics"]["fifo_flops_to_1pct_R"]["reached"] == "2/2"  # FIFO's cap pays for every trial
    assert (tmp_path / "tune_compare.png").stat().st_size > 1000
    bench.print_table(result)
