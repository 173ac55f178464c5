"""Noise recall: how much injected noise each scorer (and the best combination) removes at keep 70%.

    python bench/data_noise_recall.py            # full: 1000 generated rows
    python bench/data_noise_recall.py --quick    # 200 rows

Generated verifiable tasks (frugalray.examples.generate, 1-2 digit sums and differences) with 20%
of the rows replaced by labelled noise, round-robin over every kind: wrong_answer, garbled,
exact_duplicate, near_duplicate, empty_response. One real scoring run (frugalray.data.score
with the Ray Data job's operator, in process: bench/_data_common.py; perplexity, ifd,
heuristics, verifier, duplicates) and then, for each method, a selection
that keeps 70% of ALL input rows (the loaders' quarantine counts as removed: it is the
stage's first filter). A method's recall is the fraction of noisy rows it removed; random
removes 0.3 in expectation.

Two combinations, reported side by side: `combination_label_free` uses only what any
instruction data has (perplexity + garbage ranking, dedup, the degenerate and garbage
filters), and `combination` adds the verifier's `drop_wrong_answer`, which needs each row's
reference answer (`answer`: verifiable tasks only). A label-free scorer on a 135M model cannot
tell "2 + 9 = 12" from "2 + 9 = 11"; the verifier can, because it is told the answer is 11.

Duplicates: an injected duplicate is a second copy of a clean row. Which copy dedup keeps is
arbitrary (both have the same text and scores), so two figures are reported: `strict` (the
labelled copy itself was removed) and `pair` (the duplication was removed: the copy and its
source are not both kept). The headline `recall` uses `pair` for the two duplicate kinds and
the labelled row for every other kind; `recall_strict` uses the label everywhere.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from frugalray.benchmarking import print_table, write_result
from frugalray.examples.generate import ALL_NOISE_KINDS, GenerateConfig, generate_tasks, write_rows

DUPLICATE_KINDS = ("exact_duplicate", "near_duplicate")


def recall(source: list[dict], kept_ids: set[str]) -> dict:
    """Per-kind and overall recall of injected noise, strict and pair-based for duplicates."""
    by_id = {r["id"]: r for r in source}
    noisy = [r for r in source if r["noise_kind"] != "none"]
    per_kind: dict[str, dict] = {}
    removed = removed_strict = 0
    for kind in ALL_NOISE_KINDS:
        rows = [r for r in noisy if r["noise_kind"] == kind]
        strict = sum(r["id"] not in kept_ids for r in rows)
        if kind in DUPLICATE_KINDS:
            # The duplication is gone unless both the copy and its source survived.
            pair = sum(not (r["id"] in kept_ids and r["duplicate_of"] in kept_ids and r["duplicate_of"] in by_id)
                       for r in rows)
        else:
            pair = strict
        per_kind[kind] = {"n": len(rows), "strict": strict / len(rows) if rows else None,
                          "recall": pair / len(rows) if rows else None}
        removed += pair
        removed_strict += strict
    return {"recall": removed / len(noisy), "recall_strict": removed_strict / len(noisy), "per_kind": per_kind,
            "kept": len(kept_ids), "noisy": len(noisy)}


def methods(n_keep_fraction: float) -> dict[str, dict]:
    """Selection configs (SelectConfig fields) of each method; keep_fraction is set per run."""
    label_free = {"strategy": "weighted", "weights": {"perplexity": 1.0, "garbage_ratio": 1.0}, "dedup": True,
                  "drop_degenerate": True, "max_garbage_ratio": 0.2}
    return {
        "random": {"strategy": "random"},
        "perplexity": {"strategy": "lowest", "score": "perplexity"},
        "ifd": {"strategy": "lowest", "score": "ifd"},
        "heuristics": {"strategy": "lowest", "score": "garbage_ratio", "drop_degenerate": True},
        "duplicates": {"strategy": "random", "dedup": True},
        "verifier": {"strategy": "random", "drop_wrong_answer": True},
        "combination_label_free": label_free,
        # The label-free combination plus the verifier (needs the reference answers).
        "combination": {**label_free, "drop_wrong_answer": True},
    }



def run(quick: bool) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _data_common import score_in_process

    from frugalray.config import parse_config
    from frugalray.data.select import SelectConfig, run_select

    n_rows = 200 if quick else 1000
    keep = 0.7
    work = Path(tempfile.mkdtemp(prefix="noise_recall_"))
    source = generate_tasks(GenerateConfig(n_rows=n_rows, max_digits=2, noise_rate=0.2, seed=11,
                                           output_path=str(work / "tasks.jsonl")))
    write_rows(source, work / "tasks.jsonl")
    started = time.time()
    scorers = ("perplexity", "ifd", "heuristics", "verifier")
    # Word-level edits of a 10-word question move its 3-gram Jaccard to ~0.5-0.65, below the default 0.7.
    scored = score_in_process(work / "tasks.jsonl", work / "scored", scorers, dedup_threshold=0.5)
    score_s = time.time() - started
    rows_scored = scored["rows_scored"]
    target_keep = round(keep * n_rows)  # 70% of every input row, quarantine included
    fraction = min(1.0, target_keep / rows_scored)
    table, metrics, drop_reasons = [], {}, {}
    for name, fields in methods(fraction).items():
        cfg = parse_config(SelectConfig, {
            "input_path": str(work / "scored"), "output_path": str(work / f"sel_{name}.jsonl"),
            "keep_fraction": fraction, "histograms": False, "seed": 3, **fields,
        })
        result = run_select(cfg, work)
        kept_ids = {json.loads(line)["id"] for line in Path(result.output_path).read_text().splitlines()}
        r = recall(source, kept_ids)
        metrics[f"recall_{name}"] = round(r["recall"], 4)
        metrics[f"recall_strict_{name}"] = round(r["recall_strict"], 4)
        row = {"method": name, "kept": r["kept"], "recall": r["recall"], "strict": r["recall_strict"]}
        row.update({k: v["recall"] for k, v in r["per_kind"].items()})
        table.append(row)
        drop_reasons[name] = result.drop_reasons
    best = max((row for row in table if row["method"] != "random"), key=lambda row: row["recall"])
    metrics["recall_best_combination"] = metrics["recall_combination"]
    metrics["recall_best_label_free"] = metrics["recall_combination_label_free"]
    metrics["best_method"] = best["method"]
    config = {"quick": quick, "n_rows": n_rows, "noise_rate": 0.2, "noise_kinds": list(ALL_NOISE_KINDS),
              "keep_of_all_rows": keep, "rows_scored": rows_scored, "rows_quarantined": scored["rows_quarantined"],
              "quarantine_reasons": scored["quarantine_reasons"], "score_wall_s": round(score_s, 1),
              "scorers": [*scorers, "duplicates"], "scoring": "in process (bench/_data_common.py: RowScorer + duplicate_clusters)", "dedup_threshold": 0.5, "answer_column": "answer", "methods": methods(fraction),
              "label_free_methods": ["random", "perplexity", "ifd", "heuristics", "duplicates", "combination_label_free"],
              "uses_reference_answers": ["verifier", "combination"],
              "noisy_rows": Counter(r["noise_kind"] for r in source),
              "duplicate_metric": "pair: the copy and its source are not both kept",
              "drop_reasons": drop_reasons}
    write_result("data_noise_recall", config, metrics,
                 {"recall_combination": ">= 0.9"})
    print(f"{n_rows} rows, 20% noise, keep {keep:.0%} of all rows; scoring took {score_s:.0f}s")
    print_table(table, ["method", "kept", "recall", "strict", *ALL_NOISE_KINDS])
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 rows instead of 1000")
    args = parser.parse_args(argv)
    run(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
