"""MarginalGainPolicy as a pure state machine driven by synthetic learning curves (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from frugalray.tune.marginal import (
    Decision,
    MarginalGainPolicy,
    MarginalGainSettings,
    fit_learning_curve,
)
from hypothesis import given, settings
from hypothesis import strategies as st

G = 1e9  # one chunk of FLOPs in these tests


def curve(floor: float, scale: float, b: float):
    return lambda c: floor + scale * (c / G) ** -b


def run_trial(policy, tid, f, chunk=G, max_chunks=200, sign=1.0):
    """Feed a trial chunk by chunk until the policy says something other than CONTINUE."""
    flops = policy.trials[tid].spent
    for _ in range(max_chunks):
        assert policy.request(tid, chunk)
        flops += chunk
        decision = policy.trial_result(tid, flops, sign * f(flops))
        if decision != Decision.CONTINUE:
            return decision, flops
    return Decision.CONTINUE, flops


# -- curve fits -------------------------------------------------------------------------------


def test_power_law_fit_recovers_parameters_and_shrugs_off_an_outlier():
    rng = np.random.default_rng(0)
    c = np.linspace(1, 10, 12) * G
    y = 1.2 + 3.0 * (c / G) ** -0.5 + rng.normal(0, 0.01, c.size)
    y[4] += 1.0  # one broken evaluation
    fit = fit_learning_curve(c, y)
    assert fit.kind == "power"
    assert fit.b == pytest.approx(0.5, rel=0.1)
    assert fit.predict(100 * G) == pytest.approx(1.2 + 3.0 * 0.1, abs=0.05)
    assert fit.noise < 0.05  # the outlier does not inflate the noise estimate


def test_few_points_fall_back_to_a_windowed_slope_that_is_not_extrapolated_far():
    fit = fit_learning_curve([G, 2 * G, 3 * G], [3.0, 2.9, 2.8])
    assert fit.kind == "slope" and fit.slope == pytest.approx(-0.1 / G)
    assert fit.predict(4 * G) == pytest.approx(2.7)
    assert fit.predict(1000 * G) == pytest.approx(2.6)  # clamped to one window span ahead
    assert fit_learning_curve([G], [2.0]).kind == "flat"
    assert fit_learning_curve([G, 2 * G], [math.nan, math.inf]).kind == "flat"


# -- hand-worked stopping decisions ---------------------------------------------------------


def test_fixed_lambda_stops_exactly_when_the_gain_per_flop_falls_below_it():
    # L(c) = 1 + 10 (c/G)^-1, chunks of G: the rate over the next chunk is
    # (L(c) - L(c+G)) / G = 10 / (k (k+1) G) at c = kG; lambda = 0.1/G lies between
    # k=9 (0.111/G: continue) and k=10 (0.0909/G: stop).
    policy = MarginalGainPolicy(MarginalGainSettings(flop_cap=1e3 * G, grace_flops=4 * G, stop_rate=0.1 / G))
    policy.trial_added("a")
    assert policy.admit("a")
    decision, flops = run_trial(policy, "a", curve(1.0, 10.0, 1.0))
    assert decision == Decision.STOP and flops == pytest.approx(10 * G)
    assert [d for _, _, d, _ in policy.decisions[:3]] == [Decision.CONTINUE] * 3  # inside grace


def test_grace_period_protects_young_trials_even_when_they_look_hopeless():
    policy = MarginalGainPolicy(MarginalGainSettings(flop_cap=1e3 * G, grace_flops=4 * G, stop_rate=1.0))
    policy.trial_added("slow")
    policy.admit("slow")
    decision, flops = run_trial(policy, "slow", curve(5.0, 1.0, 1.0))  # gains ~1e-10/FLOP << 1.0
    assert decision == Decision.STOP and flops == pytest.approx(4 * G)


def test_a_challenger_that_cannot_beat_where_the_best_is_heading_is_stopped_after_grace():
    s = MarginalGainSettings(flop_cap=1e4 * G, grace_flops=4 * G, max_trial_flops=50 * G)
    policy = MarginalGainPolicy(s)
    for tid in ("best", "worse", "crossing"):
        policy.trial_added(tid)
        assert policy.admit(tid)
    best, worse = curve(1.0, 10.0, 1.0), curve(3.0, 10.0, 1.0)
    crossing = curve(0.2, 20.0, 1.0)  # worse than "best" at grace (5.2 vs 3.5), better by 50 G
    for k in range(1, 5):  # three trials inside their grace, interleaved
        for tid, f in (("best", best), ("worse", worse), ("crossing", crossing)):
            policy.request(tid, G)
            decision = policy.trial_result(tid, k * G, f(k * G))
    assert policy.incumbent()[0] == "best"
    assert decision == Decision.CONTINUE  # "crossing" at its grace edge: 0.6 < 1.2 at 50 G
    policy.request("worse", G)
    assert policy.trial_result("worse", 5 * G, worse(5 * G)) == Decision.STOP
    assert policy.trials["worse"].status == "stopped"
    policy.request("crossing", G)
    assert policy.trial_result("crossing", 5 * G, crossing(5 * G)) == Decision.CONTINUE


def test_auto_lambda_pauses_a_slow_trial_for_a_better_option_and_resumes_it_later():
    s = MarginalGainSettings(flop_cap=1e5 * G, grace_flops=3 * G, initial_trials=2, pausable=True,
                             max_trial_flops=200 * G)
    policy = MarginalGainPolicy(s)
    for tid in ("slow", "worse", "new"):
        policy.trial_added(tid)
    slow = curve(0.5, 1.0, 0.2)  # the best, but it improves slowly
    worse = curve(1.5, 1.0, 0.5)
    for tid, f in (("slow", slow), ("worse", worse)):  # both inside their grace
        policy.admit(tid)
        for k in (1, 2):
            policy.request(tid, G)
            assert policy.trial_result(tid, k * G, f(k * G)) == Decision.CONTINUE
    assert policy.trials["worse"].status == "running"
    # Once it has enough reports, "worse" cannot beat where "slow" is heading. Pausable with
    # auto lambda, it is paused (kept for leftover budget) rather than stopped.
    decision, flops = run_trial(policy, "worse", worse)
    assert decision == Decision.PAUSE and flops <= 6 * G and policy.index(policy.trials["worse"]) == 0
    # The two curves differ a lot, so a fresh config has a real chance to beat "slow" soon:
    # the expected gain per FLOP of starting one beats what "slow" still earns, so it pauses.
    decision, _ = run_trial(policy, "slow", slow)
    t = policy.trials["slow"]
    assert decision == Decision.PAUSE and 0 < policy.self_rate(t) < policy.new_config_index()
    assert policy.choose_next() == "new"
    assert policy.admit("new")
    flat = curve(2.0, 0.5, 1.0)  # plateaus far above "slow": nothing to gain there
    decision, _ = run_trial(policy, "new", flat)
    assert decision == Decision.PAUSE and policy.index(policy.trials["new"]) == 0
    assert policy.choose_next() == "slow"  # FLOPs flow back to the paused best trial
    policy.trial_resumed("slow")
    assert policy.trials["slow"].status == "running"
    # While "slow" runs, the paused trials worth nothing (index 0) get no FLOPs: run beside it they
    # would spend the cap it can still use. Once nothing runs, the leftover goes to one of them.
    assert policy.choose_next() is None
    policy.trial_finished("slow")
    assert policy.choose_next() in ("worse", "new")


def test_when_every_option_is_worth_nothing_an_untried_config_goes_before_a_paused_one():
    policy = MarginalGainPolicy(MarginalGainSettings(flop_cap=100 * G, grace_flops=G, pausable=True))
    for tid in ("done", "paused", "untried"):
        policy.trial_added(tid)
    for tid in ("done", "paused"):
        policy.admit(tid)
        policy.request(tid, G)
        policy.trial_result(tid, G, 1.0)
    policy.trials["done"].status, policy.trials["paused"].status = "done", "paused"  # nothing runs now
    # The indices this tie-break is about, set directly (reaching exact zeros through curves is fragile).
    policy._changed()
    policy._memo.update({"new": 0.0, "index:paused": 0.0})
    assert policy.choose_next() == "untried"
    policy._memo.update({"index:paused": 1e-12})  # a paused trial still worth something goes first
    assert policy.choose_next() == "paused"


@pytest.mark.parametrize("pausable", [True, False])
def test_a_best_trial_that_stopped_improving_is_paused_for_leftover_flops_when_pausable(pausable):
    # Recorded replays: the best config (its loss rises mid-run, then falls) was stopped for good at half
    # its schedule while worse trials were only paused, and the leftover FLOPs went to those.
    policy = MarginalGainPolicy(MarginalGainSettings(flop_cap=100 * G, grace_flops=2 * G, pausable=pausable,
                                                     max_trial_flops=50 * G))
    policy.trial_added("best")
    policy.admit("best")
    decision, flops = run_trial(policy, "best", lambda c: 1.0, max_chunks=20)  # flat: rate 0
    assert policy.self_rate(policy.trials["best"]) == 0 and flops < 50 * G
    if not pausable:
        assert decision == Decision.STOP and policy.choose_next() is None
        return
    assert decision == Decision.PAUSE
    assert policy.choose_next() == "best"  # nothing runs: the leftover goes back to it
    policy.trial_resumed("best")
    assert policy.trials["best"].status == "running"


def _two_fitted_and_one_pending(exploration_weight: float) -> MarginalGainPolicy:
    """'slow' (the better curve) and 'worse' with three reports each; 'new' not started yet."""
    policy = MarginalGainPolicy(MarginalGainSettings(flop_cap=1e5 * G, grace_flops=2 * G, initial_trials=2,
                                                     max_trial_flops=200 * G, exploration_weight=exploration_weight))
    for tid in ("slow", "worse", "new"):
        policy.trial_added(tid)
    for tid, f in (("slow", curve(0.5, 1.0, 0.2)), ("worse", curve(1.5, 1.0, 0.5))):
        policy.admit(tid)
        for k in (1, 2, 3):
            policy.request(tid, G)
            policy.trial_result(tid, k * G, f(k * G))
    return policy


def test_without_pausing_the_same_best_trial_keeps_running():
    policy = _two_fitted_and_one_pending(1.0)  # a new config's full index: lambda above the best's rate
    decision, _ = run_trial(policy, "slow", curve(0.5, 1.0, 0.2), max_chunks=20)
    assert decision == Decision.CONTINUE
    t = policy.trials["slow"]
    assert policy.lambda_for(t) > policy.index(t) > 0  # below auto lambda, yet protected as the best


def test_exploration_weight_scales_the_new_config_index_only():
    full, half = _two_fitted_and_one_pending(1.0), _two_fitted_and_one_pending(0.5)
    assert full.new_config_index() > 0
    assert half.new_config_index() == pytest.approx(0.5 * full.new_config_index())
    for tid in ("slow", "worse"):  # running trials' own indices do not depend on it
        assert half.index(half.trials[tid]) == pytest.approx(full.index(full.trials[tid]))
    with pytest.raises(ValueError, match="exploration_weight"):
        MarginalGainSettings(flop_cap=1e5 * G, grace_flops=2 * G, exploration_weight=0.0)


def test_max_mode_makes_the_same_decisions_on_the_negated_metric():
    decisions = {}
    for mode, sign in (("min", 1.0), ("max", -1.0)):
        policy = MarginalGainPolicy(MarginalGainSettings(flop_cap=1e3 * G, grace_flops=4 * G,
                                                         stop_rate=0.1 / G, mode=mode))
        policy.trial_added("a")
        policy.admit("a")
        decisions[mode] = run_trial(policy, "a", curve(1.0, 10.0, 1.0), sign=sign)
    assert decisions["min"] == decisions["max"]


# -- admission and the cap -----------------------------------------------------------------


def test_admission_reserves_the_grace_period_and_refuses_what_the_cap_cannot_pay_for():
    policy = MarginalGainPolicy(MarginalGainSettings(flop_cap=10 * G, grace_flops=4 * G))
    for tid in "abc":
        policy.trial_added(tid)
    assert policy.admit("a") and policy.admit("b")
    assert not policy.can_admit() and not policy.admit("c")  # 2 G left < 4 G grace
    assert policy.choose_next() is None
    assert policy.request("a", 4 * G)  # inside its own grace reservation
    assert not policy.request("a", 3 * G)  # 4 G outstanding + 3 G more > 4 G + the 2 G left
    policy.trial_result("a", 3.5 * G, 2.0)  # the chunk cost less than its bound
    assert policy.request("a", 2.5 * G)  # 0.5 G leftover + 2 G from the pool: fits exactly
    assert policy.remaining == pytest.approx(0.0)
    policy.trial_result("a", 6 * G, 1.0)
    policy.trial_finished("a")  # spent 6 G of its 6 G
    policy.trial_finished("b")  # never spent: its grace reservation returns to the pool
    assert policy.remaining == pytest.approx(4 * G) and policy.admit("c")


@pytest.mark.parametrize("bad", [
    {"flop_cap": 1e9, "grace_flops": 2e9},
    {"flop_cap": 0.0, "grace_flops": 1.0},
    {"flop_cap": 1e9, "grace_flops": 1e8, "mode": "maximize"},
    {"flop_cap": 1e9, "grace_flops": 1e8, "stop_rate": -1.0},
])
def test_bad_settings_are_refused_naming_the_field(bad):
    field = "grace_flops" if bad["grace_flops"] > bad["flop_cap"] else next(
        k for k in ("mode", "stop_rate", "flop_cap") if k in bad and k != "grace_flops")
    with pytest.raises(ValueError, match=field):
        MarginalGainSettings(**bad)


events = st.lists(
    st.tuples(
        st.sampled_from(["add", "admit", "chunk", "chunk", "chunk", "resume", "finish"]),
        st.integers(0, 5),
        st.floats(min_value=0.01, max_value=5.0),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=events, cap=st.floats(2.0, 40.0), grace=st.floats(0.5, 2.0), pausable=st.booleans(),
       stop_rate=st.sampled_from(["auto", 0.0, 0.05]))
def test_no_interleaving_of_trials_spends_more_than_the_cap(ops, cap, grace, pausable, stop_rate):
    """Trials spend only what `request` granted; whatever order events arrive in, spent <= cap."""
    s = MarginalGainSettings(flop_cap=cap * G, grace_flops=grace * G, pausable=pausable,
                             stop_rate=stop_rate if stop_rate == "auto" else stop_rate / G, initial_trials=2)
    policy = MarginalGainPolicy(s)
    curves = [curve(0.5 + 0.3 * i, 2.0 + i, 0.3 + 0.2 * i) for i in range(6)]
    for kind, i, amount in ops:
        tid = f"t{i}"
        known = tid in policy.trials
        if kind == "add" and not known:
            policy.trial_added(tid)
        elif kind == "admit" and known and policy.trials[tid].status == "pending":
            admitted = policy.admit(tid)
            assert admitted == (policy.committed <= cap * G and policy.trials[tid].status == "running")
        elif kind == "chunk" and known and policy.trials[tid].status == "running":
            t = policy.trials[tid]
            if policy.request(tid, amount * G):
                flops = t.spent + amount * G
                policy.trial_result(tid, flops, curves[i](flops))
        elif kind == "resume" and known and policy.trials[tid].status == "paused":
            policy.trial_resumed(tid)
        elif kind == "finish" and known:
            policy.trial_finished(tid)
        assert policy.spent <= policy.committed * (1 + 1e-12) <= cap * G * (1 + 1e-12)
        for t in policy.trials.values():
            assert t.spent <= t.granted * (1 + 1e-12)
