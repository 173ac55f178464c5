"""Stopping rules for spending a per-request compute budget adaptively (pure Python).

A policy is a small state machine the ingress drives round by round:

    policy = make_policy("adaptive_consistency", limits, flops_of, confidence=0.95, round_size=4)
    while (plan := policy.next_round()) is not None:
        samples = <run one engine request: n=plan.n, max_tokens=plan.max_tokens, greedy=plan.greedy>
        policy.observe(samples)
    outcome = policy.outcome()   # which sample to return, answer, confidence, stopped_early, ...

No Ray, no vLLM, no clock and no global randomness: given the same samples a policy makes
the same decisions, so every rule is unit-tested on hand-worked cases.

Budgets are never exceeded, by construction: before each round `plan_round` sizes it for
the worst case (every sample runs to its max_tokens), so whatever the engine returns, the
samples, the summed completion tokens and the FLOPs (computed by the caller's `flops_of`,
which must not decrease when a sample gets longer) stay within the limits.

Strategies
- adaptive_consistency (Aggarwal et al. 2023): rounds of `round_size` samples; stop once
  the posterior probability that the leading answer stays the leader reaches `confidence`
  ("beta": exact, from the leader's and runner-up's counts; "dirichlet": all answers, a
  seeded Monte Carlo), or when the last `window` samples all agree.
- best_of_n: rounds of samples scored by their mean token log-probability; stop once the
  best sample's geometric-mean token probability, exp(mean logprob), reaches `confidence`.
- cascade: one greedy decode first; if its exp(mean logprob) is below `confidence` (tau),
  escalate to adaptive_consistency with what is left of the budget.
- auto: one sampled probe; its exp(mean logprob) says how hard the prompt is. Easy
  (>= confidence): stop at one sample. Harder: a sample cap and round size that grow with
  the difficulty, then the adaptive_consistency rule (the probe votes too).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

StopRule = Literal["beta", "dirichlet"]
# (completion tokens of every sample so far, prefill passes) -> FLOPs of the whole request.
FlopsFn = Callable[[list[int], int], float]

# Reasons a policy stops. The first group means it chose to spend less than it could.
EARLY_REASONS = frozenset({"confident", "window_agrees", "threshold", "greedy_confident", "easy", "allocation"})
BUDGET_REASONS = frozenset({"max_samples", "max_completion_tokens", "max_flops"})


@dataclass(frozen=True)
class Sample:
    """What a policy needs from one generated sample."""

    answer: str | None
    completion_tokens: int
    mean_logprob: float | None = None  # mean log-probability per generated token; None if not reported


@dataclass(frozen=True)
class Limits:
    """The request's budget. `max_tokens` is the per-sample ceiling the engine enforces."""

    max_samples: int
    max_tokens: int
    max_completion_tokens: int | None = None  # summed over all samples
    max_flops: float | None = None

    def __post_init__(self):
        if self.max_samples < 1 or self.max_tokens < 1:
            raise ValueError("Limits: max_samples and max_tokens must be >= 1")


@dataclass(frozen=True)
class RoundPlan:
    n: int
    max_tokens: int
    greedy: bool = False


@dataclass(frozen=True)
class Outcome:
    pick: int | None  # index (into all samples, in order) of the sample to return
    answer: str | None
    confidence: float
    stopped_early: bool
    reason: str
    samples: int
    completion_tokens: int
    rounds: int
    answer_counts: dict[str, int] = field(default_factory=dict)


# -- budget planning -------------------------------------------------------------------------------


def plan_round(wanted: int, completions: list[int], rounds: int, limits: Limits,
               flops_of: FlopsFn | None = None, greedy: bool = False) -> RoundPlan | str:
    """The largest round of at most `wanted` samples that cannot break any limit.

    Each sample is costed at its worst case (max_tokens). When not even one full-length
    sample fits the token or FLOP budget, one shorter sample is planned if at least one
    token fits. Returns the binding limit's name when nothing fits.
    """
    if limits.max_flops is not None and flops_of is None:
        raise ValueError("plan_round: max_flops needs a flops_of cost function")
    left = limits.max_samples - len(completions)
    if left <= 0:
        return "max_samples"
    n = min(wanted, left)
    spent_tokens = sum(completions)

    def fits(k: int, tokens: int) -> str | None:
        if limits.max_completion_tokens is not None and spent_tokens + k * tokens > limits.max_completion_tokens:
            return "max_completion_tokens"
        if (limits.max_flops is not None and flops_of is not None
                and flops_of(completions + [tokens] * k, rounds + 1) > limits.max_flops):
            return "max_flops"
        return None

    for k in range(n, 0, -1):
        if fits(k, limits.max_tokens) is None:
            return RoundPlan(k, limits.max_tokens, greedy)
    # Not even one full-length sample fits: plan one shorter sample, the longest that fits
    # (cost is monotone in its length), if a single token fits at all.
    binding = fits(1, limits.max_tokens)
    if fits(1, 1) is not None:
        return binding
    lo, hi = 1, limits.max_tokens - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(1, mid) is None:
            lo = mid
        else:
            hi = mid - 1
    return RoundPlan(1, lo, greedy)


# -- votes and the posterior confidence of the leading answer --------------------------------------


def ordered_counts(answers: list[str | None]) -> list[tuple[str, int]]:
    """(answer, count), most frequent first; ties in order of first appearance. None never counts."""
    counts = Counter(a for a in answers if a is not None)
    first = {}
    for i, a in enumerate(answers):
        if a is not None and a not in first:
            first[a] = i
    return sorted(counts.items(), key=lambda kv: (-kv[1], first[kv[0]]))


def majority_vote(answers: list[str | None]) -> tuple[str | None, float, dict[str, int]]:
    """(majority answer, its share of ALL samples, counts per answer): the fixed self_consistency vote.

    Samples without an answer count in the denominator but never win. Ties go to the
    answer that appeared first, so the result is deterministic for a given sample order.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0, {}
    first_seen = {a: i for i, a in reversed(list(enumerate(answers))) if a is not None}
    winner = max(counts, key=lambda a: (counts[a], -first_seen[a]))
    return winner, counts[winner] / len(answers), dict(counts)


def beta_leader_probability(leader: int, runner_up: int) -> float:
    """P(p_leader > p_runner_up) under a uniform prior, i.e. P(x > 1/2) for x ~ Beta(v1+1, v2+1).

    Exact: for integer parameters the Beta tail is a binomial sum,
    P(x > 1/2) = P(Binomial(v1 + v2 + 1, 1/2) <= v1).
    """
    n = leader + runner_up + 1
    return sum(math.comb(n, j) for j in range(leader + 1)) / 2**n


def dirichlet_leader_probability(counts: list[int], draws: int = 4000, seed: int = 0) -> float:
    """P(the leader's share is the largest) under Dirichlet(counts + 1, plus 1 for unseen answers).

    A Monte Carlo estimate with its own seeded generator: the same counts give the same value.
    """
    if not counts:
        return 0.0
    alphas = [c + 1 for c in counts] + [1]
    leader = max(range(len(counts)), key=lambda i: (counts[i], -i))
    rng = random.Random(seed)
    wins = 0
    for _ in range(draws):
        shares = [rng.gammavariate(a, 1.0) for a in alphas]
        wins += shares[leader] >= max(shares)
    return wins / draws


def leader_confidence(answers: list[str | None], rule: StopRule = "beta") -> float:
    ranked = ordered_counts(answers)
    if not ranked:
        return 0.0
    if rule == "beta":
        return beta_leader_probability(ranked[0][1], ranked[1][1] if len(ranked) > 1 else 0)
    if rule == "dirichlet":
        return dirichlet_leader_probability([c for _, c in ranked])
    raise ValueError(f"stop_rule: unknown rule {rule!r}; use 'beta' or 'dirichlet'")


def window_agrees(answers: list[str | None], window: int) -> bool:
    """The last `window` samples all gave the same (non-None) answer."""
    if window < 1 or len(answers) < window:
        return False
    tail = answers[-window:]
    return tail[0] is not None and all(a == tail[0] for a in tail)


def token_confidence(sample: Sample) -> float:
    """exp(mean token logprob): the geometric-mean probability of the sample's tokens (0 if unknown)."""
    if sample.mean_logprob is None or math.isnan(sample.mean_logprob):
        return 0.0
    return math.exp(min(sample.mean_logprob, 0.0))


# -- policies --------------------------------------------------------------------------------------


class Policy:
    """Shared bookkeeping: samples seen, rounds run, budget planning, the stop reason."""

    name = "policy"

    def __init__(self, limits: Limits, flops_of: FlopsFn | None = None, confidence: float = 0.95,
                 round_size: int = 4):
        if not 0.0 < confidence <= 1.0:
            raise ValueError("confidence must be in (0, 1]")
        if round_size < 1:
            raise ValueError("round_size must be >= 1")
        self.limits = limits
        self.flops_of = flops_of
        self.confidence = confidence
        self.round_size = round_size
        self.samples: list[Sample] = []
        self.rounds = 0
        self.reason: str | None = None
        self._pending: RoundPlan | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def _plan(self, wanted: int, greedy: bool = False) -> RoundPlan | None:
        plan = plan_round(wanted, [s.completion_tokens for s in self.samples], self.rounds,
                          self.limits, self.flops_of, greedy)
        if isinstance(plan, str):
            self.reason = plan
            return None
        self._pending = plan
        return plan

    def next_round(self) -> RoundPlan | None:
        if self.done:
            return None
        return self._plan(self._wanted(), self._greedy_next())

    def observe(self, samples: list[Sample]) -> None:
        if self._pending is None:
            raise RuntimeError("observe() without a planned round")
        plan, self._pending = self._pending, None
        if len(samples) > plan.n:
            raise ValueError(f"got {len(samples)} samples for a round of {plan.n}")
        self.samples.extend(samples)
        self.rounds += 1
        if not samples:  # the engine returned nothing: do not loop on it
            self.reason = "no_samples"
            return
        self.reason = self._decide(plan)

    # strategy hooks
    def _wanted(self) -> int:
        return self.round_size

    def _greedy_next(self) -> bool:
        return False

    def _decide(self, plan: RoundPlan) -> str | None:
        raise NotImplementedError

    def _pick(self) -> tuple[int | None, str | None, float, dict[str, int]]:
        raise NotImplementedError

    def budget_left(self) -> bool:
        """Whether one more sample (of at least one token) would still fit every limit."""
        more = plan_round(1, [s.completion_tokens for s in self.samples], self.rounds, self.limits, self.flops_of)
        return isinstance(more, RoundPlan)

    def outcome(self) -> Outcome:
        pick, answer, confidence, counts = self._pick()
        reason = self.reason or "unfinished"
        return Outcome(
            pick=pick, answer=answer, confidence=confidence,
            # early = the rule stopped it while budget was left (not just at the last sample)
            stopped_early=reason in EARLY_REASONS and self.budget_left(), reason=reason,
            samples=len(self.samples), completion_tokens=sum(s.completion_tokens for s in self.samples),
            rounds=self.rounds, answer_counts=counts,
        )


class AdaptiveConsistency(Policy):
    """Majority vote in rounds; stop when the leader's posterior reaches `confidence`."""

    name = "adaptive_consistency"

    def __init__(self, limits: Limits, flops_of: FlopsFn | None = None, confidence: float = 0.95,
                 round_size: int = 4, window: int = 0, rule: StopRule = "beta"):
        super().__init__(limits, flops_of, confidence, round_size)
        if window < 0:
            raise ValueError("window must be >= 0")
        self.window = window
        self.rule = rule
        self.first_voter = 0  # samples before this index do not vote (cascade's greedy decode)
        self.sample_cap = limits.max_samples  # auto lowers this for easier prompts

    def _voters(self) -> list[str | None]:
        return [s.answer for s in self.samples[self.first_voter:]]

    def _wanted(self) -> int:
        return max(1, min(self.round_size, self.sample_cap - len(self.samples)))

    def _decide(self, plan: RoundPlan) -> str | None:
        votes = self._voters()
        if leader_confidence(votes, self.rule) >= self.confidence:
            return "confident"
        if window_agrees(votes, self.window):
            return "window_agrees"
        if len(self.samples) >= self.sample_cap and self.sample_cap < self.limits.max_samples:
            return "allocation"
        return None

    def _pick(self):
        votes = self._voters()
        ranked = ordered_counts(votes)
        if not ranked:
            return (len(self.samples) - 1 if self.samples else None), None, 0.0, {}
        winner = ranked[0][0]
        return (self.first_voter + votes.index(winner), winner,
                leader_confidence(votes, self.rule), dict(ranked))


class SelfConsistency(AdaptiveConsistency):
    """Fixed-budget majority vote (never stops early): the baseline adaptive is compared with."""

    name = "self_consistency"

    def _wanted(self) -> int:
        return self.limits.max_samples

    def _decide(self, plan: RoundPlan) -> str | None:
        return None


class BestOfN(Policy):
    """Rounds of samples; return the one with the best mean token logprob; stop once it clears the bar."""

    name = "best_of_n"

    def _score(self, sample: Sample) -> float:
        return token_confidence(sample)

    def _decide(self, plan: RoundPlan) -> str | None:
        return "threshold" if max(self._score(s) for s in self.samples) >= self.confidence else None

    def _pick(self):
        if not self.samples:
            return None, None, 0.0, {}
        best = max(range(len(self.samples)), key=lambda i: (self._score(self.samples[i]), -i))
        counts = dict(ordered_counts([s.answer for s in self.samples]))
        return best, self.samples[best].answer, self._score(self.samples[best]), counts


class Cascade(AdaptiveConsistency):
    """Greedy first; escalate to adaptive_consistency sampling only when its confidence < tau."""

    name = "cascade"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.escalated = False

    def _greedy_next(self) -> bool:
        return self.rounds == 0

    def _wanted(self) -> int:
        return 1 if self.rounds == 0 else super()._wanted()

    def _decide(self, plan: RoundPlan) -> str | None:
        if plan.greedy:
            if token_confidence(self.samples[0]) >= self.confidence and self.samples[0].answer is not None:
                return "greedy_confident"
            # The greedy decode is not a random draw, so it does not vote.
            self.escalated = True
            self.first_voter = len(self.samples)
            return None
        return super()._decide(plan)

    def _pick(self):
        if self.escalated and any(a is not None for a in self._voters()):
            return super()._pick()
        if not self.samples:
            return None, None, 0.0, {}
        greedy = self.samples[0]
        return 0, greedy.answer, token_confidence(greedy), dict(ordered_counts([greedy.answer]))


class Auto(AdaptiveConsistency):
    """One sampled probe; its token confidence sets how many more samples the prompt gets."""

    name = "auto"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.difficulty: float | None = None

    def _wanted(self) -> int:
        return 1 if self.rounds == 0 else super()._wanted()

    def _decide(self, plan: RoundPlan) -> str | None:
        if self.rounds == 1:
            probe = self.samples[0]
            signal = token_confidence(probe) if probe.answer is not None else 0.0
            if signal >= self.confidence:
                return "easy"
            # difficulty in (0, 1]: 0 = as confident as asked, 1 = no signal at all
            self.difficulty = (self.confidence - signal) / self.confidence
            extra = self.limits.max_samples - 1
            self.sample_cap = 1 + math.ceil(self.difficulty * extra)
            self.round_size = max(1, math.ceil(self.difficulty * self.round_size))
            if self.sample_cap <= 1:
                return "allocation"
            return None
        return super()._decide(plan)


POLICIES = {p.name: p for p in (AdaptiveConsistency, SelfConsistency, BestOfN, Cascade, Auto)}


def make_policy(strategy: str, limits: Limits, flops_of: FlopsFn | None = None, *, confidence: float = 0.95,
                round_size: int = 4, window: int = 0, rule: StopRule = "beta") -> Policy:
    if strategy not in POLICIES:
        raise ValueError(f"strategy: no stopping policy for {strategy!r}; use one of {sorted(POLICIES)}")
    cls = POLICIES[strategy]
    if issubclass(cls, AdaptiveConsistency):
        return cls(limits, flops_of, confidence, round_size, window=window, rule=rule)
    return cls(limits, flops_of, confidence, round_size)


def run_policy(policy: Policy, draw: Callable[[RoundPlan], list[Sample]]) -> Outcome:
    """Drive a policy with a synchronous sampler (tests, benchmarks on recorded samples)."""
    while (plan := policy.next_round()) is not None:
        policy.observe(draw(plan))
    return policy.outcome()
