"""Budgets of `select`: the knapsack over lengths, the FLOP budget, filters; none is ever exceeded."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugalray.budget.flops import ModelShape, train_flops_per_token
from frugalray.config import ConfigError, load_config, parse_config
from frugalray.data.ranking import filter_reasons, pack_by_preference, select_rows
from frugalray.data.select import SelectConfig, TrainingFlopBudget, flop_budget_tokens, run_select
from frugalray.data.selection_report import markdown_report

REPO = Path(__file__).resolve().parents[2]
# A small Llama-shaped model: the FLOP arithmetic is the same as for a real one.
SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=1000)


def first_fit(sizes, capacity):
    kept, used = [], 0
    for k, n in enumerate(sizes):
        if used + n <= capacity:
            kept.append(k)
            used += n
    return kept


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), max_size=14), capacity=st.integers(0, 300),
       max_items=st.one_of(st.none(), st.integers(0, 14)))
def test_pack_never_exceeds_keeps_the_prefix_and_leaves_no_fitting_row(sizes, capacity, max_items):
    kept = pack_by_preference(sizes, capacity, max_items)
    used = sum(sizes[k] for k in kept)
    assert used <= capacity and kept == sorted(set(kept))
    if max_items is not None:
        assert len(kept) <= max_items
    prefix = []
    for k, n in enumerate(sizes):  # the best-ranked rows that fit in order are always kept
        if sum(sizes[j] for j in prefix) + n > capacity or (max_items is not None and len(prefix) >= max_items):
            break
        prefix.append(k)
    assert kept[: len(prefix)] == prefix
    if max_items is None or len(kept) < max_items:
        assert all(used + sizes[k] > capacity for k in range(len(sizes)) if k not in kept)
    if max_items is None:
        # Exact fill: no subset holding the prefix fills more, and never less than first fit.
        rest = [k for k in range(len(sizes)) if k not in prefix]
        left = capacity - sum(sizes[k] for k in prefix)
        best = max(
            (sum(sizes[k] for k in combo) for r in range(len(rest) + 1) for combo in itertools.combinations(rest, r)
             if sum(sizes[k] for k in combo) <= left),
            default=0,
        )
        assert used - sum(sizes[k] for k in prefix) == best
        assert used >= sum(sizes[k] for k in first_fit(sizes, capacity))


def test_knapsack_beats_first_fit_and_prefers_better_ranked_rows():
    # Prefix [6]; 8 does not fit; 7 left: first fit takes 5 and strands 2, the knapsack fills 4 + 3.
    assert pack_by_preference([6, 8, 5, 4, 3], 13) == [0, 3, 4]
    assert first_fit([6, 8, 5, 4, 3], 13) == [0, 2]
    # Two exact fills of the 4 left (2 + 2 or 4): the one holding the best-ranked candidate wins.
    assert pack_by_preference([6, 8, 2, 4, 2], 10) == [0, 2, 4]
    assert pack_by_preference([6, 8, 4, 2, 2], 10) == [0, 2]
    assert pack_by_preference([5, 5], None, max_items=1) == [0]


def test_flop_budget_converts_through_the_flop_module():
    budget = TrainingFlopBudget(flops=1e12, epochs=2, method="lora", lora_rank=4, target_modules=["q_proj", "v_proj"],
                        seq_len=64)
    tokens, per_token = flop_budget_tokens(budget, SHAPE)
    assert per_token == train_flops_per_token(SHAPE, 64, "lora", SHAPE.lora_params(4, ["q_proj", "v_proj"]))
    assert tokens == math.floor(1e12 / (2 * per_token))
    assert tokens * 2 * per_token <= 1e12 < (tokens + 1) * 2 * per_token
    with pytest.raises(ValueError, match="target_modules"):
        flop_budget_tokens(budget.model_copy(update={"target_modules": ["nope"]}), SHAPE)


score_values = st.one_of(st.floats(min_value=0.5, max_value=1e4, allow_nan=False), st.just(math.nan),
                         st.just(math.inf))
rows_strategy = st.lists(
    st.fixed_dictionaries({
        "perplexity": score_values,
        "ifd": st.one_of(st.floats(0.0, 3.0), st.just(math.nan)),
        "n_tokens": st.integers(min_value=0, max_value=400),
        "dup_cluster": st.integers(min_value=0, max_value=10),
        "garbage_ratio": st.floats(0.0, 1.0),
        "degenerate_reason": st.sampled_from(["", "", "", "empty", "repetitive"]),
    }),
    max_size=40,
).map(lambda rows: [{**r, "id": str(i)} for i, r in enumerate(rows)])


@settings(max_examples=250, deadline=None)
@given(
    rows=rows_strategy,
    fraction=st.one_of(st.none(), st.floats(min_value=0.01, max_value=1.0)),
    tokens=st.one_of(st.none(), st.integers(1, 5000)),
    flops=st.one_of(st.none(), st.floats(min_value=1e7, max_value=1e11)),
    epochs=st.sampled_from([0.5, 1.0, 3.0]),
    seq_len=st.sampled_from([8, 64, 256]),
    strategy=st.sampled_from(["lowest", "highest", "random", "middle", "stratified", "weighted"]),
    dedup=st.booleans(),
    drop_degenerate=st.booleans(),
    max_garbage=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_selection_never_exceeds_any_budget_and_every_row_is_accounted_for(
    rows, fraction, tokens, flops, epochs, seq_len, strategy, dedup, drop_degenerate, max_garbage
):
    if fraction is None and tokens is None and flops is None:
        fraction = 0.5
    limit, cap, per_token = tokens, None, None
    if flops is not None:
        budget = TrainingFlopBudget(flops=flops, epochs=epochs, method="lora", lora_rank=2, seq_len=seq_len)
        flop_tokens, per_token = flop_budget_tokens(budget, SHAPE)
        limit, cap = (flop_tokens if tokens is None else min(tokens, flop_tokens)), seq_len
    if fraction is None and limit is None:
        return
    excluded = filter_reasons(rows, drop_degenerate, max_garbage)
    sel = select_rows(rows, strategy=strategy, keep_fraction=fraction, token_budget=limit, token_cap=cap,
                      weights={"perplexity": 1.0, "ifd": -1.0}, strata=3, excluded=excluded,
                      cluster_column="dup_cluster" if dedup else None)
    # Counts add up: rows_in = kept + dropped (+ quarantined upstream), every row once, each drop with a reason.
    assert len(sel.kept) + len(sel.dropped) == len(rows) == len(sel.kept) + len(sel.drop_reasons)
    assert sorted(r["id"] for r in sel.kept + sel.dropped) == sorted(r["id"] for r in rows)
    costs = [min(r["n_tokens"], cap) if cap else r["n_tokens"] for r in sel.kept]
    assert sel.kept_tokens == sum(costs)
    if fraction is not None:
        assert len(sel.kept) <= round(fraction * len(rows))
    if tokens is not None:  # in the budget's units: tokens training reads (capped at seq_len under a FLOP budget)
        assert sel.kept_tokens <= tokens
    if flops is not None:
        assert epochs * sel.kept_tokens * per_token <= flops  # the training that follows fits its FLOP budget
    scores = ["perplexity", "ifd"] if strategy == "weighted" else ([] if strategy == "random" else ["perplexity"])
    for row in sel.kept:
        assert all(math.isfinite(row[s]) for s in scores)
        assert not (drop_degenerate and row["degenerate_reason"])
        assert max_garbage is None or row["garbage_ratio"] <= max_garbage
    if dedup:
        assert len({r["dup_cluster"] for r in sel.kept}) == len(sel.kept)
    for row, reason in zip(sel.dropped, sel.drop_reasons):
        assert reason in ("unscorable", "degenerate", "garbage", "duplicate", "budget")


def _scored(tmp_path: Path) -> Path:
    rows = [
        {"id": f"r{i}", "prompt": f"What is {i} + 1?", "response": resp, "perplexity": 2.0 + i, "n_tokens": 20 + i,
         "garbage_ratio": g, "degenerate_reason": d, "noise_kind": kind}
        for i, (resp, g, d, kind) in enumerate([
            ("1", 0.0, "", "none"), ("2", 0.0, "", "none"), ("#%&*", 1.0, "", "garbled"), ("4", 0.0, "", "none"),
            ("a a a a a a a a a", 0.0, "repetitive", "garbled"), ("6", 0.0, "", "none"), ("7", 0.0, "", "none"),
            ("8", 0.0, "", "none"),
        ])
    ]
    out = tmp_path / "scored"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), out / "part.parquet")
    return out


def test_run_select_flop_budget_filters_and_markdown_report(tmp_path, default_model_path):
    scored = _scored(tmp_path)
    cfg = parse_config(SelectConfig, {
        "input_path": str(scored), "output_path": str(tmp_path / "kept.jsonl"),
        "budget": {"flops": 1.0, "epochs": 1}, "histograms": False,
    })
    with pytest.raises(ConfigError, match="budget.flops"):
        run_select(cfg, tmp_path / "run")
    shape = ModelShape.from_hf_config(json.loads((Path(default_model_path) / "config.json").read_text()))
    per_token = flop_budget_tokens(TrainingFlopBudget(flops=1.0), shape)[1]
    cfg = parse_config(SelectConfig, {
        "input_path": str(scored), "output_path": str(tmp_path / "kept.jsonl"), "histograms": False,
        "budget": {"flops": per_token * 70.5 * 2, "epochs": 2}, "drop_degenerate": True, "max_garbage_ratio": 0.5,
    })
    result = run_select(cfg, tmp_path / "run")
    assert result.token_limit == 70 and result.kept_tokens <= 70
    assert result.train_flops == result.kept_tokens * per_token * 2 <= cfg.budget.flops
    # Eligible by perplexity: r0 (20), r1 (21), r3 (23) = 64; r5 (25) no longer fits, nor does any later row.
    kept = [json.loads(line)["id"] for line in Path(result.output_path).read_text().splitlines()]
    assert kept == ["r0", "r1", "r3"] and result.kept_tokens == 64
    assert result.drop_reasons["garbage"] == 1 and result.drop_reasons["degenerate"] == 1
    report = json.loads(Path(result.report_path).read_text())
    assert report["drop_examples"]["garbage"][0]["id"] == "r2"
    assert report["drop_examples"]["degenerate"][0]["degenerate_reason"] == "repetitive"
    assert report["noise"]["garbled"] == {"in": 2, "dropped": 2, "kept": 0}
    md = Path(result.markdown_report_path).read_text()
    assert "### garbage: examples" in md and "| r2 |" in md and "rows in: 8 = kept" in md


def test_one_epoch_flops_scales_the_proxy_cost_per_token_to_the_kept_rows():
    from frugalray.data.auto_select import CandidateResult, one_epoch_flops

    trained = CandidateResult("keep-easy", "lowest", "perplexity", kept=40, kept_tokens=4000, train_rows=40,
                              steps=2, train_tokens=500, train_flops=3e12)
    assert one_epoch_flops(trained) == pytest.approx(4000 * 3e12 / 500)
    skipped = CandidateResult("by-ifd", "lowest", "ifd", 0, 0, 0, skipped="no ifd column")
    assert one_epoch_flops(skipped) is None


def test_markdown_report_shows_auto_table():
    report = {
        "strategy": "lowest", "score": "perplexity", "rows_in": 3, "kept": 1, "dropped": 2, "kept_tokens": 5,
        "drop_reasons": {"budget": 2}, "drop_examples": {"budget": [{"id": "a", "prompt": "p|q", "perplexity": 3.0}]},
        "auto": {"winner": "keep-easy", "why": "keep-easy has the best held-out loss (1.2)", "heldout_source": "x",
                 "heldout_rows": 4, "flops": 1e9, "candidates": [
                     {"name": "keep-easy", "kept": 1, "kept_tokens": 5, "steps": 2, "train_flops": 1e8,
                      "eval_loss": 1.2, "accuracy": None, "skipped": None}]},
    }
    md = markdown_report(report)
    assert "Winner: **keep-easy**" in md and "| keep-easy | 1 | 5 | 2 |" in md and "p\\|q" in md


def test_shipped_select_configs_validate():
    for name in ("select.yaml", "select_budget.yaml", "select_auto.yaml"):
        path = REPO / "jobs" / "configs" / name
        cfg = load_config(SelectConfig, path)
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python jobs/select_data.py") and f"--config jobs/configs/{name}" in first
        assert cfg.output_path.endswith(".jsonl")
