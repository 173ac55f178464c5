"""The pure parts of bench/data_noise_recall.py (no Ray, no model): what counts as removed, what a method
could choose from, random's expectation, which methods need reference answers, the cost ratios, and the
record written before the first measurement with the targets' history."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import data_noise_recall as nr

from frugalray.benchmarking import write_plan, write_result
from frugalray.budget.flops import ModelShape, train_flops_per_token

SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=100,
                   gated_mlp=True)


def row(row_id: str, kind: str = "none", duplicate_of: str = "") -> dict:
    return {"id": row_id, "noise_kind": kind, "duplicate_of": duplicate_of}


# c1..c4 clean; one row of each noise kind; e1 (the empty response) is quarantined by the loader.
SOURCE = [row("c1"), row("c2"), row("c3"), row("c4"), row("w1", "wrong_answer"), row("g1", "garbled"),
          row("e1", "empty_response"), row("x1", "exact_duplicate", "c1"), row("n1", "near_duplicate", "c2")]
AMONG = {r["id"] for r in SOURCE} - {"e1"}


def test_recall_counts_quarantine_as_removed_overall_but_not_among_choosable_rows():
    # x1 and its source both kept: duplication stays. n1 kept but its source c2 dropped: duplication gone
    # (pair), the labelled copy itself kept (strict). w1 kept, g1 dropped.
    kept = {"c1", "c3", "c4", "w1", "x1", "n1"}
    overall = nr.recall(SOURCE, kept)
    assert (overall["noisy"], overall["recall"], overall["recall_strict"]) == (5, 3 / 5, 2 / 5)  # g1, e1, n1 / g1, e1
    choosable = nr.recall(SOURCE, kept, AMONG)
    assert (choosable["noisy"], choosable["recall"], choosable["recall_strict"]) == (4, 2 / 4, 1 / 4)  # g1, n1 / g1
    assert choosable["per_kind"]["empty_response"] == {"n": 0, "strict": None, "recall": None}
    assert overall["per_kind"]["near_duplicate"] == {"n": 1, "strict": 0.0, "recall": 1.0}
    assert overall["per_kind"]["exact_duplicate"]["recall"] == 0.0


def test_a_duplicate_whose_source_never_reached_selection_is_not_choosable():
    source = [*SOURCE, row("c5"), row("x2", "exact_duplicate", "c5")]
    among = AMONG | {"x2"}  # c5 quarantined
    assert {r["id"] for r in nr.noisy_rows(source, among)} == {"w1", "g1", "x1", "n1"}
    assert {r["id"] for r in nr.noisy_rows(source)} == {"w1", "g1", "e1", "x1", "n1", "x2"}


def test_quarantine_is_reported_apart_and_clean_rows_lost_are_counted():
    summary = nr.quarantine_summary([*SOURCE, row("c5")], AMONG)
    assert summary == {"quarantined_noisy_rows": 1, "quarantined_clean_rows": 1, "quarantined_noisy_share": 1 / 5,
                       "quarantined_by_kind": {"empty_response": 1}}
    assert nr.clean_removed_share(SOURCE, {"c1", "c2", "c3"}, AMONG) == 1 / 4


def test_random_expectation_by_hand_and_by_simulation():
    # 10 choosable rows, 7 kept: a labelled row is removed with 3/10, a pair broken with 1 - 7*6/(10*9).
    source = [row(f"c{i}") for i in range(6)] + [row("w", "wrong_answer"), row("g", "garbled"),
                                                 row("x", "exact_duplicate", "c0"), row("n", "near_duplicate", "c1")]
    among = {r["id"] for r in source}
    expected = nr.expected_random_recall(source, among, 7)
    assert expected["recall_strict"] == pytest.approx(0.3)
    assert expected["recall"] == pytest.approx((2 * 0.3 + 2 * (1 - 42 / 90)) / 4)
    rng = random.Random(0)
    ids = sorted(among)
    draws = [nr.recall(source, set(rng.sample(ids, 7)), among)["recall"] for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(expected["recall"], abs=0.01)


def test_reference_answer_methods_are_derived_from_the_columns_they_read():
    methods = nr.methods()
    with_answers = {m for m, f in methods.items() if nr.uses_reference_answers(f)}
    assert with_answers == {"verifier", "combination_with_answers"}
    assert nr.method_scorers(methods[nr.PRIMARY_METHOD]) == ["perplexity", "heuristics", "duplicates"]
    assert nr.method_scorers(methods["random"]) == []
    assert nr.method_scorers(methods["ifd"]) == ["ifd"]
    assert nr.method_scorers(methods["combination_with_answers"]) == ["perplexity", "heuristics", "verifier",
                                                                      "duplicates"]
    with pytest.raises(ValueError, match="mystery"):
        nr.method_scorers({"strategy": "lowest", "score": "mystery"})


def test_the_primary_must_be_label_free(monkeypatch):
    primary = nr.primary_config({"dedup": {"threshold": 0.7}})
    assert primary["method"] == "combination_label_free" and primary["keep_of_all_rows"] == 0.7
    assert primary["metric"] in nr.TARGETS and primary["target"] == ">= 0.9"
    monkeypatch.setattr(nr, "PRIMARY_METHOD", "combination_with_answers")
    with pytest.raises(ValueError, match="reference answers"):
        nr.primary_config({})


def test_train_flops_truncate_each_row_to_seq_len():
    flops = nr.train_flops(SHAPE, [10, 200], seq_len=128, method="lora", lora_params=50)
    by_hand = (train_flops_per_token(SHAPE, 10, "lora", 50) * 10 + train_flops_per_token(SHAPE, 128, "lora", 50) * 128)
    assert flops == pytest.approx(by_hand)
    assert nr.ratio(None, 2.0) is None and nr.ratio(1.0, 0.0) is None and nr.ratio(1.0, 4.0) == 0.25


def test_method_metrics_give_every_headline_metric_with_count_and_cost_side_by_side():
    from readme_table import REGISTRY

    kept = [{"id": i} for i in ("c1", "c3", "c4", "w1", "x1", "n1")]
    metrics = nr.method_metrics(nr.PRIMARY_METHOD, SOURCE, kept, AMONG, n_rows=len(SOURCE),
                                kept_train_flops=30.0, train_flops_all=120.0, selection_flops=12.0)
    assert set(REGISTRY["data_noise_recall"].primary) <= set(metrics)
    assert metrics[f"recall_{nr.PRIMARY_METHOD}"] == 0.6 and metrics[f"recall_{nr.PRIMARY_METHOD}_choosable"] == 0.5
    assert metrics[f"kept_rows_fraction_{nr.PRIMARY_METHOD}"] == round(6 / 9, 4)
    assert metrics[f"kept_train_flops_fraction_{nr.PRIMARY_METHOD}"] == 0.25
    assert metrics[f"selection_over_train_flops_{nr.PRIMARY_METHOD}"] == 0.1
    random_metrics = nr.method_metrics("random", SOURCE, kept, AMONG, len(SOURCE), 30.0, 120.0, 0.0)
    assert set(nr.TARGETS) <= set(metrics) | set(random_metrics)


def test_plan_record_keeps_the_targets_and_the_history_explains_every_change(tmp_path):
    # The record as committed at 0cee4f6: one target, on the method that reads the reference answers.
    previous = {"bench": nr.NAME, "metrics": {"recall_combination": 0.995},
                "targets": {"recall_combination": ">= 0.9"}, "met": {"recall_combination": True}}
    (tmp_path / f"{nr.NAME}.json").write_text(json.dumps(previous))
    write_plan(nr.NAME, {"primary": {"method": nr.PRIMARY_METHOD}}, tmp_path)
    planned = json.loads((tmp_path / f"{nr.NAME}.json").read_text())
    assert planned["status"] == "running" and planned["config"]["primary"]["method"] == nr.PRIMARY_METHOD
    assert planned["targets"] == previous["targets"] and "metrics" not in planned  # no stale numbers left
    metrics = {"recall_combination_label_free": 0.8, "recall_random_choosable": 0.39}
    with pytest.raises(ValueError, match="recall_combination"):
        write_result(nr.NAME, {}, metrics, nr.TARGETS, out_dir=tmp_path)
    result = write_result(nr.NAME, {}, metrics, nr.TARGETS, out_dir=tmp_path, targets_history=nr.TARGETS_HISTORY)
    history = {(e["metric"], e["old"], e["new"]): e for e in result["targets_history"]}
    assert ("recall_combination", ">= 0.9", None) in history
    assert ("recall_combination_label_free", None, ">= 0.9") in history
    assert history[("recall_random", "<= 0.4", None)]["commit"] == "0cee4f6"
    assert ("recall_random_choosable", None, "<= 0.4") in history
    assert result["met"] == {"recall_combination_label_free": False, "recall_random_choosable": True}
