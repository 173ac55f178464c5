"""Stopping rules of the adaptive serving strategies (pure logic: no Ray, no vLLM)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugalray.budget.flops import ModelShape
from frugalray.serve.stopping import (
    EARLY_REASONS,
    POLICIES,
    Limits,
    RoundPlan,
    Sample,
    beta_leader_probability,
    dirichlet_leader_probability,
    leader_confidence,
    make_policy,
    plan_round,
    run_policy,
    window_agrees,
)
from frugalray.serve.usage import request_flops

SHAPE = ModelShape(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, vocab_size=49152)
PROMPT = 40


def flops_of(completions, passes):
    return request_flops(SHAPE, PROMPT, completions, prompt_passes=passes)


def scripted(answers, tokens=5, logprob=-0.5):
    """A sampler that hands out `answers` in order (each a str/None, or a Sample)."""
    queue = list(answers)
    plans = []

    def draw(plan: RoundPlan):
        plans.append(plan)
        out = []
        for _ in range(plan.n):
            item = queue.pop(0)
            out.append(item if isinstance(item, Sample) else Sample(item, min(tokens, plan.max_tokens), logprob))
        return out

    draw.plans = plans
    return draw


# --- posterior rules: hand-worked values ---------------------------------------------------


@pytest.mark.parametrize(
    "v1, v2, exact",
    [
        (0, 0, Fraction(1, 2)),
        (1, 0, Fraction(3, 4)),
        (3, 0, Fraction(15, 16)),
        (4, 0, Fraction(31, 32)),
        (3, 1, Fraction(26, 32)),  # P(Bin(5, 1/2) <= 3) = (1 + 5 + 10 + 10) / 32
        (5, 1, Fraction(120, 128)),
        (7, 1, Fraction(502, 512)),
        (2, 2, Fraction(1, 2)),
    ],
)
def test_beta_leader_probability_matches_hand_worked_binomial_sums(v1, v2, exact):
    assert beta_leader_probability(v1, v2) == pytest.approx(float(exact), abs=1e-15)


def test_beta_matches_numeric_integral_of_the_beta_density():
    # P(x > 1/2) for x ~ Beta(a, b), integrated with the midpoint rule
    a, b = 6, 3
    norm = math.gamma(a + b) / (math.gamma(a) * math.gamma(b))
    steps = 20000
    integral = sum(norm * ((0.5 + (i + 0.5) / steps / 2) ** (a - 1)) * ((0.5 - (i + 0.5) / steps / 2) ** (b - 1))
                   for i in range(steps)) * (0.5 / steps)
    assert beta_leader_probability(5, 2) == pytest.approx(integral, rel=1e-6)


def test_dirichlet_is_deterministic_and_agrees_with_beta_for_one_answer():
    assert dirichlet_leader_probability([4]) == dirichlet_leader_probability([4])
    # one observed answer + the unseen pseudo-answer is exactly the Beta(5, 1) case
    assert dirichlet_leader_probability([4]) == pytest.approx(31 / 32, abs=0.01)
    assert dirichlet_leader_probability([2, 2]) < 0.5  # a tie with a third unseen answer
    assert dirichlet_leader_probability([]) == 0.0


def test_leader_confidence_ignores_unanswered_samples():
    assert leader_confidence([None, None]) == 0.0
    assert leader_confidence(["7", None, "7", "8", "7"]) == pytest.approx(26 / 32)
    with pytest.raises(ValueError, match="stop_rule"):
        leader_confidence(["7"], "median")  # type: ignore[arg-type]


def test_window_agrees():
    assert window_agrees(["a", "b", "a", "a", "a"], 3)
    assert not window_agrees(["a", "b", "a", "a"], 3)
    assert not window_agrees([None, None, None], 3)
    assert not window_agrees(["a", "a"], 3)
    assert not window_agrees(["a", "a", "a"], 0)


# --- budget planning ---------------------------------------------------------------------


def test_plan_round_caps_at_max_samples():
    limits = Limits(max_samples=6, max_tokens=8)
    assert plan_round(4, [], 0, limits) == RoundPlan(4, 8)
    assert plan_round(4, [8] * 4, 1, limits) == RoundPlan(2, 8)
    assert plan_round(4, [8] * 6, 2, limits) == "max_samples"


def test_plan_round_sizes_for_the_worst_case_then_shortens_the_last_sample():
    limits = Limits(max_samples=10, max_tokens=4, max_completion_tokens=10)
    assert plan_round(4, [], 0, limits) == RoundPlan(2, 4)  # 2 x 4 <= 10 < 3 x 4
    assert plan_round(4, [3, 4], 1, limits) == RoundPlan(1, 3)  # 3 tokens left: one shorter sample
    assert plan_round(4, [4, 4, 2], 2, limits) == "max_completion_tokens"


def test_plan_round_respects_max_flops_exactly():
    one_full = flops_of([8], 1)
    limits = Limits(max_samples=8, max_tokens=8, max_flops=flops_of([8, 8], 1) + 1)
    assert plan_round(4, [], 0, limits, flops_of) == RoundPlan(2, 8)
    assert plan_round(1, [], 0, Limits(8, 8, max_flops=one_full - 1), flops_of).n == 1  # a shorter one fits
    assert plan_round(1, [], 0, Limits(8, 8, max_flops=flops_of([1], 1) - 1), flops_of) == "max_flops"
    with pytest.raises(ValueError, match="flops_of"):
        plan_round(1, [], 0, Limits(8, 8, max_flops=1e12))


# --- policies: hand-worked stop decisions --------------------------------------------------


def test_adaptive_consistency_stops_after_one_unanimous_round():
    policy = make_policy("adaptive_consistency", Limits(16, 8), confidence=0.95, round_size=4)
    out = run_policy(policy, scripted(["7"] * 16))
    assert (out.samples, out.rounds, out.answer, out.reason) == (4, 1, "7", "confident")
    assert out.stopped_early and out.confidence == pytest.approx(31 / 32)


def test_adaptive_consistency_needs_a_second_round_after_a_split():
    draw = scripted(["7", "7", "8", "7", "7", "7", "7", "7"] + ["9"] * 8)
    out = run_policy(make_policy("adaptive_consistency", Limits(16, 8), confidence=0.95, round_size=4), draw)
    # round 1: 3 vs 1 -> 26/32 < 0.95; round 2: 7 vs 1 -> 502/512 >= 0.95
    assert (out.samples, out.rounds, out.answer) == (8, 2, "7")
    assert out.confidence == pytest.approx(502 / 512)
    assert out.answer_counts == {"7": 7, "8": 1}
    assert out.pick == 0


def test_adaptive_consistency_on_a_hard_prompt_spends_the_whole_budget():
    draw = scripted(["1", "2", "3", "4", "5", "6", "7", "8"])
    out = run_policy(make_policy("adaptive_consistency", Limits(8, 8), confidence=0.95, round_size=3), draw)
    assert out.samples == 8 and out.reason == "max_samples" and not out.stopped_early
    assert [p.n for p in draw.plans] == [3, 3, 2]
    assert out.answer == "1"  # ties go to the first seen


def test_adaptive_consistency_window_rule():
    policy = make_policy("adaptive_consistency", Limits(16, 8), confidence=0.999, round_size=1, window=3)
    out = run_policy(policy, scripted(["a", "b", "a", "a", "a", "a"]))
    assert (out.samples, out.reason, out.answer) == (5, "window_agrees", "a")


def test_a_rule_that_fires_on_the_last_affordable_sample_is_not_an_early_stop():
    out = run_policy(make_policy("adaptive_consistency", Limits(4, 8), confidence=0.95, round_size=4),
                     scripted(["7"] * 4))
    assert out.reason == "confident" and out.samples == 4 and not out.stopped_early


def test_self_consistency_policy_never_stops_early():
    out = run_policy(make_policy("self_consistency", Limits(5, 8)), scripted(["7"] * 5))
    assert (out.samples, out.rounds, out.stopped_early) == (5, 1, False)


def test_best_of_n_stops_when_the_best_clears_the_bar():
    samples = [Sample("a", 5, -1.0), Sample("b", 5, -0.1), Sample("c", 5, -0.01), Sample("d", 5, -0.01)]
    out = run_policy(make_policy("best_of_n", Limits(8, 8), confidence=0.8, round_size=2), scripted(samples))
    assert (out.samples, out.pick, out.answer, out.reason) == (2, 1, "b", "threshold")
    assert out.confidence == pytest.approx(math.exp(-0.1))
    # an unreachable bar: all samples are drawn and the best one wins
    out = run_policy(make_policy("best_of_n", Limits(4, 8), confidence=0.999, round_size=2), scripted(samples))
    assert (out.samples, out.pick, out.answer, out.stopped_early) == (4, 2, "c", False)


def test_cascade_stops_at_a_confident_greedy_decode():
    draw = scripted([Sample("7", 3, -0.01)] + ["8"] * 8)
    out = run_policy(make_policy("cascade", Limits(8, 8), confidence=0.95, round_size=4), draw)
    assert (out.samples, out.answer, out.reason, out.stopped_early) == (1, "7", "greedy_confident", True)
    assert draw.plans == [RoundPlan(1, 8, greedy=True)]


def test_cascade_escalates_and_the_greedy_decode_does_not_vote():
    draw = scripted([Sample("7", 3, -2.0)] + ["8"] * 4 + ["9"] * 4)
    out = run_policy(make_policy("cascade", Limits(9, 8), confidence=0.95, round_size=4), draw)
    assert [p.greedy for p in draw.plans] == [True, False]
    assert (out.samples, out.answer, out.reason, out.pick) == (5, "8", "confident", 1)
    assert out.answer_counts == {"8": 4}


def test_cascade_without_budget_to_escalate_returns_the_greedy_decode():
    out = run_policy(make_policy("cascade", Limits(1, 8), confidence=0.95), scripted([Sample("7", 3, -2.0)]))
    assert (out.samples, out.answer, out.pick, out.reason) == (1, "7", 0, "max_samples")


def test_auto_gives_an_easy_prompt_one_sample():
    out = run_policy(make_policy("auto", Limits(16, 8), confidence=0.9, round_size=4),
                     scripted([Sample("7", 3, math.log(0.95))] + ["8"] * 16))
    assert (out.samples, out.reason, out.stopped_early, out.answer) == (1, "easy", True, "7")


def test_auto_scales_the_allocation_with_difficulty():
    # signal 0.475 at confidence 0.95: difficulty 1/2 -> cap 1 + ceil(0.5 * 8) = 5, rounds of 2
    draw = scripted([Sample("7", 3, math.log(0.475))] + ["7", "8", "9", "6", "5", "4"])
    policy = make_policy("auto", Limits(9, 8), confidence=0.95, round_size=4)
    out = run_policy(policy, draw)
    assert policy.difficulty == pytest.approx(0.5)
    assert [p.n for p in draw.plans] == [1, 2, 2]
    assert (out.samples, out.reason, out.stopped_early) == (5, "allocation", True)
    # no signal at all (no answer): the full budget is available
    draw = scripted([Sample(None, 8, -0.01)] + [str(i) for i in range(8)])
    out = run_policy(make_policy("auto", Limits(9, 8), confidence=0.95, round_size=4), draw)
    assert out.samples == 9 and out.reason == "max_samples"


def test_make_policy_rejects_unknown_strategies_and_bad_parameters():
    with pytest.raises(ValueError, match="strategy"):
        make_policy("greedy", Limits(1, 8))
    with pytest.raises(ValueError, match="confidence"):
        make_policy("auto", Limits(1, 8), confidence=0.0)
    with pytest.raises(ValueError, match="round_size"):
        make_policy("best_of_n", Limits(1, 8), round_size=0)


def test_observe_without_a_plan_is_an_error():
    policy = make_policy("adaptive_consistency", Limits(4, 8))
    with pytest.raises(RuntimeError):
        policy.observe([Sample("7", 1)])
    plan = policy.next_round()
    with pytest.raises(ValueError):
        policy.observe([Sample("7", 1)] * (plan.n + 1))


# --- properties: never over budget, deterministic given samples ---------------------------

ANSWERS = st.one_of(st.none(), st.sampled_from(["1", "2", "3"]))
SAMPLES = st.lists(
    st.tuples(ANSWERS, st.integers(0, 10_000), st.one_of(st.none(), st.floats(-20.0, 0.0))),
    min_size=0, max_size=300,
)


@st.composite
def budgets(draw):
    max_tokens = draw(st.integers(1, 64))
    return Limits(
        max_samples=draw(st.integers(1, 24)),
        max_tokens=max_tokens,
        max_completion_tokens=draw(st.one_of(st.none(), st.integers(1, 24 * 64))),
        max_flops=draw(st.one_of(st.none(), st.floats(flops_of([1], 1) * 0.5, flops_of([64] * 24, 24) * 1.2))),
    )


def _replay(strategy, limits, confidence, round_size, window, rule, stream):
    """Run a policy on a fixed stream of raw samples (lengths clipped to each plan's max_tokens)."""
    queue = list(stream)
    log = []

    def draw(plan):
        assert plan.n >= 1 and 1 <= plan.max_tokens <= limits.max_tokens
        out = []
        for _ in range(plan.n):
            if not queue:
                break
            answer, length, logprob = queue.pop(0)
            out.append(Sample(answer, length % (plan.max_tokens + 1), logprob))
        log.append((plan, out))
        return out

    policy = make_policy(strategy, limits, flops_of, confidence=confidence, round_size=round_size,
                         window=window, rule=rule)
    return run_policy(policy, draw), policy, log


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategy=st.sampled_from(sorted(POLICIES)),
    limits=budgets(),
    confidence=st.floats(0.5, 1.0),
    round_size=st.integers(1, 8),
    window=st.integers(0, 4),
    stream=SAMPLES,
)
def test_no_budget_is_ever_exceeded(strategy, limits, confidence, round_size, window, stream):
    out, policy, log = _replay(strategy, limits, confidence, round_size, window, "beta", stream)
    completions = [s.completion_tokens for s in policy.samples]
    assert out.samples == len(completions) <= limits.max_samples
    if limits.max_completion_tokens is not None:
        assert sum(completions) <= limits.max_completion_tokens
    if limits.max_flops is not None and completions:
        assert flops_of(completions, out.rounds) <= limits.max_flops
    # and the worst case of every planned round was within budget too
    worst = []
    for rounds, (plan, _) in enumerate(log):
        worst_round = worst + [plan.max_tokens] * plan.n
        if limits.max_flops is not None:
            assert flops_of(worst_round, rounds + 1) <= limits.max_flops
        if limits.max_completion_tokens is not None:
            assert sum(worst_round) <= limits.max_completion_tokens
        worst += [s.completion_tokens for s in log[rounds][1]]
    assert out.reason != "unfinished"
    assert out.pick is None or 0 <= out.pick < out.samples
    if out.stopped_early:
        assert out.reason in EARLY_REASONS and policy.budget_left()
    else:
        assert out.reason not in EARLY_REASONS or not policy.budget_left()


@settings(max_examples=100, deadline=None)
@given(
    strategy=st.sampled_from(sorted(POLICIES)),
    limits=budgets(),
    confidence=st.floats(0.5, 1.0),
    round_size=st.integers(1, 8),
    rule=st.sampled_from(["beta", "dirichlet"]),
    stream=SAMPLES,
)
def test_decisions_are_deterministic_given_the_samples(strategy, limits, confidence, round_size, rule, stream):
    first, _, log1 = _replay(strategy, limits, confidence, round_size, 2, rule, stream)
    again, _, log2 = _replay(strategy, limits, confidence, round_size, 2, rule, stream)
    assert first == again
    assert [p for p, _ in log1] == [p for p, _ in log2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=40))
def test_beta_confidence_is_a_probability_and_more_agreement_never_lowers_it(answers):
    conf = leader_confidence(answers)
    assert 0.0 <= conf < 1.0
    ranked = [a for a in answers if a is not None]
    if ranked:
        leader = max(set(ranked), key=lambda a: (ranked.count(a), -answers.index(a)))
        assert leader_confidence(answers + [leader]) >= conf
