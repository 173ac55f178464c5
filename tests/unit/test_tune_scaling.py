"""Scaling-law fits, the Chinchilla N/D split and the fit-based sweep stopping rule, on synthetic data (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from frugalray.tune.scaling import (
    SweepStopRule,
    chinchilla_split,
    fit_chinchilla,
    fit_power_law,
    fit_scaling,
    frontier,
)

G = 1e9


def test_frontier_keeps_only_record_setting_points():
    x, y = frontier([3, 1, 2, 4, 5], [0.8, 1.0, 0.9, 0.85, 0.7])
    assert x.tolist() == [1, 2, 3, 5] and y.tolist() == [1.0, 0.9, 0.8, 0.7]


def test_power_law_fit_recovers_known_parameters_and_the_tokens_it_implies():
    c = np.geomspace(1 * G, 100 * G, 15)
    loss = 1.5 + 2.0 * (c / G) ** -0.4
    fit = fit_power_law(c, loss)
    assert fit.floor == pytest.approx(1.5, abs=0.02) and fit.alpha == pytest.approx(0.4, rel=0.05)
    assert fit.rmse < 1e-3
    # within 1% of the floor: 2 (c/G)^-0.4 = 0.015 -> c = G * (2/0.015)^(1/0.4)
    assert fit.x_within(0.01) == pytest.approx(G * (2 / 0.015) ** 2.5, rel=0.15)
    # gain per FLOP = 0.4*2/G (c/G)^-1.4 equals the rate at c = G * (0.8 / (G*rate))^(1/1.4)
    rate = 1e-12
    assert fit.x_at_rate(rate) == pytest.approx(G * (0.8 / (G * rate)) ** (1 / 1.4), rel=0.15)


def test_fit_scaling_reports_both_axes_compute_optimal_tokens_and_says_one_model_has_no_split():
    rng = np.random.default_rng(0)
    points = []
    for floor in (1.2, 1.5, 1.9):  # three trials, the same FLOPs per token
        for k in range(1, 9):
            c = k * 4 * G
            points.append((c, c / 1e6, floor + 2.0 * (c / G) ** -0.5 + rng.normal(0, 0.005)))
    report = fit_scaling(points, "min", flops_per_token=1e6, model_params=135_000_000, stop_rate=1e-12)
    assert report["vs_flops"]["fitted_on"] == "frontier"
    assert report["vs_flops"]["E"] == pytest.approx(1.2, abs=0.15)
    assert report["vs_tokens"]["alpha"] == pytest.approx(report["vs_flops"]["alpha"], rel=1e-6)
    opt = report["compute_optimal_tokens"]
    assert opt["tokens_within_0.01_of_floor"] == pytest.approx(opt["flops_within_0.01_of_floor"] / 1e6)
    assert opt["chinchilla_reference_tokens"] == 20 * 135_000_000
    assert "tokens_at_stop_rate" in opt
    assert report["n_d_split"].startswith("not applicable")
    maxed = fit_scaling([(c, t, -m) for c, t, m in points], "max", flops_per_token=1e6)
    assert maxed["vs_flops"]["alpha"] == pytest.approx(report["vs_flops"]["alpha"])
    assert fit_scaling([], "min")["note"].startswith("no finite metric")


def test_chinchilla_fit_recovers_the_law_and_the_split_minimises_loss_at_fixed_compute():
    E, A, alpha, B, beta = 1.69, 406.4, 0.34, 410.7, 0.28  # Hoffmann et al. 2022
    n = np.repeat(np.geomspace(1e7, 1e9, 5), 6)
    d = np.tile(np.geomspace(1e8, 1e11, 6), 5)
    rng = np.random.default_rng(1)
    loss = E + A * n**-alpha + B * d**-beta + rng.normal(0, 1e-4, n.size)
    fit = fit_chinchilla(n, d, loss)
    assert fit.alpha == pytest.approx(alpha, rel=0.1) and fit.beta == pytest.approx(beta, rel=0.1)
    assert fit.E == pytest.approx(E, abs=0.1) and fit.rmse < 1e-3
    C = 1e21
    n_opt, d_opt = chinchilla_split(fit, C)
    assert 6 * n_opt * d_opt == pytest.approx(C)
    grid = np.geomspace(n_opt / 30, n_opt * 30, 2001)  # brute force along C = 6ND
    brute = grid[np.argmin(fit.predict(grid, C / (6 * grid)))]
    assert n_opt == pytest.approx(brute, rel=0.01)
    # With the true law: tens of tokens per parameter at this compute, Chinchilla's regime
    true_n, true_d = chinchilla_split(type(fit)(E, A, alpha, B, beta, 0.0), C)
    assert 5 < true_d / true_n < 100
    with pytest.raises(ValueError, match="model sizes"):
        fit_chinchilla([1e8] * 6, np.geomspace(1e8, 1e10, 6), np.ones(6))


def feed(rule, tid, curve, ks, sweep_start=0.0, done_at=None):
    for k in ks:
        rule.observe(tid, k * G, curve(k * G), sweep_flops=sweep_start + k * G, done=(k == done_at))


def test_stop_rule_ends_the_sweep_when_every_option_has_flattened():
    flat = lambda c: 1.0 + 1e-4 * (c / G) ** -0.5
    rule = SweepStopRule(threshold=0.01, mode="min", flop_cap=1000 * G, max_trial_flops=20 * G, total_trials=4)
    feed(rule, "a", flat, range(1, 4))
    assert not rule.should_stop()  # one trial with 3 points: too early to judge
    feed(rule, "a", flat, range(4, 9))
    feed(rule, "b", lambda c: flat(c) + 0.3, range(1, 9), sweep_start=8 * G)
    assert rule.should_stop() and "threshold" in rule.why
    gains = rule.predicted_gains()
    assert set(gains) == {"a", "b", "new configuration"} and max(gains.values()) < 0.01


def test_stop_rule_keeps_going_while_a_live_trial_or_a_new_config_is_predicted_to_gain():
    steep = lambda c: 1.0 + 3.0 * (c / G) ** -0.7
    flat = lambda c: 1.5 + 1e-4 * (c / G) ** -0.5
    rule = SweepStopRule(threshold=0.01, mode="min", flop_cap=1000 * G, max_trial_flops=100 * G, total_trials=2)
    feed(rule, "steep", steep, range(1, 9))
    feed(rule, "flat", flat, range(1, 9), sweep_start=8 * G)
    assert not rule.should_stop() and rule.predicted_gains()["steep"] > 0.1
    # The steep trial finished its schedule; no configs left: nothing more can be gained.
    rule.observe("steep", 9 * G, steep(9 * G), done=True)
    rule.observe("flat", 9 * G, flat(9 * G), done=True)
    assert rule.should_stop() and rule.why == "no option is left"
    # Unstarted configs, and a budget that still pays for them, keep it going.
    rule2 = SweepStopRule(threshold=0.01, mode="min", flop_cap=1000 * G, max_trial_flops=100 * G, total_trials=5)
    feed(rule2, "steep", steep, range(1, 9), done_at=8)
    feed(rule2, "flat", flat, range(1, 9), done_at=8)
    assert not rule2.should_stop() and rule2.predicted_gains()["new configuration"] > 0.1
    # ... unless the budget is spent.
    rule2.observe("flat", 9 * G, flat(9 * G), sweep_flops=1000 * G, done=True)
    assert rule2.should_stop()


def test_stop_rule_bad_settings_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        SweepStopRule(0, "min", 1.0, 1.0, 1)
    with pytest.raises(ValueError, match="mode"):
        SweepStopRule(0.1, "best", 1.0, 1.0, 1)
    rule = SweepStopRule(0.1, "max", 10 * G, 5 * G, 2)
    rule.observe("a", G, math.nan)
    assert rule.predicted_gains() == {} and not rule.should_stop()
