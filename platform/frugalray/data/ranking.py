"""Pure row ranking and budget packing: which scored rows a selection keeps, and why the rest go.

No files, no Ray, no model: `select` (the recipe) and `auto_select` (the proxy experiment)
both call `select_rows`, and the unit tests call it directly.

Strategies (`rank_rows`):
- `lowest`: lowest score first. With perplexity under a reference model, this keeps the
  most typical rows and drops the surprising ones, which is where garbled text, wrong
  answers and other noise land (Marion 2023; Sorscher 2022: keep easy rows at small budgets).
- `highest`: highest score first (the hardest rows; for large budgets on clean data).
- `random`: a seeded random subset, the baseline every strategy must beat.
- `middle`: the band around the median score, taken outward from it (drops both tails:
  the trivially easy and the noisy-hard rows).
- `stratified`: coverage-centric (Zheng 2023): the scored rows are cut into `strata`
  quantile bins and taken round-robin, randomly (seeded) within each bin, so every part of
  the score range is kept in equal measure (a bin that runs out leaves its share to the others).
- `weighted`: weighted rank of several scores: each score in `weights` becomes its
  percentile rank (0..1, ascending), and rows are taken by the lowest sum of weight x rank.
  A positive weight prefers low values of that score, a negative weight high ones.

Every strategy is an ordering of the eligible rows; the budget then takes a prefix of it
(`pack_by_preference`: a row limit and/or a 0/1 knapsack over token lengths). Rows with a
non-finite score are never kept. Every dropped row has a reason (`DropReason`):
`unscorable`, `degenerate` / `garbage` / `wrong_answer` (`filter_reasons`), `duplicate`
(dedup kept another row of its cluster) or `budget` (ranked outside the budget).
`curriculum_order` writes kept rows easy -> hard.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

Strategy = Literal["lowest", "highest", "random", "middle", "stratified", "weighted"]
DropReason = Literal["unscorable", "degenerate", "garbage", "wrong_answer", "duplicate", "budget"]


@dataclass
class Selection:
    """What `select_rows` decided: the kept rows in rank order, the dropped ones with their reasons."""

    kept: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    unscored: int  # rows never eligible: a missing or non-finite score
    kept_tokens: int
    drop_reasons: list[str] | None = None  # parallel to `dropped`

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(self.drop_reasons or []))


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is finite (not NaN or inf); False for bool, None, strings."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _percentile_ranks(values: list[float]) -> list[float]:
    """Ascending rank of each value scaled to 0..1 (ties share their mean rank)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    pos = 0
    while pos < len(order):
        end = pos
        while end + 1 < len(order) and values[order[end + 1]] == values[order[pos]]:
            end += 1
        for k in range(pos, end + 1):
            ranks[order[k]] = (pos + end) / 2
        pos = end + 1
    scale = max(1, len(values) - 1)
    return [r / scale for r in ranks]


def rank_rows(
    rows: list[dict[str, Any]],
    score: str = "perplexity",
    strategy: Strategy = "lowest",
    seed: int = 0,
    strata: int = 5,
    weights: dict[str, float] | None = None,
) -> tuple[list[int], list[int]]:
    """(eligible row indices in the order the strategy prefers them, ineligible indices)."""
    scores = list(weights) if strategy == "weighted" else [score]
    # A random baseline needs no score, but draws from the same pool: rows whose score is
    # present and non-finite (unscorable) are excluded for every strategy.
    eligible = [
        i for i, r in enumerate(rows)
        if all(is_finite_number(r.get(s)) or (strategy == "random" and s not in r) for s in scores)
    ]
    eligible_set = set(eligible)
    ineligible = [i for i in range(len(rows)) if i not in eligible_set]
    rng = random.Random(seed)
    if strategy == "random":
        rng.shuffle(eligible)
    elif strategy in ("lowest", "highest"):
        sign = 1 if strategy == "lowest" else -1
        eligible.sort(key=lambda i: (sign * rows[i][score], i))  # index breaks ties: stable and deterministic
    elif strategy == "middle":
        ordered = sorted(eligible, key=lambda i: (rows[i][score], i))
        center = (len(ordered) - 1) / 2
        eligible = [ordered[k] for k in sorted(range(len(ordered)), key=lambda k: (abs(k - center), k))]
    elif strategy == "stratified":
        ordered = sorted(eligible, key=lambda i: (rows[i][score], i))
        bins = [ordered[b * len(ordered) // strata : (b + 1) * len(ordered) // strata] for b in range(strata)]
        for members in bins:
            rng.shuffle(members)
        eligible = [members[k] for k in range(max(map(len, bins), default=0)) for members in bins if k < len(members)]
    elif strategy == "weighted":
        assert weights, "weights: required by the weighted strategy"
        total = [0.0] * len(eligible)
        for column, weight in weights.items():
            for k, rank in enumerate(_percentile_ranks([rows[i][column] for i in eligible])):
                total[k] += weight * rank
        eligible = [eligible[k] for k in sorted(range(len(eligible)), key=lambda k: (total[k], eligible[k]))]
    else:
        raise ValueError(f"strategy: unknown {strategy!r}; use one of {Strategy.__args__}")
    return eligible, ineligible


# Most cells of the exact-fill table (candidates x capacity) `pack_by_preference` builds.
_PACK_CELLS = 20_000_000


def pack_by_preference(
    sizes: list[int], capacity: int | None, max_items: int | None = None, window: int = 4096
) -> list[int]:
    """0/1 knapsack over lengths, items given in preference order: the positions to keep.

    1. Take items in order while they fit (the best-ranked prefix is always kept).
    2. Pack the capacity left exactly: a subset-sum over the next `window` items that fills
       it best; among equal fills the better-ranked items win.
    3. Add any later item that still fits (first fit).
    Never more than `capacity` in total or `max_items` items; at the end no unkept item fits
    in what is left (unless `max_items` is reached).
    """
    import numpy as np

    n = len(sizes)
    limit_items = n if max_items is None else max(0, min(n, max_items))
    if capacity is None:
        return list(range(limit_items))
    kept: list[int] = []
    used = 0
    k = 0
    while k < n and len(kept) < limit_items and used + sizes[k] <= capacity:
        kept.append(k)
        used += sizes[k]
        k += 1
    if k == n or len(kept) == limit_items:
        return kept
    left = capacity - used
    slots = limit_items - len(kept)
    window = max(1, min(window, _PACK_CELLS // (left + 1)))
    candidates = [j for j in range(k, min(n, k + window)) if sizes[j] <= left]
    beyond = list(range(min(n, k + window), n))
    if candidates and left > 0:
        m = len(candidates)
        best = np.full(left + 1, -np.inf)
        best[0] = 0.0
        took = np.zeros((m, left + 1), dtype=bool)
        for pos, j in enumerate(candidates):
            size = sizes[j]
            # Fill dominates (integer tokens); the bonus (< 0.5 summed over all items) breaks
            # ties towards better-ranked items.
            value = size + (m - pos) / (m * (m + 1.0))
            shifted = np.full(left + 1, -np.inf)
            shifted[size:] = best[: left + 1 - size] + value
            better = shifted > best
            took[pos] = better
            best = np.where(better, shifted, best)
        cell = int(np.argmax(best))
        chosen = []
        for pos in range(m - 1, -1, -1):
            if took[pos, cell]:
                chosen.append(candidates[pos])
                cell -= sizes[candidates[pos]]
        chosen.reverse()
        if len(chosen) > slots:  # too many items for the row limit: first fit instead
            beyond = candidates + beyond
        else:
            kept += chosen
            used += sum(sizes[j] for j in chosen)
            slots -= len(chosen)
    else:
        beyond = candidates + beyond
    for j in beyond:
        if slots == 0:
            break
        if used + sizes[j] <= capacity:
            kept.append(j)
            used += sizes[j]
            slots -= 1
    return sorted(kept)


def filter_reasons(
    rows: list[dict[str, Any]], drop_degenerate: bool = False, max_garbage_ratio: float | None = None,
    drop_wrong_answer: bool = False,
) -> dict[int, str]:
    """Rows removed before ranking by the heuristics and verifier scorers' columns: {row index: reason}.

    A row several filters catch gets the first reason of degenerate, garbage, wrong_answer."""
    reasons: dict[int, str] = {}
    for i, row in enumerate(rows):
        if drop_degenerate and row.get("degenerate_reason"):
            reasons[i] = "degenerate"
        elif (max_garbage_ratio is not None and is_finite_number(row.get("garbage_ratio"))
              and row["garbage_ratio"] > max_garbage_ratio):
            reasons[i] = "garbage"
        elif drop_wrong_answer and is_finite_number(row.get("answer_correct")) and row["answer_correct"] == 0:
            reasons[i] = "wrong_answer"  # null / NaN: no reference answer, nothing to judge
    return reasons


def select_rows(
    rows: list[dict[str, Any]],
    score: str = "perplexity",
    strategy: Strategy = "lowest",
    keep_fraction: float | None = None,
    token_budget: int | None = None,
    seed: int = 0,
    token_column: str = "n_tokens",
    *,
    strata: int = 5,
    weights: dict[str, float] | None = None,
    cluster_column: str | None = None,
    token_cap: int | None = None,
    excluded: dict[int, str] | None = None,
) -> Selection:
    """Split rows into kept and dropped; pure, so it is tested without data files or Ray.

    `keep_fraction` keeps at most round(f * len(rows)) rows (fewer if fewer are eligible).
    `token_budget` keeps rows whose `token_column` total fits (`pack_by_preference`); with
    `token_cap` a row counts min(tokens, token_cap) (what training reads after truncation).
    Both may be set; both are respected. `cluster_column` (dedup) keeps at most one row per
    value of that column. `excluded` ({row index: reason}) removes rows before ranking.
    """
    if keep_fraction is None and token_budget is None:
        raise ValueError("keep_fraction, token_budget: set at least one of them")
    eligible, ineligible = rank_rows(rows, score, strategy, seed, strata, weights)
    reasons: dict[int, str] = dict.fromkeys(ineligible, "unscorable")
    if excluded:
        for i, why in excluded.items():
            reasons.setdefault(i, why)
        eligible = [i for i in eligible if i not in excluded]
    if cluster_column is not None:
        seen: set = set()
        unique = []
        for i in eligible:
            cluster = rows[i].get(cluster_column)
            if cluster is not None and cluster in seen:
                reasons[i] = "duplicate"
                continue
            seen.add(cluster)
            unique.append(i)
        eligible = unique

    def cost(i: int) -> int:
        n = max(0, int(rows[i].get(token_column) or 0))
        return min(n, token_cap) if token_cap is not None else n

    sizes = [cost(i) for i in eligible]
    max_items = round(keep_fraction * len(rows)) if keep_fraction is not None else None
    keep = [eligible[k] for k in pack_by_preference(sizes, token_budget, max_items)]
    kept_tokens = sum(cost(i) for i in keep)
    kept_set = set(keep)
    dropped = [i for i in range(len(rows)) if i not in kept_set]
    return Selection(
        kept=[rows[i] for i in keep],
        dropped=[rows[i] for i in dropped],
        unscored=len(ineligible),
        kept_tokens=kept_tokens,
        drop_reasons=[reasons.get(i, "budget") for i in dropped],
    )


def curriculum_order(rows: list[dict[str, Any]], score: str) -> list[dict[str, Any]]:
    """Kept rows easy -> hard (ascending score; rows without a finite score last), ranked 0..n-1."""
    def key(i: int) -> tuple[bool, float, int]:
        value = rows[i].get(score)
        finite = is_finite_number(value)
        return (not finite, value if finite else 0, i)

    order = sorted(range(len(rows)), key=key)
    return [{**rows[i], "curriculum_rank": rank} for rank, i in enumerate(order)]
