"""The `select` stage: read scored rows, keep a fraction or a budget's worth, write them and a report.

`SelectConfig` is the stage's YAML; `run_select` is the recipe: read the scored rows, check
the columns the settings need, turn the budgets into a token limit, rank and pack
(`frugalray.data.ranking`: strategies, filters, dedup, the knapsack), check that no row was
lost, write the kept rows, then the report (`frugalray.data.selection_report`).

Budgets (any combination; every one set is respected, none is ever exceeded):
- `keep_fraction`: at most round(f * rows) rows;
- `token_budget`: a 0/1 knapsack over example lengths (`pack_by_preference`): rows are
  taken in rank order while they fit, then the capacity that is left is packed exactly
  (a subset-sum over the next-ranked rows that fills it best, ties to the better-ranked
  rows), then any row further down that still fits is added. The best-ranked prefix is
  always kept, and no dropped eligible row fits in what is left;
- `budget: {flops, epochs, ...}` (`TrainingFlopBudget`): the FLOP budget of the training that
  follows, turned into a token budget through `budget.flops.train_flops_per_token` for the
  configured model, method, LoRA rank and seq_len (the per-token cost at the full seq_len, an
  upper bound of what a padded batch costs). A row then costs min(n_tokens, seq_len) tokens,
  what training reads of it after truncation, so epochs x kept tokens x per-token FLOPs <= flops.
Rows with a non-finite score (e.g. a response truncated away while scoring) are never kept.

Filters before ranking, each a drop reason of its own: `drop_degenerate` (the heuristics
scorer's `degenerate_reason` is set: empty, repetitive, copies the prompt),
`max_garbage_ratio` (character-level garbage above the threshold) and `drop_wrong_answer`
(the verifier scorer's `answer_correct` is 0: the response does not state the row's reference
answer; rows without a reference, `answer_correct` null, are not judged and stay).
`dedup: true` (with the `duplicates` scorer's `dup_cluster` column) keeps at most one row
per duplicate cluster: its best-ranked one. `curriculum: <score>` writes the kept rows in
ascending order of that score (easy -> hard) with a `curriculum_rank` column; without it
the kept rows are written in rank order.

Every dropped row has a reason: `unscorable` (no finite score), `degenerate` / `garbage` /
`wrong_answer` (a filter above), `duplicate` (another row of its cluster was kept) or
`budget` (ranked outside the budget). The report counts them, shows a few examples of each,
and draws a histogram per score column (PNG, all rows vs kept). Nothing is lost: with the
scoring sidecar next to the input, the job checks that the rows scoring read equal kept +
dropped + quarantined.

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
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from frugalray.budget.flops import ModelShape, train_flops_per_token
from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, StrictModel
from frugalray.data.auto_select import AutoSettings, run_auto_proxy
from frugalray.data.ranking import curriculum_order, filter_reasons, select_rows
from frugalray.data.selection_report import (
    HISTOGRAM_COLUMNS,
    markdown_report,
    selection_report,
    write_histograms,
)
from frugalray.examples.loaders import read_rows
from frugalray.models import DEFAULT_MODEL, model_shape, resolve_model

log = logging.getLogger(__name__)

SelectStrategy = Literal["lowest", "highest", "random", "middle", "stratified", "weighted", "auto"]


class TrainingFlopBudget(StrictModel):
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


def flop_budget_tokens(budget: TrainingFlopBudget, shape: ModelShape) -> tuple[int, float]:
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
    budget: TrainingFlopBudget | None = Field(
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


def scoring_accounting(input_path: str) -> tuple[int | None, int]:
    """(rows the scoring stage read, rows it quarantined) from the sidecar next to its output.

    (None, 0) when the input was not written by `score` (no sidecar): nothing to check against.
    """
    sidecar = Path(str(input_path).rstrip("/") + "_scores.json")
    if not sidecar.is_file():
        return None, 0
    meta = json.loads(sidecar.read_text())
    return int(meta["rows_in"]), int(meta["rows_quarantined"])


def _read_scored(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow.parquet as pq

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
