"""`strategy: auto` on a tiny case: real proxy LoRA fine-tunes of the default model, in process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import parse_config
from frugalray.examples.generate import GenerateConfig, generate_tasks, make_eval_set, write_rows
from frugalray.data.ranking import select_rows
from frugalray.data.select import SelectConfig, run_select


# About 2 CPU-minutes (3 model loads, 2 LoRA steps each); much longer on a shared machine.
@pytest.mark.slow
def test_auto_strategy_runs_candidates_picks_the_best_and_costs_it(tmp_path, default_model_path):
    rows = generate_tasks(GenerateConfig(n_rows=10, max_digits=1, seed=5))
    for i, row in enumerate(rows):
        row["prompt"], row["n_tokens"] = row["instruction"], 30 + i
        # The "hard" half is garbage: keep-hard trains on it, keep-easy on clean answers.
        row["perplexity"] = 2.0 + i if i < 5 else 500.0 + i
        if i >= 5:
            row["response"] = "zq#x ~kk! wv"
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), scored / "part.parquet")
    heldout = write_rows(make_eval_set(4, seed=99, max_digits=1), tmp_path / "heldout.jsonl")
    cfg = parse_config(SelectConfig, {
        "input_path": str(scored), "output_path": str(tmp_path / "kept.jsonl"), "strategy": "auto",
        "keep_fraction": 0.5, "histograms": False,
        "auto": {"candidates": [{"name": "keep-easy", "strategy": "lowest"}, {"name": "keep-hard", "strategy": "highest"},
                                {"strategy": "random"}, {"name": "by-ifd", "strategy": "lowest", "score": "ifd"}],
                 "proxy": {"max_steps": 2, "batch_size": 2, "seq_len": 48, "learning_rate": 5e-3,
                           "target_modules": ["q_proj", "v_proj"]},
                 "eval_path": str(heldout), "eval_rows": 4, "model": default_model_path},
    })
    result = run_select(cfg, tmp_path / "run")
    report = json.loads(Path(result.report_path).read_text())
    auto = report["auto"]
    table = {c["name"]: c for c in auto["candidates"]}
    assert set(table) == {"keep-easy", "keep-hard", "random", "by-ifd"}
    assert table["by-ifd"]["skipped"] and table["by-ifd"]["eval_loss"] is None  # no ifd column: shown, not run
    ran = [c for c in auto["candidates"] if not c["skipped"]]
    assert all(c["steps"] == 2 and c["kept"] == 5 and c["train_flops"] > 0 and math.isfinite(c["eval_loss"]) for c in ran)
    best = min(ran, key=lambda c: c["eval_loss"])
    assert auto["winner"] == best["name"] and best["name"] in auto["why"]
    # Training on garbage must not beat training on the clean rows on a clean held-out set.
    assert table["keep-easy"]["eval_loss"] < table["keep-hard"]["eval_loss"]
    # The kept rows are the winner's selection under the same budget.
    winner = next(c for c in cfg.auto.candidates if c.label() == auto["winner"])
    expected = select_rows(rows, winner.score, winner.strategy, keep_fraction=0.5, seed=cfg.seed)
    kept = [json.loads(line)["id"] for line in Path(result.output_path).read_text().splitlines()]
    assert kept == [r["id"] for r in expected.kept] and result.strategy == winner.strategy
    # Every proxy FLOP is in the ledger, under the select stage.
    (entry,) = ComputeLedger(tmp_path / "run").entries()
    spent = sum(c["train_flops"] + c["eval_flops"] for c in ran)
    assert entry["stage"] == "select" and entry["flops"] == result.auto_flops == auto["flops"] > spent
    # What the proxy cost next to the training it selects for (one epoch on the kept rows).
    won = table[auto["winner"]]
    epoch = won["kept_tokens"] * won["train_flops"] / won["train_tokens"]
    assert auto["proxy_over_one_epoch"] == pytest.approx(auto["flops"] / epoch)
    assert "x one training epoch on the kept rows" in auto["why"]
    md = Path(result.markdown_report_path).read_text()
    assert "## strategy: auto" in md and "| keep-hard |" in md
