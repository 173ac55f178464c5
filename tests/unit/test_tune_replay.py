"""The replay harness and bench/tune_compare.py in --quick mode (pure simulation, no Ray)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from frugalray.tune.replay import (
    METHODS,
    Asha,
    Plateau,
    RandomSearch,
    RecordedCurve,
    SearchSpace,
    oracle_flops_to_reach,
    recorded_space,
    replay,
    synthetic_space,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("cap_trials", [0.3, 1.5])
def test_every_method_stays_under_the_cap(name, cap_trials):
    space = synthetic_space(6, seed=3, reports_per_trial=16)
    cap = cap_trials * space.max_trial_flops
    run = replay(space, METHODS[name](space, 3), cap=cap, seed=3)
    assert 0 < run.spent <= cap
    assert all(b[0] >= a[0] for a, b in zip(run.trace, run.trace[1:]))
    assert run.final_true >= space.best_final() - 1e-12  # nothing beats the best curve's end


def test_fifo_with_a_cap_for_everything_finds_the_best_final():
    space = synthetic_space(6, seed=1, reports_per_trial=16)
    run = replay(space, METHODS["fifo"](space, 1), cap=6 * space.max_trial_flops, seed=1)
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


def test_plateau_stops_a_trial_whose_last_results_have_a_small_spread_after_its_grace():
    plateau = Plateau(std=0.01, num_results=4, grace_period=4)
    space = synthetic_space(3, seed=0)
    plateau.start(space, cap=1e30)
    decisions = [plateau.result(0, k, loss).value for k, loss in enumerate([2.0, 1.0, 1.0, 1.0, 1.001], 1)]
    # 4 results [2, 1, 1, 1]: std 0.43 -> continue; then [1, 1, 1, 1.001]: std < 0.01 -> stop
    assert decisions == ["CONTINUE"] * 4 + ["STOP"]


def test_random_search_draws_configs_with_replacement_and_replays_them():
    space = synthetic_space(4, seed=2, reports_per_trial=8)
    method = RandomSearch(seed=5)
    run = replay(space, method, cap=4 * space.max_trial_flops, seed=5)
    assert len(method.draws) == 4 and all(0 <= d < 4 for d in method.draws)
    assert run.spent == pytest.approx(4 * space.max_trial_flops)
    assert run.final_true == pytest.approx(min(space.curves[d].true_loss(space.max_trial_flops) for d in method.draws))


def fake_recording(n_configs=4, reports=6):
    curves = []
    for i in range(n_configs):
        floor = 1.0 + 0.2 * i
        losses = [floor + 2.0 / (k + 1) + 0.01 * ((-1) ** k) for k in range(reports)]
        curves.append({"config": {"learning_rate": 10.0 ** -(i + 2)}, "flops": [1e12 * (k + 1) for k in range(reports)],
                       "losses": losses})
    return {"source": "test", "curves": curves}


def test_oracle_needs_the_fewest_chunks_any_single_config_needs():
    fast_high = RecordedCurve({"lr": 1}, (2.0, 1.2, 1.1, 1.1), chunk_flops=10.0)
    slow_low = RecordedCurve({"lr": 2}, (3.0, 2.0, 1.05, 1.0), chunk_flops=10.0)
    space = SearchSpace([fast_high, slow_low], max_trial_flops=40.0, chunk_flops=10.0, noise=0.0,
                        spike_prob=0.0, spike_size=0.0)
    assert oracle_flops_to_reach(space, 1.01) == 40.0  # only slow_low gets there, at its 4th report
    assert oracle_flops_to_reach(space, 1.1) == 30.0  # both reach 1.1 at their 3rd report
    assert oracle_flops_to_reach(space, 1.5) == 20.0
    assert oracle_flops_to_reach(space, 0.9) == math.inf


def test_recorded_space_replays_the_measured_points_and_reorders_per_seed():
    rec = fake_recording()
    a, b = recorded_space(rec, seed=0), recorded_space(rec, seed=1)
    assert a.chunk_flops == pytest.approx(1e12) and a.max_trial_flops == pytest.approx(6e12)
    assert sorted(c.config["learning_rate"] for c in a.curves) == sorted(c.config["learning_rate"] for c in b.curves)
    curve = next(c for c in a.curves if c.config["learning_rate"] == 1e-2)
    assert curve.true_loss(3e12) == pytest.approx(rec["curves"][0]["losses"][2])
    assert curve.true_loss(2.5e12) == pytest.approx(sum(rec["curves"][0]["losses"][1:3]) / 2)
    assert a.best_final() == pytest.approx(rec["curves"][0]["losses"][-1])
    assert 0 < a.noise < 0.05  # the measured wiggle, not made up
    for name in METHODS:
        run = replay(a, METHODS[name](a, 0), cap=2 * a.max_trial_flops, seed=0)
        assert 0 < run.spent <= 2 * a.max_trial_flops


def load_bench():
    spec = importlib.util.spec_from_file_location("tune_compare", ROOT / "bench" / "tune_compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tune_compare_quick_mode_writes_the_design_json(tmp_path, capsys):
    bench = load_bench()
    rec = tmp_path / "recorded_curves.json"
    rec.write_text(json.dumps(fake_recording()))
    result = bench.run(quick=True, out=tmp_path, plot=True, methods=["fifo", "plateau", "asha", "marginal"],
                       recorded=rec)
    data = json.loads((tmp_path / "tune_compare.json").read_text())
    assert set(data) == {"bench", "date", "commit", "machine", "config", "metrics", "targets", "met",
                         "targets_history"}
    assert data["bench"] == "tune_compare" and data["config"]["recorded_real_curves"] is True
    assert data["config"]["real_sweep_on_default_model"] is False
    assert set(data["targets"]) == set(data["met"]) and data["targets"]
    assert any(k.startswith("recorded_marginal_vs_fifo") for k in data["targets"])
    # FIFO's cap pays for every trial
    assert data["metrics"]["synthetic_fifo_flops_to_1pct_R"]["reached"] == "2/2"
    assert data["metrics"]["recorded_fifo_flops_to_1pct_R"]["reached"] == "4/4"
    assert (tmp_path / "tune_compare.png").stat().st_size > 1000
    bench.print_report(result)
    out = capsys.readouterr().out
    assert "recorded" in out and "FLOPs to 1% [R]" in out.splitlines()[-9]
