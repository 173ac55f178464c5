"""Keep a fraction of the rows, or a token budget's worth, ranked by a score column.

Strategies:
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

Every strategy is an ordering of the eligible rows; the budget then takes a prefix of it.
`dedup: true` (with the `duplicates` scorer's `dup_cluster` column) keeps at most one row
per duplicate cluster: its best-ranked one. `curriculum: <score>` writes the kept rows in
ascending order of that score (easy -> hard) with a `curriculum_rank` column; without it
the kept rows are written in rank order.

Every dropped row has a reason: `unscorable` (no finite score), `degenerate` / `garbage` /
`wrong_answer` (a filter below), `duplicate` (another row of its cluster was kept) or
`budget` (ranked outside the budget). The report counts them,
shows a few examples of each, and draws a histogram per score column (PNG, all rows vs
kept). Nothing is lost: with the scoring sidecar next to the input, the job checks that
the rows scoring read equal kept + dropped + quarantined.

Budgets (any combination; every one set is respected, none is ever exceeded):
- `keep_fraction`: at most round(f * rows) rows;
- `token_budget`: a 0/1 knapsack over example lengths (`pack_by_preference`): rows are
  taken in rank order while they fit, then the capacity that is left is packed exactly
  (a subset-sum over the next-ranked rows that fills it best, ties to the better-ranked
  rows), then any row further down that still fits is added. The best-ranked prefix is
  always kept, and no dropped eligible row fits in what is left;
- `budget: {flops, epochs, ...}`: the FLOP budget of the training that follows, turned into
  a token budget through `budget.flops.train_flops_per_token` for the configured model,
  method, LoRA rank and seq_len (the per-token cost at the full seq_len, an upper bound of
  what a padded batch costs). A row then costs min(n_tokens, seq_len) tokens, what training
  reads of it after truncation, so epochs x kept tokens x per-token FLOPs <= flops.
Rows with a non-finite score (e.g. a response truncated away while scoring) are never kept.

Filters before ranking, each a drop reason of its own: `drop_degenerate` (the heuristics
scorer's `degenerate_reason` is set: empty, repetitive, copies the prompt),
`max_garbage_ratio` (character-level garbage above the threshold) and `drop_wrong_answer`
(the verifier scorer's `answer_correct` is 0: the response does not state the row's reference
answer; rows without a reference, `answer_correct` null, are not judged and stay).

`strategy: auto` runs a small proxy experiment (`frugalray.data.auto_select`): each candidate
strategy selects under the same budget, a tiny LoRA fine-tune trains on each subset, and the
one with the best held-out loss (or accuracy) is used; the report shows the table and why.

The kept rows go to a JSONL file that training reads with
`FieldMapping.prompt_response()` (prompt / response columns); a report JSON next to it
records the counts, the score thresholds and, when the data carries `noise_kind` labels
(generated data does), how many rows of each noise kind were dropped. A Markdown version of
the report (`<output>.report.md`) shows the same with a few rows of each removal reason.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from frugalray.budget.flops import ModelShape, train_flops_per_token
from frugalray.config import ConfigError, StrictModel
from frugalray.data.auto_select import AutoSettings
from frugalray.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

Strategy = Literal["lowest", "highest", "random", "middle", "stratified", "weighted"]
SelectStrategy = Literal["lowest", "highest", "random", "middle", "stratified", "weighted", "auto"]
DropReason = Literal["unscorable", "degenerate", "garbage", "wrong_answer", "duplicate", "budget"]
# Numeric columns `score` may write; the report draws a histogram of each one present.
HISTOGRAM_COLUMNS = (
    "perplexity", "mean_nll", "ifd", "grand", "n_tokens", "garbage_ratio", "repetition_ratio", "response_chars",
)


class FlopBudget(StrictModel):
    """The FLOP budget of the training that follows selection, in that training's terms.

    Defaults match `FinetuneConfig`'s (QLoRA, rank 8, all linear layers, seq_len 128).
    """

    flops: float = Field(gt=0, description="training FLOPs the selected data may cost (all epochs)")
    epochs: float = Field(default=1.0, gt=0, description="passes over the selected data")
    model: str = Field(default=DEFAULT_MODEL, description="the model that will be trained: alias, local dir or HF id")
    method: Literal["full", "lora", "qlora"] = "qlora"
    lora_rank: int = Field(default=8, ge=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    seq_len: int = Field(default=128, ge=8, description="training truncates rows to this many tokens")
    gradient_checkpointing: bool = False


def flop_budget_tokens(budget: FlopBudget, shape: ModelShape) -> tuple[int, float]:
    """(tokens the budget pays for over all epochs, training FLOPs per token) for a model shape.

    The per-token cost is taken at the full seq_len: a padded batch is never wider, so the
    real cost of the kept tokens stays within `budget.flops`.
    """
    lora = 0 if budget.method == "full" else shape.lora_params(budget.lora_rank, budget.target_modules)
    per_token = train_flops_per_token(shape, budget.seq_len, budget.method, lora, budget.gradient_checkpointing)
    return math.floor(budget.flops / (budget.epochs * per_token)), per_token


class SelectConfig(StrictModel):
    input_path: str = Field(description="scored data: the Parquet directory `score` wrote (or .jsonl/.parquet)")
    output_path: str = Field(description=".jsonl file of the kept rows")
    score: str = Field(default="perplexity", description="column to rank by")
    strategy: SelectStrategy = "lowest"
    keep_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    token_budget: int | None = Field(default=None, ge=1, description="most tokens (token_column) to keep")
    token_column: str = "n_tokens"
    budget: FlopBudget | None = Field(
        default=None, description="FLOP budget of the training that follows, converted to a token budget"
    )
    drop_degenerate: bool = Field(
        default=False, description="drop rows the heuristics scorer flags (degenerate_reason: empty, repetitive, ...)"
    )
    max_garbage_ratio: float | None = Field(
        default=None, ge=0.0, le=1.0, description="drop rows whose garbage_ratio (heuristics scorer) is above this"
    )
    drop_wrong_answer: bool = Field(
        default=False,
        description="drop rows whose response does not state the reference answer (verifier scorer: answer_correct == 0)",
    )
    seed: int = 0
    strata: int = Field(default=5, ge=1, description="quantile bins of the stratified strategy")
    weights: dict[str, float] | None = Field(
        default=None, description="weighted strategy: score column -> weight (>0 prefers low, <0 high)"
    )
    dedup: bool = Field(default=False, description="keep at most one row per duplicate cluster (cluster_column)")
    cluster_column: str = "dup_cluster"
    curriculum: str | None = Field(default=None, description="score column to order the kept rows by, easy -> hard")
    histograms: bool = Field(default=True, description="write a PNG histogram per score column next to the report")
    auto: AutoSettings = Field(
        default_factory=lambda: AutoSettings(), description="strategy: auto: the proxy experiment's candidates and size"
    )

    @model_validator(mode="after")
    def _weights_for_weighted(self) -> SelectConfig:
        if self.strategy == "weighted" and not self.weights:
            raise ValueError("weights: the weighted strategy needs {score column: weight}, e.g. {perplexity: 1, ifd: -1}")
        if self.weights and any(w == 0 for w in self.weights.values()):
            raise ValueError("weights: a weight of 0 has no effect; remove that column or give it a nonzero weight")
        return self

    @model_validator(mode="after")
    def _at_least_one_limit(self) -> SelectConfig:
        if self.keep_fraction is None and self.token_budget is None and self.budget is None:
            raise ValueError(
                "keep_fraction, token_budget, budget: set at least one "
                "(keep_fraction: 0 < f <= 1 of the rows; token_budget: most tokens to keep; "
                "budget: {flops: X, epochs: E} of the training that follows); every one set is respected"
            )
        return self


class SelectResult(BaseModel):
    rows_in: int
    kept: int
    dropped: int
    kept_tokens: int
    output_path: str
    report_path: str
    quarantined: int = 0
    source_rows_in: int | None = None  # rows the scoring stage read (kept + dropped + quarantined)
    drop_reasons: dict[str, int] = Field(default_factory=dict)
    histogram_paths: list[str] = Field(default_factory=list)
    token_limit: int | None = None  # the token budget applied (token_budget and/or the FLOP budget's tokens)
    train_flops: float | None = None  # with a FLOP budget: what training on the kept tokens costs (<= budget.flops)
    strategy: str = "lowest"  # the strategy used (auto: the winner)
    score: str = "perplexity"  # the score column used (auto: the winner's)
    auto_flops: float = 0.0  # FLOPs the auto strategy's proxy experiment spent
    markdown_report_path: str | None = None


@dataclass
class Selection:
    kept: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    unscored: int  # rows never eligible: a missing or non-finite score
    kept_tokens: int
    drop_reasons: list[str] | None = None  # parallel to `dropped`

    def reason_counts(self) -> dict[str, int]:
        return dict(Counter(self.drop_reasons or []))


def _finite(value: Any) -> bool:
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
        if all(_finite(r.get(s)) or (strategy == "random" and s not in r) for s in scores)
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
        elif max_garbage_ratio is not None and _finite(row.get("garbage_ratio")) and row["garbage_ratio"] > max_garbage_ratio:
            reasons[i] = "garbage"
        elif drop_wrong_answer and _finite(row.get("answer_correct")) and row["answer_correct"] == 0:
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
    order = sorted(range(len(rows)), key=lambda i: (not _finite(rows[i].get(score)), rows[i].get(score) if _finite(rows[i].get(score)) else 0, i))
    return [{**rows[i], "curriculum_rank": rank} for rank, i in enumerate(order)]


def _score_range(rows: list[dict], score: str) -> dict[str, float | None]:
    values = [r[score] for r in rows if _finite(r.get(score))]
    return {"min": min(values) if values else None, "max": max(values) if values else None}


def _drop_examples(selection: Selection, scores: list[str], per_reason: int = 3) -> dict[str, list[dict]]:
    examples: dict[str, list[dict]] = {}
    for row, reason in zip(selection.dropped, selection.drop_reasons or []):
        bucket = examples.setdefault(reason, [])
        if len(bucket) < per_reason:
            shown = {"id": row.get("id"), "prompt": str(row.get("prompt", ""))[:200], "response": str(row.get("response", ""))[:200]}
            shown.update({s: row.get(s) for s in dict.fromkeys([*scores, "dup_cluster", "noise_kind"]) if s in row})
            bucket.append(shown)
    return examples


def write_histograms(rows: list[dict], kept: list[dict], columns: list[str], stem: Path) -> list[str]:
    """One PNG per numeric score column: every scored row vs the kept ones."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    paths = []
    for column in columns:
        values = [r[column] for r in rows if _finite(r.get(column))]
        if not values:
            continue
        kept_values = [r[column] for r in kept if _finite(r.get(column))]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bins = min(40, max(5, len(set(values))))
        ax.hist(values, bins=bins, alpha=0.5, label=f"all ({len(values)})")
        ax.hist(kept_values, bins=bins, range=(min(values), max(values)), alpha=0.7, label=f"kept ({len(kept_values)})")
        ax.set_xlabel(column)
        ax.set_ylabel("rows")
        ax.legend()
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_hist_{column}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(str(path))
    return paths


def scoring_accounting(input_path: str) -> tuple[int | None, int]:
    """(rows the scoring stage read, rows it quarantined) from the sidecar next to its output.

    (None, 0) when the input was not written by `score` (no sidecar): nothing to check against.
    """
    sidecar = Path(str(input_path).rstrip("/") + "_scores.json")
    if not sidecar.is_file():
        return None, 0
    meta = json.loads(sidecar.read_text())
    return int(meta["rows_in"]), int(meta["rows_quarantined"])


def selection_report(
    rows: list[dict], selection: Selection, cfg: SelectConfig, strategy: str | None = None, score: str | None = None,
    weights: dict[str, float] | None = None,
) -> dict[str, Any]:
    score = score or cfg.score
    weights = weights if weights is not None else cfg.weights
    report: dict[str, Any] = {
        "rows_in": len(rows),
        "kept": len(selection.kept),
        "dropped": len(selection.dropped),
        "unscored_dropped": selection.unscored,
        "kept_tokens": selection.kept_tokens,
        "score": score,
        "strategy": strategy or cfg.strategy,
        "configured_strategy": cfg.strategy,
        "keep_fraction": cfg.keep_fraction,
        "token_budget": cfg.token_budget,
        "kept_score": _score_range(selection.kept, score),
        "dropped_score": _score_range(selection.dropped, score),
        "dedup": cfg.dedup,
        "drop_degenerate": cfg.drop_degenerate,
        "max_garbage_ratio": cfg.max_garbage_ratio,
        "drop_wrong_answer": cfg.drop_wrong_answer,
        "weights": weights,
        "curriculum": cfg.curriculum,
        "drop_reasons": selection.reason_counts(),
        "drop_examples": _drop_examples(
            selection, [score, *(weights or {}), "garbage_ratio", "degenerate_reason", "answer_correct", "n_tokens"]
        ),
    }
    if any("noise_kind" in r for r in rows):
        total = Counter(r.get("noise_kind", "none") for r in rows)
        dropped = Counter(r.get("noise_kind", "none") for r in selection.dropped)
        report["noise"] = {
            kind: {"in": total[kind], "dropped": dropped.get(kind, 0), "kept": total[kind] - dropped.get(kind, 0)}
            for kind in sorted(total)
        }
        noisy_in = sum(n for k, n in total.items() if k != "none")
        noisy_dropped = sum(n for k, n in dropped.items() if k != "none")
        report["noisy_dropped_fraction"] = noisy_dropped / noisy_in if noisy_in else None
    return report


def _md_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown: counts, budgets, removal reasons with example rows, auto's table."""
    lines = [f"# Selection report: {report['strategy']} {report['score'] if report['strategy'] != 'random' else ''}", ""]
    source = report.get("source_rows_in")
    lines += [
        (f"- rows in: {source if source is not None else report['rows_in']}"
         f" = kept {report['kept']} + dropped {report['dropped']} + quarantined {report.get('quarantined', 0)}"),
        f"- kept tokens: {report['kept_tokens']}",
    ]
    for key in ("keep_fraction", "token_budget", "token_limit", "flop_budget", "train_flops"):
        if report.get(key) is not None:
            lines.append(f"- {key}: {_md_cell(report[key])}")
    lines += ["", "## Removed, and why", "", "| reason | rows |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in sorted(report["drop_reasons"].items())]
    for reason, examples in report["drop_examples"].items():
        lines += ["", f"### {reason}: examples", ""]
        columns = list(dict.fromkeys(k for ex in examples for k in ex))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_md_cell(ex.get(c))[:80] for c in columns) + " |" for ex in examples]
    if "noise" in report:
        lines += ["", "## Labelled noise", "", "| noise kind | in | dropped | kept |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['in']} | {v['dropped']} | {v['kept']} |" for k, v in report["noise"].items()]
    auto = report.get("auto")
    if auto:
        lines += ["", "## strategy: auto", "", f"Winner: **{auto['winner']}**. {auto['why']}.", "",
                  f"Held-out: {auto['heldout_source']} ({auto['heldout_rows']} rows); proxy FLOPs {auto['flops']:.3e}.", "",
                  "| candidate | kept | kept tokens | steps | train FLOPs | eval loss | accuracy | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in auto["candidates"]:
            lines.append(
                f"| {c['name']} | {c['kept']} | {c['kept_tokens']} | {c['steps']} | {c['train_flops']:.3e} | "
                f"{_md_cell(c['eval_loss'])} | {_md_cell(c['accuracy'])} | {c['skipped'] or ''} |"
            )
    if report.get("histograms"):
        lines += ["", "## Histograms (all rows vs kept)", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in report["histograms"]]
    return "\n".join(lines) + "\n"


def _read_scored(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow.parquet as pq

    from frugalray.examples.loaders import read_rows

    p = Path(path)
    if not p.exists():
        raise ConfigError([f"input_path: '{p}' does not exist; run `score` first or point at its output_path"])
    if p.is_dir() or p.suffix == ".parquet":
        table = pq.read_table(p)
        return table.to_pylist(), table.column_names
    rows = read_rows(p)
    bad = [r for r in rows if not isinstance(r, dict)]
    if bad:
        raise ConfigError([f"input_path: '{p}' has {len(bad)} unreadable record(s), first: {bad[0].reason}"])
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    return rows, list(columns)


def _check_columns(cfg: SelectConfig, columns: list[str]) -> None:
    problems = []
    listed = ", ".join(columns)
    if cfg.strategy not in ("random", "weighted", "auto") and cfg.score not in columns:
        problems.append(f"score: column '{cfg.score}' not in '{cfg.input_path}' (columns: {listed}); set score to one of them")
    if (cfg.token_budget is not None or cfg.budget is not None) and cfg.token_column not in columns:
        problems.append(
            f"token_column: column '{cfg.token_column}' not in '{cfg.input_path}' (columns: {listed}); "
            "score the data first or set token_column"
        )
    for name, column in [("weights", c) for c in (cfg.weights or {})] + [
        ("cluster_column", cfg.cluster_column if cfg.dedup else None), ("curriculum", cfg.curriculum),
        ("drop_degenerate", "degenerate_reason" if cfg.drop_degenerate else None),
        ("max_garbage_ratio", "garbage_ratio" if cfg.max_garbage_ratio is not None else None),
        ("drop_wrong_answer", "answer_correct" if cfg.drop_wrong_answer else None),
    ]:
        if column is not None and column not in columns:
            hint = {"cluster_column": " (score with scorers: [..., duplicates])",
                    "drop_degenerate": " (score with scorers: [..., heuristics])",
                    "max_garbage_ratio": " (score with scorers: [..., heuristics])",
                    "drop_wrong_answer": (" (score with scorers: [..., verifier] and fields.answer: <reference-answer "
                                          "column>, or set drop_wrong_answer: false)")}.get(name, "")
            problems.append(f"{name}: column '{column}' not in '{cfg.input_path}' (columns: {listed}){hint}")
    if cfg.strategy == "auto":
        usable = [c for c in cfg.auto.candidates if c.strategy == "random" or all(
            s in columns for s in ((c.weights or {}) if c.strategy == "weighted" else [c.score]))]
        if not usable:
            problems.append(f"auto.candidates: no candidate's score column is in '{cfg.input_path}' (columns: {listed})")
        if cfg.auto.eval_path is not None and not Path(cfg.auto.eval_path).exists():
            problems.append(f"auto.eval_path: '{cfg.auto.eval_path}' does not exist; point it at held-out rows")
    if problems:
        raise ConfigError(problems)


def resolve_token_limit(cfg: SelectConfig) -> tuple[int | None, int | None, float | None]:
    """(token budget to apply, per-row token cap, training FLOPs per token) from token_budget and budget."""
    if cfg.budget is None:
        return cfg.token_budget, None, None
    from frugalray.models import model_shape, resolve_model

    model_path = resolve_model(cfg.budget.model, field="budget.model")
    config_json = Path(model_path) / "config.json"
    # A local model's shape straight from its config.json: no transformers import for arithmetic.
    shape = ModelShape.from_hf_config(json.loads(config_json.read_text())) if config_json.is_file() else model_shape(model_path)
    try:
        flop_tokens, per_token = flop_budget_tokens(cfg.budget, shape)
    except ValueError as err:  # an unknown target module
        raise ConfigError([f"budget.{err}"]) from None
    if flop_tokens < 1:
        raise ConfigError([
            (f"budget.flops: {cfg.budget.flops:.4g} FLOPs pay for no token of training "
             f"({per_token * cfg.budget.epochs:.4g} FLOPs per token over {cfg.budget.epochs:g} epoch(s)); raise it")
        ])
    limit = flop_tokens if cfg.token_budget is None else min(cfg.token_budget, flop_tokens)
    return limit, cfg.budget.seq_len, per_token


def run_select(cfg: SelectConfig, run_dir: str | Path, ledger=None) -> SelectResult:
    """Select from the scored rows at `cfg.input_path`; write the subset and its report."""
    from frugalray.budget.ledger import ComputeLedger

    start = time.time()
    output = Path(cfg.output_path)
    if output.suffix != ".jsonl":
        raise ConfigError([f"output_path: '{output}' must end in .jsonl (training reads the kept rows from it)"])
    rows, columns = _read_scored(cfg.input_path)
    _check_columns(cfg, columns)
    token_limit, token_cap, per_token = resolve_token_limit(cfg)
    budget_kwargs = {
        "keep_fraction": cfg.keep_fraction, "token_budget": token_limit, "seed": cfg.seed,
        "token_column": cfg.token_column, "strata": cfg.strata,
        "cluster_column": cfg.cluster_column if cfg.dedup else None, "token_cap": token_cap,
        "excluded": filter_reasons(rows, cfg.drop_degenerate, cfg.max_garbage_ratio, cfg.drop_wrong_answer),
    }
    strategy, score, weights, auto = cfg.strategy, cfg.score, cfg.weights, None
    if cfg.strategy == "auto":
        from frugalray.data.auto_select import run_auto_proxy

        auto = run_auto_proxy(rows, cfg.auto, budget_kwargs)
        strategy, score, weights = auto.winner.strategy, auto.winner.score, auto.winner.weights
        log.info("strategy auto chose %s: %s", auto.winner.label(), auto.why)
    selection = select_rows(rows, score, strategy, weights=weights, **budget_kwargs)
    # Nothing lost: every row scoring read is kept, dropped (with a reason) or quarantined.
    source_rows_in, quarantined = scoring_accounting(cfg.input_path)
    accounted = len(selection.kept) + len(selection.dropped) + quarantined
    if source_rows_in is not None and source_rows_in != accounted:
        raise RuntimeError(
            f"row accounting: scoring read {source_rows_in} rows but kept {len(selection.kept)} + dropped "
            f"{len(selection.dropped)} + quarantined {quarantined} = {accounted}; '{cfg.input_path}' is incomplete or stale"
        )
    kept_rows = curriculum_order(selection.kept, cfg.curriculum) if cfg.curriculum else selection.kept
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in kept_rows)
    train_flops = selection.kept_tokens * per_token * cfg.budget.epochs if cfg.budget is not None else None
    report = selection_report(rows, selection, cfg, strategy, score, weights)
    report.update({
        "quarantined": quarantined, "source_rows_in": source_rows_in, "token_limit": token_limit,
        "token_cap": token_cap, "flop_budget": cfg.budget.flops if cfg.budget else None,
        "train_flops_per_token": per_token, "train_flops": train_flops,
        "auto": auto.as_dict() if auto else None,
    })
    report_path = output.with_suffix(".report.json")
    histogram_paths = []
    if cfg.histograms:
        wanted = list(dict.fromkeys([score, *(weights or {}), *HISTOGRAM_COLUMNS]))
        histogram_paths = write_histograms(rows, selection.kept, [c for c in wanted if c in columns],
                                           output.with_suffix(""))
    report["histograms"] = histogram_paths
    report_path.write_text(json.dumps(report, indent=1, default=str))
    markdown_path = output.with_suffix(".report.md")
    markdown_path.write_text(markdown_report(report))

    auto_flops = auto.flops if auto else 0.0
    result = SelectResult(
        rows_in=len(rows),
        kept=len(selection.kept),
        dropped=len(selection.dropped),
        kept_tokens=selection.kept_tokens,
        output_path=str(output),
        report_path=str(report_path),
        quarantined=quarantined,
        source_rows_in=source_rows_in,
        drop_reasons=selection.reason_counts(),
        histogram_paths=histogram_paths,
        token_limit=token_limit,
        train_flops=train_flops,
        strategy=strategy,
        score=score,
        auto_flops=auto_flops,
        markdown_report_path=str(markdown_path),
    )
    ledger = ledger or ComputeLedger(run_dir)
    ledger.record(
        "select",
        flops=auto_flops,  # 0 unless strategy auto ran its proxy fine-tunes
        tokens=sum(c.train_tokens for c in auto.table) if auto else 0,
        wall_s=time.time() - start,
        produced={"output_path": result.output_path, "report_path": result.report_path},
        rows_in=result.rows_in,
        kept=result.kept,
        dropped=result.dropped,
        kept_tokens=result.kept_tokens,
        quarantined=quarantined,
        drop_reasons=result.drop_reasons,
        strategy=strategy,
        score=score,
        token_limit=token_limit,
        train_flops=train_flops,
        auto=auto.as_dict() if auto else None,
    )
    log.info("kept %d of %d rows (%d tokens) -> %s", result.kept, result.rows_in, result.kept_tokens, output)
    return result
