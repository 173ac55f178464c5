"""Paired comparisons of two models on the same questions (pure; no numpy needed).

`paired_difference(after, before)` takes per-question correctness of two models on the same
questions and returns the mean difference with a 95% interval from the per-question differences
(normal approximation, as in a paired t-test at these sizes): asking both models the same
questions removes the questions' own difficulty from the noise, so a smaller gain is resolved
than with two independent samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z_95 = 1.959964


@dataclass(frozen=True)
class PairedDifference:
    n: int
    mean_a: float
    mean_b: float
    diff: float  # mean_a - mean_b
    ci_low: float
    ci_high: float
    a_only: int  # questions only `a` got right
    b_only: int  # questions only `b` got right

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def describe(self, unit: str = "points") -> str:
        scale = 100.0 if unit == "points" else 1.0
        return (f"{self.diff * scale:+.1f} {unit} (95% CI {self.ci_low * scale:+.1f} to {self.ci_high * scale:+.1f}, "
                f"n={self.n} paired; {self.a_only} gained, {self.b_only} lost)")


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Mean of a_i - b_i with a 95% interval; `a` and `b` score the same questions in the same order."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("paired scores: no questions")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = Z_95 * math.sqrt(var / n)
    return PairedDifference(
        n=n, mean_a=sum(map(float, a)) / n, mean_b=sum(map(float, b)) / n, diff=mean,
        ci_low=mean - half, ci_high=mean + half,
        a_only=sum(d > 0 for d in diffs), b_only=sum(d < 0 for d in diffs),
    )
