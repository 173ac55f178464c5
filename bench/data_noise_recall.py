"""Noise recall: how much injected noise each selection method removes when keeping 70% of all rows.

    python bench/data_noise_recall.py                                   # full: 1000 rows (a few minutes)
    python bench/data_noise_recall.py --quick --out-dir /tmp/nr_quick   # 200 rows: proves the harness

Generated verifiable tasks (frugalray.examples.generate, 1-2 digit sums and differences) with 20%
of the rows replaced by labelled noise, round-robin over every kind: wrong_answer, garbled,
exact_duplicate, near_duplicate, empty_response. One real scoring run (the Ray Data job's
operator, in process: bench/_data_common.py; perplexity, ifd, heuristics, verifier, duplicates)
with the product's default dedup settings (`score.DedupSettings`: Jaccard 0.7), then, for each
method, a selection that keeps round(0.7 x all input rows) of the rows that reached selection.

Primary (written into the result JSON before the first measurement, with the targets it will be
held to): `combination_label_free`, which uses only what any instruction data has (perplexity +
garbage ranking, dedup, the degenerate and garbage filters): target `recall_combination_label_free
>= 0.9`. Methods that need each row's reference answer (`answer`: verifiable tasks only) are
reported beside it with no target: `verifier` and `combination_with_answers` (the label-free
combination plus the verifier's `drop_wrong_answer`). Which methods need reference answers is
derived from the scorers their settings read (`method_scorers`), not typed in.

Two recalls per method:
- `recall_<method>`: over every noisy row, end to end; a row the loader quarantined (the 40
  empty responses) counts as removed, as it is in the product's data stage;
- `recall_<method>_choosable`: over the noisy rows that reached selection (and, for duplicates,
  whose source did too): what the method itself removed. The quarantine is reported apart
  (`quarantined_noisy_rows`, `quarantined_clean_rows`).
Random is held to `recall_random_choosable <= 0.4`. Its expectation is reported beside it
(`recall_random_choosable_expected`): keeping k of n rows at random removes a labelled row with
probability 1 - k/n and breaks a duplicate pair with probability 1 - k(k-1)/(n(n-1)) (about
0.27 and 0.47 here, 0.37 over the choosable noise), so the bound is a sanity check with little slack.

Duplicates: an injected duplicate is a second copy of a clean row. Which copy dedup keeps is
arbitrary (both have the same text and scores), so two figures are reported: `strict` (the
labelled copy itself was removed) and `pair` (the duplication was removed: the copy and its
source are not both kept). `recall` uses `pair` for the two duplicate kinds and the labelled
row for every other kind; `recall_strict` uses the label everywhere.

Cost beside count: each method's kept rows over all input rows (`kept_rows_fraction_<m>`; dedup
may keep fewer than planned when more rows cluster than the budget drops: the generated set asks
many clean questions more than once, 1-digit sums having few distinct ones, and about a third of its
rows repeat another exactly), the training FLOPs of
its kept rows over those of every row the loader accepted (`kept_train_flops_fraction_<m>`;
QLoRA rank 8 at seq_len 128, `select.TrainingFlopBudget`'s defaults, each row at its own length),
and its selection FLOPs (the scorers it needs, `score_flops.scored_rows_flops`) over one epoch of
training on every accepted row (`selection_over_train_flops_<m>`). `clean_removed_share_<m>`:
the share of clean choosable rows it removed. Every planned method runs; one that fails is listed
under `not_run` with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from frugalray.benchmarking import RESULTS_DIR, print_table, write_plan, write_result
from frugalray.budget.flops import ModelShape, train_flops_per_token
from frugalray.data.score_columns import SCORER_COLUMNS
from frugalray.examples.generate import ALL_NOISE_KINDS, GenerateConfig, generate_tasks, write_rows

NAME = "data_noise_recall"
DUPLICATE_KINDS = ("exact_duplicate", "near_duplicate")
KEEP_OF_ALL_ROWS = 0.7
PRIMARY_METHOD = "combination_label_free"
# Scorers that read each row's reference answer: a method using one cannot run on unlabelled data.
REFERENCE_SCORERS = ("verifier", "pass_rate")
TARGETS = {f"recall_{PRIMARY_METHOD}": ">= 0.9", "recall_random_choosable": "<= 0.4"}
TARGETS_HISTORY = [
    {"metric": "recall_combination", "old": ">= 0.9", "new": None,
     "why": "issue 20: the target belongs to a method that needs no reference answers. Since 9ed2823 "
            "`combination` included the verifier's drop_wrong_answer, which reads each row's true answer (the "
            "target string stayed while the method under it changed); that method is now reported as "
            "recall_combination_with_answers, with no target, beside the label-free combination"},
    {"metric": f"recall_{PRIMARY_METHOD}", "old": None, "new": ">= 0.9",
     "why": "issue 20: the >= 0.9 target at keep 70% of all rows returns to the label-free combination, the "
            "method it was first set on (0.80 at 24352ec; 0.865 at 0cee4f6, then with the bench's own dedup "
            "threshold 0.5, which clustered 424 rows and kept about half). Now with the product's default "
            "dedup threshold (score.DedupSettings, 0.7)"},
    {"metric": "recall_random", "old": "<= 0.4", "new": None, "commit": "0cee4f6",
     "why": "dropped at 0cee4f6 with no entry (recorded late, issue 20): random then removed 0.515 because the "
            "loader's quarantine of the empty responses counted as removal for every method. Replaced by "
            "recall_random_choosable"},
    {"metric": "recall_random_choosable", "old": None, "new": "<= 0.4",
     "why": "issue 20: restores recall_random <= 0.4 over the rows random could choose from (quarantined rows "
            "left out and reported apart as quarantined_noisy_rows); the expectation is reported beside it"},
]


# -- recall ------------------------------------------------------------------------------------------


def noisy_rows(source: list[dict], among: set[str] | None = None) -> list[dict]:
    """The noisy rows of `source`; with `among` (the ids that reached selection), only those a
    selection method could act on: the row reached selection and, for a duplicate, its source did too."""
    rows = [r for r in source if r["noise_kind"] != "none"]
    if among is None:
        return rows
    return [r for r in rows if r["id"] in among
            and (r["noise_kind"] not in DUPLICATE_KINDS or r["duplicate_of"] in among)]


def recall(source: list[dict], kept_ids: set[str], among: set[str] | None = None) -> dict:
    """Per-kind and overall recall of injected noise, strict and pair-based for duplicates.

    `among`: count only the noisy rows a method could choose from (`noisy_rows(source, among)`);
    None: every noisy row, where a row that never reached selection (quarantined) counts as removed."""
    noisy = noisy_rows(source, among)
    per_kind: dict[str, dict] = {}
    removed = removed_strict = 0
    for kind in ALL_NOISE_KINDS:
        rows = [r for r in noisy if r["noise_kind"] == kind]
        strict = sum(r["id"] not in kept_ids for r in rows)
        if kind in DUPLICATE_KINDS:
            # The duplication is gone unless both the copy and its source were kept.
            pair = sum(not (r["id"] in kept_ids and r["duplicate_of"] in kept_ids) for r in rows)
        else:
            pair = strict
        per_kind[kind] = {"n": len(rows), "strict": strict / len(rows) if rows else None,
                          "recall": pair / len(rows) if rows else None}
        removed += pair
        removed_strict += strict
    return {"recall": removed / len(noisy) if noisy else None,
            "recall_strict": removed_strict / len(noisy) if noisy else None,
            "per_kind": per_kind, "kept": len(kept_ids), "noisy": len(noisy)}


def clean_removed_share(source: list[dict], kept_ids: set[str], among: set[str]) -> float | None:
    """The share of clean rows that reached selection and were not kept: what a method wasted."""
    clean = [r["id"] for r in source if r["noise_kind"] == "none" and r["id"] in among]
    return sum(i not in kept_ids for i in clean) / len(clean) if clean else None


def quarantine_summary(source: list[dict], among: set[str]) -> dict:
    """Rows that never reached selection (the loader quarantined them), noisy per kind and clean."""
    lost = [r for r in source if r["id"] not in among]
    noisy = [r for r in lost if r["noise_kind"] != "none"]
    n_noisy = sum(r["noise_kind"] != "none" for r in source)
    return {"quarantined_noisy_rows": len(noisy), "quarantined_clean_rows": len(lost) - len(noisy),
            "quarantined_noisy_share": len(noisy) / n_noisy if n_noisy else None,
            "quarantined_by_kind": dict(sorted(Counter(r["noise_kind"] for r in noisy).items()))}


def expected_random_recall(source: list[dict], among: set[str], n_keep: int) -> dict:
    """Expected (pair, strict) recall of keeping `n_keep` of the rows in `among` uniformly at random,
    over the noisy rows it could choose from: a row survives with probability k/n, a pair with k(k-1)/(n(n-1))."""
    n = len(among)
    k = min(n_keep, n)
    noisy = noisy_rows(source, among)
    if not noisy or n == 0:
        return {"recall": None, "recall_strict": None}
    p_row = k / n
    p_pair = k * (k - 1) / (n * (n - 1)) if n > 1 else p_row
    pair = sum(1 - (p_pair if r["noise_kind"] in DUPLICATE_KINDS else p_row) for r in noisy)
    return {"recall": pair / len(noisy), "recall_strict": 1 - p_row}


# -- methods -----------------------------------------------------------------------------------------


def methods() -> dict[str, dict]:
    """Selection settings (SelectConfig fields) of each method; keep_fraction is set per run."""
    label_free = {"strategy": "weighted", "weights": {"perplexity": 1.0, "garbage_ratio": 1.0}, "dedup": True,
                  "drop_degenerate": True, "max_garbage_ratio": 0.2}
    return {
        "random": {"strategy": "random"},
        "perplexity": {"strategy": "lowest", "score": "perplexity"},
        "ifd": {"strategy": "lowest", "score": "ifd"},
        "heuristics": {"strategy": "lowest", "score": "garbage_ratio", "drop_degenerate": True},
        "duplicates": {"strategy": "random", "dedup": True},
        "verifier": {"strategy": "random", "drop_wrong_answer": True},
        PRIMARY_METHOD: label_free,
        "combination_with_answers": {**label_free, "drop_wrong_answer": True},
    }


def method_columns(fields: dict[str, Any]) -> list[str]:
    """The score columns a selection with these SelectConfig fields reads (as select checks them)."""
    strategy = fields.get("strategy", "lowest")
    if strategy == "weighted":
        columns = list(fields.get("weights") or {})
    elif strategy == "random":
        columns = []
    else:
        columns = [fields.get("score", "perplexity")]
    columns += ["degenerate_reason"] if fields.get("drop_degenerate") else []
    columns += ["garbage_ratio"] if fields.get("max_garbage_ratio") is not None else []
    columns += ["answer_correct"] if fields.get("drop_wrong_answer") else []
    columns += [fields.get("cluster_column", "dup_cluster")] if fields.get("dedup") else []
    return list(dict.fromkeys(columns))


def method_scorers(fields: dict[str, Any]) -> list[str]:
    """The scorers that write the columns a method reads (`score_columns.SCORER_COLUMNS`)."""
    scorers = []
    for column in method_columns(fields):
        owners = [s for s, cols in SCORER_COLUMNS.items() if column in cols]
        if not owners:
            raise ValueError(f"method reads column {column!r}, which no scorer writes (SCORER_COLUMNS)")
        scorers.append(owners[0])
    return list(dict.fromkeys(scorers))


def uses_reference_answers(fields: dict[str, Any]) -> bool:
    return any(s in REFERENCE_SCORERS for s in method_scorers(fields))


# -- cost --------------------------------------------------------------------------------------------


def train_flops(shape: ModelShape, n_tokens: list[int], seq_len: int, method: str = "qlora",
                lora_params: int = 0, gradient_checkpointing: bool = False) -> float:
    """Training FLOPs of one epoch over rows of `n_tokens` tokens, each truncated to `seq_len`
    (what training reads of it) and charged at its own length."""
    total = 0.0
    for n in n_tokens:
        used = min(int(n), seq_len)
        total += train_flops_per_token(shape, used, method, lora_params, gradient_checkpointing) * used
    return total


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def method_metrics(name: str, source: list[dict], kept: list[dict], among: set[str], n_rows: int,
                   kept_train_flops: float, train_flops_all: float, selection_flops: float) -> dict[str, Any]:
    """Every metric of one method: recall over all noisy rows and over the choosable ones (strict and
    pair), the clean rows it wasted, and its count ratio beside its cost ratios."""
    kept_ids = {r["id"] for r in kept}
    overall, choosable = recall(source, kept_ids), recall(source, kept_ids, among)
    values = {
        f"recall_{name}": overall["recall"], f"recall_strict_{name}": overall["recall_strict"],
        f"recall_{name}_choosable": choosable["recall"],
        f"recall_strict_{name}_choosable": choosable["recall_strict"],
        f"clean_removed_share_{name}": clean_removed_share(source, kept_ids, among),
        f"kept_rows_fraction_{name}": len(kept_ids) / n_rows,
        f"kept_train_flops_fraction_{name}": ratio(kept_train_flops, train_flops_all),
        f"selection_over_train_flops_{name}": ratio(selection_flops, train_flops_all),
    }
    return {**{k: None if v is None else round(v, 4) for k, v in values.items()},
            f"selection_flops_{name}": selection_flops}


# -- record ------------------------------------------------------------------------------------------


def primary_config(score_settings: dict[str, Any]) -> dict[str, Any]:
    fields = methods()[PRIMARY_METHOD]
    if uses_reference_answers(fields):  # the point of issue 20: the headline must run without labels
        raise ValueError(f"PRIMARY_METHOD {PRIMARY_METHOD!r} reads reference answers; pick a label-free method")
    return {"method": PRIMARY_METHOD, "keep_of_all_rows": KEEP_OF_ALL_ROWS, "select": fields,
            "scorers_needed": method_scorers(fields), "scoring": score_settings,
            "metric": f"recall_{PRIMARY_METHOD}", "target": TARGETS[f"recall_{PRIMARY_METHOD}"]}


# -- run ---------------------------------------------------------------------------------------------


def run(quick: bool, out_dir: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import functools

    import pyarrow.parquet as pq
    from _data_common import score_in_process

    from frugalray.config import parse_config
    from frugalray.data.score import ScoreConfig
    from frugalray.data.score_flops import scored_rows_flops
    from frugalray.data.select import SelectConfig, TrainingFlopBudget, run_select
    from frugalray.models import DEFAULT_MODEL, load_tokenizer, model_shape, resolve_model

    n_rows = 200 if quick else 1000
    work = Path(tempfile.mkdtemp(prefix="noise_recall_"))
    generate = GenerateConfig(n_rows=n_rows, max_digits=2, noise_rate=0.2, seed=11,
                              output_path=str(work / "tasks.jsonl"))
    row_scorers = ("perplexity", "ifd", "heuristics", "verifier")  # RowScorer's; duplicates run after them
    scorers = (*row_scorers, "duplicates")
    # The scoring settings a user gets: the product's defaults (dedup threshold, row length, batch size),
    # plus the answer column the verifier needs.
    score_cfg = ScoreConfig(input_path=str(work / "tasks.jsonl"), output_path=str(work / "scored"),
                            scorers=list(scorers), fields={"answer": "answer"})
    budget = TrainingFlopBudget(flops=1.0)  # only its training defaults (method, rank, seq_len) are used
    planned = methods()
    config: dict[str, Any] = {
        "quick": quick, "n_rows": n_rows, "generate": generate.model_dump(exclude={"output_path"}),
        "noise_kinds": list(ALL_NOISE_KINDS), "keep_of_all_rows": KEEP_OF_ALL_ROWS,
        "primary": primary_config({"scorers": list(scorers), "dedup": score_cfg.dedup.model_dump(),
                                   "max_length": score_cfg.max_length, "batch_size": score_cfg.batch_size,
                                   "answer_column": "answer", "model": DEFAULT_MODEL}),
        "scoring": "in process (bench/_data_common.py: RowScorer + duplicate_clusters)",
        "dedup_threshold": score_cfg.dedup.threshold,
        "dedup_threshold_source": "frugalray.data.score.DedupSettings default",
        "methods": planned,
        "label_free_methods": [m for m, f in planned.items() if not uses_reference_answers(f)],
        "uses_reference_answers": [m for m, f in planned.items() if uses_reference_answers(f)],
        "method_scorers": {m: method_scorers(f) for m, f in planned.items()},
        "duplicate_metric": "pair: the copy and its source are not both kept",
        "choosable": "noisy rows that reached selection (not quarantined), duplicates only with their source",
        "train_flops_rule": (f"{budget.method} rank {budget.lora_rank} ({budget.target_modules}), each row truncated "
                             f"to seq_len {budget.seq_len} and charged at its own length; one epoch"),
        "selection_flops_rule": "score_flops.scored_rows_flops for the scorers each method reads",
    }
    write_plan(NAME, config, out_dir)  # before the first measurement

    source = generate_tasks(generate)
    write_rows(source, work / "tasks.jsonl")
    started = time.time()
    scored = score_in_process(work / "tasks.jsonl", work / "scored", row_scorers,
                              dedup_threshold=score_cfg.dedup.threshold, batch_size=score_cfg.batch_size,
                              max_length=score_cfg.max_length, answer_column="answer")
    score_s = time.time() - started
    scored_rows = pq.read_table(work / "scored", columns=["id", "response", "n_tokens"]).to_pylist()
    among = {r["id"] for r in scored_rows}
    n_keep = round(KEEP_OF_ALL_ROWS * n_rows)  # 70% of every input row, quarantine included
    fraction = min(1.0, n_keep / len(scored_rows))

    model_path = resolve_model(DEFAULT_MODEL)
    shape = model_shape(model_path)
    lora = 0 if budget.method == "full" else shape.lora_params(budget.lora_rank, budget.target_modules)
    n_tokens = [int(r["n_tokens"]) for r in scored_rows]
    train_all = train_flops(shape, n_tokens, budget.seq_len, budget.method, lora, budget.gradient_checkpointing)
    tokenizer = functools.cache(lambda: load_tokenizer(model_path))

    def selection_flops(names: list[str]) -> float:
        if not names:
            return 0.0
        cfg = score_cfg.model_copy(update={"scorers": names})
        return float(sum(scored_rows_flops(cfg, shape, tokenizer, n_tokens, scored_rows, [], None, 0.0, [], 0).values()))

    table, metrics, drop_reasons, per_kind, not_run = [], {}, {}, {}, {}
    for name, fields in planned.items():
        try:
            cfg = parse_config(SelectConfig, {
                "input_path": str(work / "scored"), "output_path": str(work / f"sel_{name}.jsonl"),
                "keep_fraction": fraction, "histograms": False, "seed": 3, **fields,
            })
            result = run_select(cfg, work)
            kept = [json.loads(line) for line in Path(result.output_path).read_text().splitlines()]
            sel_flops = selection_flops(method_scorers(fields))
        except Exception as err:  # noqa: BLE001 - every planned method runs or says why it did not
            not_run[name] = f"{type(err).__name__}: {err}"
            print(f"{name}: not run ({not_run[name]})", file=sys.stderr)
            continue
        kept_train = train_flops(shape, [int(r["n_tokens"]) for r in kept], budget.seq_len, budget.method, lora,
                                 budget.gradient_checkpointing)
        values = method_metrics(name, source, kept, among, n_rows, kept_train, train_all, sel_flops)
        metrics.update(values)
        kept_ids = {r["id"] for r in kept}
        per_kind[name] = {k: v["recall"] for k, v in recall(source, kept_ids, among)["per_kind"].items()}
        table.append({"method": name, "kept": len(kept_ids), "recall": values[f"recall_{name}"],
                      "choosable": values[f"recall_{name}_choosable"], "strict": values[f"recall_strict_{name}"],
                      "flops_kept": values[f"kept_train_flops_fraction_{name}"],
                      "sel/train": values[f"selection_over_train_flops_{name}"],
                      **{k: v["recall"] for k, v in recall(source, kept_ids)["per_kind"].items()}})
        drop_reasons[name] = result.drop_reasons

    expected = expected_random_recall(source, among, round(fraction * len(scored_rows)))
    metrics["recall_random_choosable_expected"] = expected["recall"] and round(expected["recall"], 4)
    metrics["recall_strict_random_choosable_expected"] = expected["recall_strict"] and round(expected["recall_strict"], 4)
    metrics.update(quarantine_summary(source, among))
    ran = [row for row in table if row["method"] != "random"]
    label_free = [row for row in ran if row["method"] in config["label_free_methods"]]
    best, best_free = (max(rows, key=lambda row: row["recall"] or 0.0) if rows else None for rows in (ran, label_free))
    metrics.update({
        "best_method": best and best["method"],
        "best_label_free_method": best_free and best_free["method"],
        "recall_best_label_free": best_free and best_free["recall"],
        "planned": {"methods": list(planned)},
        "run": {"methods": [row["method"] for row in table]},
        "not_run": not_run,
        "per_kind_choosable": per_kind,
        "train_flops_all_accepted_rows": train_all,
    })
    config.update({"rows_scored": scored["rows_scored"], "rows_quarantined": scored["rows_quarantined"],
                   "quarantine_reasons": scored["quarantine_reasons"], "score_wall_s": round(score_s, 1),
                   "keep_fraction_of_scored": fraction, "noisy_rows": Counter(r["noise_kind"] for r in source),
                   "drop_reasons": drop_reasons})
    write_result(NAME, config, metrics, TARGETS, out_dir=out_dir,
                 **({"targets_history": TARGETS_HISTORY} if not quick else {}))
    print(f"{n_rows} rows, 20% noise, keep {KEEP_OF_ALL_ROWS:.0%} of all rows "
          f"({scored['rows_quarantined']} quarantined); dedup threshold {score_cfg.dedup.threshold} (product default); "
          f"scoring took {score_s:.0f}s; written to {out_dir / (NAME + '.json')}")
    if not_run:
        print(f"NOT RUN: {not_run}")
    print(f"random over choosable rows: {metrics.get('recall_random_choosable')} "
          f"(expected {metrics['recall_random_choosable_expected']})")
    print_table(table, ["method", "kept", "recall", "choosable", "strict", "flops_kept", "sel/train", *ALL_NOISE_KINDS])
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 rows instead of 1000")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder (default: bench/results for a full run, a new temporary folder "
                             "for --quick, so that a quick run never replaces the full run's record)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix=f"{NAME}_quick_")) if args.quick else RESULTS_DIR)
    run(args.quick, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
