"""Selection by score: budgets are never exceeded, counts add up, reports are truthful."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, load_config, parse_config
from frugalray.examples.loaders import FieldMapping, load_records
from frugalray.data.score import ScoreConfig
from frugalray.data.ranking import curriculum_order, select_rows
from frugalray.data.select import SelectConfig, run_select

REPO = Path(__file__).resolve().parents[2]

score_values = st.one_of(
    st.floats(min_value=1.0, max_value=1e4, allow_nan=False),
    st.just(math.nan),
)
rows_strategy = st.lists(
    st.fixed_dictionaries({"perplexity": score_values, "n_tokens": st.integers(min_value=1, max_value=300)}),
    max_size=60,
).map(lambda rows: [{**r, "id": str(i)} for i, r in enumerate(rows)])


@settings(max_examples=200, deadline=None)
@given(
    rows=rows_strategy,
    budget=st.integers(min_value=1, max_value=5000),
    strategy=st.sampled_from(["lowest", "highest", "random"]),
    seed=st.integers(0, 5),
)
def test_token_budget_never_exceeded_and_counts_add_up(rows, budget, strategy, seed):
    sel = select_rows(rows, strategy=strategy, token_budget=budget, seed=seed)
    assert sel.kept_tokens == sum(r["n_tokens"] for r in sel.kept) <= budget
    assert len(sel.kept) + len(sel.dropped) == len(rows)
    assert sorted(r["id"] for r in sel.kept + sel.dropped) == sorted(r["id"] for r in rows)
    assert all(math.isfinite(r["perplexity"]) for r in sel.kept)
    # First-fit: an eligible row was dropped only because it did not fit at its turn, and the
    # kept total only grows, so it cannot fit in what is left at the end either.
    for r in sel.dropped:
        if math.isfinite(r["perplexity"]):
            assert sel.kept_tokens + r["n_tokens"] > budget


@settings(max_examples=200, deadline=None)
@given(rows=rows_strategy, fraction=st.floats(min_value=0.01, max_value=1.0), strategy=st.sampled_from(["lowest", "highest"]))
def test_keep_fraction_keeps_the_extreme_scores(rows, fraction, strategy):
    sel = select_rows(rows, strategy=strategy, keep_fraction=fraction)
    finite = [r for r in rows if math.isfinite(r["perplexity"])]
    assert len(sel.kept) == min(len(finite), round(fraction * len(rows)))
    assert len(sel.kept) + len(sel.dropped) == len(rows)
    assert sel.unscored == len(rows) - len(finite)
    if sel.kept and len(sel.kept) < len(finite):
        kept_scores = [r["perplexity"] for r in sel.kept]
        dropped_scores = [r["perplexity"] for r in sel.dropped if math.isfinite(r["perplexity"])]
        if strategy == "lowest":
            assert max(kept_scores) <= min(dropped_scores)
        else:
            assert min(kept_scores) >= max(dropped_scores)


def test_token_budget_first_fit_and_random_is_seeded():
    rows = [{"id": str(i), "perplexity": float(i), "n_tokens": n} for i, n in enumerate([5, 8, 3, 4])]
    sel = select_rows(rows, strategy="lowest", token_budget=12)
    assert [r["id"] for r in sel.kept] == ["0", "2", "3"]  # row 1 (8 tokens) did not fit after row 0
    assert sel.kept_tokens == 12
    a = select_rows(rows, strategy="random", keep_fraction=0.5, seed=1)
    b = select_rows(rows, strategy="random", keep_fraction=0.5, seed=1)
    assert [r["id"] for r in a.kept] == [r["id"] for r in b.kept]
    with pytest.raises(ValueError, match="at least one"):
        select_rows(rows)
    both = select_rows(rows, strategy="lowest", keep_fraction=0.5, token_budget=12)  # both limits hold
    assert [r["id"] for r in both.kept] == ["0", "2"]


def test_select_config_needs_a_limit():
    base = {"input_path": "x", "output_path": "y.jsonl"}
    with pytest.raises(ConfigError) as err:
        parse_config(SelectConfig, base)
    assert "keep_fraction" in str(err.value) and "token_budget" in str(err.value) and "budget" in str(err.value)
    both = parse_config(SelectConfig, {**base, "keep_fraction": 0.5, "token_budget": 100})
    assert (both.keep_fraction, both.token_budget) == (0.5, 100)
    with pytest.raises(ConfigError, match="keep_fraction"):
        parse_config(SelectConfig, {**base, "keep_fraction": 1.5})
    with pytest.raises(ConfigError, match="strategy"):
        parse_config(SelectConfig, {**base, "keep_fraction": 0.5, "strategy": "median"})


def _scored_dir(tmp_path: Path) -> Path:
    kinds = ["none"] * 6 + ["garbled", "wrong_answer", "exact_duplicate", "none"]
    rows = [
        {"id": f"r{i}", "prompt": f"What is {i} + 1?", "response": str(i + 1), "answer": str(i + 1),
         "noise_kind": kind, "perplexity": 100.0 if kind == "garbled" else 2.0 + i, "n_tokens": 10 + i}
        for i, kind in enumerate(kinds)
    ]
    rows[-1]["perplexity"] = math.nan  # an unscorable row
    out = tmp_path / "scored"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:5]), out / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:]), out / "b.parquet")
    return out


def test_run_select_writes_subset_report_and_ledger(tmp_path):
    cfg = SelectConfig(input_path=str(_scored_dir(tmp_path)), output_path=str(tmp_path / "sel" / "kept.jsonl"),
                       keep_fraction=0.5)
    result = run_select(cfg, tmp_path / "run")
    assert (result.rows_in, result.kept, result.dropped) == (10, 5, 5)
    kept = [json.loads(line) for line in Path(result.output_path).read_text().splitlines()]
    assert [r["id"] for r in kept] == ["r0", "r1", "r2", "r3", "r4"]
    assert result.kept_tokens == sum(r["n_tokens"] for r in kept)
    # Training reads the subset with the prompt/response mapping.
    loaded = load_records(result.output_path, FieldMapping.prompt_response())
    assert len(loaded.rows) == 5 and loaded.rows[0]["prompt"] == "What is 0 + 1?"
    report = json.loads(Path(result.report_path).read_text())
    assert report["noise"]["garbled"] == {"in": 1, "dropped": 1, "kept": 0}
    assert report["noise"]["none"]["in"] == 7 and report["unscored_dropped"] == 1
    assert report["kept_score"] == {"min": 2.0, "max": 6.0}
    (entry,) = ComputeLedger(tmp_path / "run").entries()
    assert entry["stage"] == "select" and entry["flops"] == 0.0 and entry["kept"] == 5


def test_run_select_token_budget_and_unknown_score_column(tmp_path):
    scored = _scored_dir(tmp_path)
    result = run_select(
        SelectConfig(input_path=str(scored), output_path=str(tmp_path / "k.jsonl"), token_budget=40), tmp_path
    )
    assert result.kept_tokens <= 40 and result.kept + result.dropped == 10
    with pytest.raises(ConfigError) as err:
        run_select(SelectConfig(input_path=str(scored), output_path=str(tmp_path / "k.jsonl"), score="ifd",
                                keep_fraction=0.5), tmp_path)
    assert "score: column 'ifd' not in" in str(err.value) and "perplexity" in str(err.value)
    with pytest.raises(ConfigError, match="input_path"):
        run_select(SelectConfig(input_path=str(tmp_path / "none"), output_path=str(tmp_path / "k.jsonl"),
                                keep_fraction=0.5), tmp_path)


def test_shipped_data_job_configs_validate():
    """Every shipped YAML of the data stages loads and validates."""
    score = load_config(ScoreConfig, REPO / "jobs" / "configs" / "score.yaml")
    assert score.input_path == "runs/data/tasks.jsonl"
    select = load_config(SelectConfig, REPO / "jobs" / "configs" / "select.yaml")
    assert select.input_path == score.output_path
    for name in ("score.yaml", "select.yaml"):
        first = (REPO / "jobs" / "configs" / name).read_text().splitlines()[0]
        assert first.startswith("# python jobs/") and f"--config jobs/configs/{name}" in first
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(ScoreConfig, REPO / "jobs" / "configs" / "score.yaml", ["batch_size=0"])


# --- strategies beyond lowest/highest/random ------------------------------------------------

multi_rows = st.lists(
    st.fixed_dictionaries({
        "perplexity": score_values,
        "ifd": st.floats(min_value=0.0, max_value=2.0, allow_nan=False),
        "n_tokens": st.integers(min_value=1, max_value=300),
        "dup_cluster": st.integers(min_value=0, max_value=8),
    }),
    max_size=50,
).map(lambda rows: [{**r, "id": str(i)} for i, r in enumerate(rows)])
ALL_STRATEGIES = ["lowest", "highest", "random", "middle", "stratified", "weighted"]


@settings(max_examples=150, deadline=None)
@given(rows=multi_rows, budget=st.integers(min_value=1, max_value=4000), strategy=st.sampled_from(ALL_STRATEGIES),
       dedup=st.booleans(), fraction=st.one_of(st.none(), st.floats(min_value=0.01, max_value=1.0)))
def test_every_strategy_respects_budgets_dedup_and_accounts_for_every_row(rows, budget, strategy, dedup, fraction):
    weights = {"perplexity": 1.0, "ifd": -0.5}
    limit = {"keep_fraction": fraction} if fraction is not None else {"token_budget": budget}
    sel = select_rows(rows, strategy=strategy, weights=weights, strata=3,
                      cluster_column="dup_cluster" if dedup else None, **limit)
    assert len(sel.kept) + len(sel.dropped) == len(rows) == len(sel.kept) + len(sel.drop_reasons)
    assert sorted(r["id"] for r in sel.kept + sel.dropped) == sorted(r["id"] for r in rows)
    assert sel.kept_tokens == sum(r["n_tokens"] for r in sel.kept)
    if fraction is None:
        assert sel.kept_tokens <= budget
    else:
        assert len(sel.kept) <= round(fraction * len(rows))
    assert all(math.isfinite(r["perplexity"]) for r in sel.kept)
    if dedup:
        assert len({r["dup_cluster"] for r in sel.kept}) == len(sel.kept)
    for row, reason in zip(sel.dropped, sel.drop_reasons):
        assert reason in ("unscorable", "duplicate", "budget")
        assert (reason == "unscorable") == (not math.isfinite(row["perplexity"]))
        if reason == "duplicate":  # its cluster is represented among the eligible rows
            assert dedup


def _ranked(n):
    return [{"id": str(i), "perplexity": float(v), "n_tokens": 1} for i, v in enumerate(random.Random(n).sample(range(100), n))]


def test_middle_band_drops_both_tails():
    rows = _ranked(10)
    sel = select_rows(rows, strategy="middle", keep_fraction=0.6)
    values = sorted(r["perplexity"] for r in rows)
    assert sorted(r["perplexity"] for r in sel.kept) == values[2:8]


def test_stratified_covers_every_quantile_bin():
    rows = [{"id": str(i), "perplexity": float(i), "n_tokens": 1} for i in range(100)]
    sel = select_rows(rows, strategy="stratified", keep_fraction=0.2, strata=5, seed=3)
    bins = Counter(int(r["perplexity"]) // 20 for r in sel.kept)
    assert bins == {b: 4 for b in range(5)}
    lowest = select_rows(rows, strategy="lowest", keep_fraction=0.2)
    assert max(r["perplexity"] for r in lowest.kept) < 20  # what stratification avoids


def test_weighted_rank_combines_scores():
    rows = [{"id": str(i), "a": float(i), "b": float(9 - i), "n_tokens": 1} for i in range(10)]
    only_a = select_rows(rows, strategy="weighted", weights={"a": 1.0}, keep_fraction=0.3)
    assert [r["id"] for r in only_a.kept] == ["0", "1", "2"]
    # b is a's mirror: preferring high b is preferring low a.
    agree = select_rows(rows, strategy="weighted", weights={"a": 1.0, "b": -1.0}, keep_fraction=0.3)
    assert [r["id"] for r in agree.kept] == ["0", "1", "2"]
    high_b_wins = select_rows(rows, strategy="weighted", weights={"a": 1.0, "b": 3.0}, keep_fraction=0.3)
    assert [r["id"] for r in high_b_wins.kept] == ["9", "8", "7"]


def test_dedup_keeps_the_best_ranked_row_of_each_cluster_and_curriculum_orders_easy_to_hard():
    rows = [{"id": str(i), "perplexity": p, "n_tokens": 1, "dup_cluster": c}
            for i, (p, c) in enumerate([(5.0, 0), (1.0, 0), (3.0, 2), (2.0, 3), (4.0, 3)])]
    sel = select_rows(rows, strategy="lowest", keep_fraction=1.0, cluster_column="dup_cluster")
    assert [r["id"] for r in sel.kept] == ["1", "3", "2"]
    assert dict(zip((r["id"] for r in sel.dropped), sel.drop_reasons)) == {"0": "duplicate", "4": "duplicate"}
    ordered = curriculum_order(sel.kept + [{"id": "x", "perplexity": math.nan}], "perplexity")
    assert [(r["id"], r["curriculum_rank"]) for r in ordered] == [("1", 0), ("3", 1), ("2", 2), ("x", 3)]


def _scored_with_sidecar(tmp_path: Path, rows_in: int, quarantined: int) -> Path:
    scored = _scored_dir(tmp_path)
    (tmp_path / "scored_scores.json").write_text(json.dumps({"rows_in": rows_in, "rows_quarantined": quarantined}))
    return scored


def test_run_select_accounts_for_every_row_and_writes_histograms_and_examples(tmp_path):
    scored = _scored_with_sidecar(tmp_path, rows_in=12, quarantined=2)
    cfg = SelectConfig(input_path=str(scored), output_path=str(tmp_path / "kept.jsonl"), keep_fraction=0.5,
                       strategy="middle", curriculum="perplexity")
    result = run_select(cfg, tmp_path / "run")
    assert (result.source_rows_in, result.kept, result.dropped, result.quarantined) == (12, 5, 5, 2)
    assert result.drop_reasons == {"unscorable": 1, "budget": 4}
    kept = [json.loads(line) for line in Path(result.output_path).read_text().splitlines()]
    assert [r["curriculum_rank"] for r in kept] == list(range(5))
    assert [r["perplexity"] for r in kept] == sorted(r["perplexity"] for r in kept)
    report = json.loads(Path(result.report_path).read_text())
    assert set(report["drop_examples"]) == {"unscorable", "budget"}
    assert report["drop_examples"]["unscorable"][0]["id"] == "r9"
    assert {Path(p).name for p in result.histogram_paths} == {"kept_hist_perplexity.png", "kept_hist_n_tokens.png"}
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in result.histogram_paths)
    # A stale or partial scoring output cannot pass the accounting check.
    (tmp_path / "scored_scores.json").write_text(json.dumps({"rows_in": 13, "rows_quarantined": 2}))
    with pytest.raises(RuntimeError, match="row accounting"):
        run_select(cfg, tmp_path / "run")


def test_select_config_checks_strategy_columns(tmp_path):
    scored = _scored_dir(tmp_path)
    with pytest.raises(ConfigError, match="weights"):
        parse_config(SelectConfig, {"input_path": "x", "output_path": "y.jsonl", "keep_fraction": 0.5,
                                    "strategy": "weighted"})
    with pytest.raises(ConfigError) as err:
        run_select(SelectConfig(input_path=str(scored), output_path=str(tmp_path / "k.jsonl"), keep_fraction=0.5,
                                dedup=True, curriculum="ifd"), tmp_path)
    assert "cluster_column: column 'dup_cluster'" in str(err.value) and "curriculum: column 'ifd'" in str(err.value)
