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

Every dropped row has a reason: `unscorable` (no finite score), `duplicate` (another row of
its cluster was kept) or `budget` (ranked outside the budget). The report counts them,
shows a few examples of each, and draws a histogram per score column (PNG, all rows vs
kept). Nothing is lost: with the scoring sidecar next to the input, the job checks that
the rows scoring read equal kept + dropped + quarantined.

With `token_budget`, rows are taken in rank order and a row that no longer fits is skipped
(a later, shorter row may still fit), so the kept tokens never exceed the budget. Rows
with a non-finite score (e.g. a response truncated away while scoring) are never kept.

The kept rows go to a JSONL file that training reads with
`FieldMapping.prompt_response()` (prompt / response columns); a report JSON next to it
records the counts, the score thresholds and, when the data carries `noise_kind` labels
(generated data does), how many rows of each noise kind were dropped.
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

from frugalray.config import ConfigError, StrictModel

log = logging.getLogger(__name__)

Strategy = Literal["lowest", "highest", "random", "middle", "stratified", "weighted"]
DropReason = Literal["unscorable", "duplicate", "budget"]
# Numeric columns `score` may write; the report draws a histogram of each one present.
HISTOGRAM_COLUMNS = (
    "perplexity", "mean_nll", "ifd", "grand", "n_tokens", "garbage_ratio", "repetition_ratio", "response_chars",
)


class SelectConfig(StrictModel):
    input_path: str = Field(description="scored data: the Parquet directory `score` wrote (or .jsonl/.parquet)")
    output_path: str = Field(description=".jsonl file of the kept rows")
    score: str = Field(default="perplexity", description="column to rank by")
    strategy: Strategy = "lowest"
    keep_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    token_budget: int | None = Field(default=None, ge=1, description="most tokens (token_column) to keep")
    token_column: str = "n_tokens"
    seed: int = 0
    strata: int = Field(default=5, ge=1, description="quantile bins of the stratified strategy")
    weights: dict[str, float] | None = Field(
        default=None, description="weighted strategy: score column -> weight (>0 prefers low, <0 high)"
    )
    dedup: bool = Field(default=False, description="keep at most one row per duplicate cluster (cluster_column)")
    cluster_column: str = "dup_cluster"
    curriculum: str | None = Field(default=None, description="score column to order the kept rows by, easy -> hard")
    histograms: bool = Field(default=True, description="write a PNG histogram per score column next to the report")

    @model_validator(mode="after")
    def _weights_for_weighted(self) -> SelectConfig:
        if self.strategy == "weighted" and not self.weights:
            raise ValueError("weights: the weighted strategy needs {score column: weight}, e.g. {perplexity: 1, ifd: -1}")
        if self.weights and any(w == 0 for w in self.weights.values()):
            raise ValueError("weights: a weight of 0 has no effect; remove that column or give it a nonzero weight")
        return self

    @model_validator(mode="after")
    def _exactly_one_limit(self) -> SelectConfig:
        if (self.keep_fraction is None) == (self.token_budget is None):
            raise ValueError(
                "keep_fraction, token_budget: set exactly one of them "
                "(keep_fraction: 0 < f <= 1 of the rows; token_budget: most tokens to keep)"
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
) -> Selection:
    """Split rows into kept and dropped; pure, so it is tested without data files or Ray.

    `keep_fraction` keeps round(f * len(rows)) rows (fewer if fewer are eligible).
    `token_budget` keeps rows in rank order while their `token_column` total fits.
    `cluster_column` (dedup) keeps at most one row per value of that column.
    """
    if (keep_fraction is None) == (token_budget is None):
        raise ValueError("keep_fraction, token_budget: set exactly one of them")
    eligible, ineligible = rank_rows(rows, score, strategy, seed, strata, weights)
    reasons: dict[int, str] = dict.fromkeys(ineligible, "unscorable")
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

    keep: list[int] = []
    kept_tokens = 0
    if keep_fraction is not None:
        keep = eligible[: min(len(eligible), round(keep_fraction * len(rows)))]
        kept_tokens = sum(int(rows[i].get(token_column) or 0) for i in keep)
    else:
        for i in eligible:
            n = int(rows[i][token_column])
            if kept_tokens + n <= token_budget:
                keep.append(i)
                kept_tokens += n
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


def selection_report(rows: list[dict], selection: Selection, cfg: SelectConfig) -> dict[str, Any]:
    report: dict[str, Any] = {
        "rows_in": len(rows),
        "kept": len(selection.kept),
        "dropped": len(selection.dropped),
        "unscored_dropped": selection.unscored,
        "kept_tokens": selection.kept_tokens,
        "score": cfg.score,
        "strategy": cfg.strategy,
        "keep_fraction": cfg.keep_fraction,
        "token_budget": cfg.token_budget,
        "kept_score": _score_range(selection.kept, cfg.score),
        "dropped_score": _score_range(selection.dropped, cfg.score),
        "dedup": cfg.dedup,
        "weights": cfg.weights,
        "curriculum": cfg.curriculum,
        "drop_reasons": selection.reason_counts(),
        "drop_examples": _drop_examples(selection, [cfg.score, *(cfg.weights or {})]),
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


def _read_scored(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow.parquet as pq

    from frugalray.data.loaders import read_rows

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


def run_select(cfg: SelectConfig, run_dir: str | Path, ledger=None) -> SelectResult:
    """Select from the scored rows at `cfg.input_path`; write the subset and its report."""
    from frugalray.budget.ledger import ComputeLedger

    start = time.time()
    output = Path(cfg.output_path)
    if output.suffix != ".jsonl":
        raise ConfigError([f"output_path: '{output}' must end in .jsonl (training reads the kept rows from it)"])
    rows, columns = _read_scored(cfg.input_path)
    problems = []
    if cfg.strategy not in ("random", "weighted") and cfg.score not in columns:
        problems.append(
            f"score: column '{cfg.score}' not in '{cfg.input_path}' (columns: {', '.join(columns)}); "
            "set score to one of them"
        )
    if cfg.token_budget is not None and cfg.token_column not in columns:
        problems.append(
            f"token_column: column '{cfg.token_column}' not in '{cfg.input_path}' (columns: {', '.join(columns)}); "
            "score the data first or set token_column"
        )
    for name, column in [("weights", c) for c in (cfg.weights or {})] + [
        ("cluster_column", cfg.cluster_column if cfg.dedup else None), ("curriculum", cfg.curriculum)
    ]:
        if column is not None and column not in columns:
            hint = " (score with scorers: [..., duplicates])" if name == "cluster_column" else ""
            problems.append(f"{name}: column '{column}' not in '{cfg.input_path}' (columns: {', '.join(columns)}){hint}")
    if problems:
        raise ConfigError(problems)
    selection = select_rows(
        rows, cfg.score, cfg.strategy, cfg.keep_fraction, cfg.token_budget, cfg.seed, cfg.token_column,
        strata=cfg.strata, weights=cfg.weights, cluster_column=cfg.cluster_column if cfg.dedup else None,
    )
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
    report = selection_report(rows, selection, cfg)
    report.update({"quarantined": quarantined, "source_rows_in": source_rows_in})
    report_path = output.with_suffix(".report.json")
    histogram_paths = []
    if cfg.histograms:
        wanted = list(dict.fromkeys([cfg.score, *(cfg.weights or {}), *HISTOGRAM_COLUMNS]))
        histogram_paths = write_histograms(rows, selection.kept, [c for c in wanted if c in columns],
                                           output.with_suffix(""))
    report["histograms"] = histogram_paths
    report_path.write_text(json.dumps(report, indent=1, default=str))

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
    )
    ledger = ledger or ComputeLedger(run_dir)
    ledger.record(
        "select",
        flops=0.0,
        tokens=0,
        wall_s=time.time() - start,
        produced={"output_path": result.output_path, "report_path": result.report_path},
        rows_in=result.rows_in,
        kept=result.kept,
        dropped=result.dropped,
        kept_tokens=result.kept_tokens,
        quarantined=quarantined,
        drop_reasons=result.drop_reasons,
    )
    log.info("kept %d of %d rows (%d tokens) -> %s", result.kept, result.rows_in, result.kept_tokens, output)
    return result
