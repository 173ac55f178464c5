"""A rerun of the pipeline into the same run_dir starts a fresh ledger and keeps the old one."""

from __future__ import annotations

from frugalray.budget.ledger import ComputeLedger
from frugalray.pipeline import set_aside_previous_ledger


def test_previous_ledger_is_kept_under_another_name_and_the_new_one_starts_empty(tmp_path):
    assert set_aside_previous_ledger(tmp_path) is None
    ComputeLedger(tmp_path).record("score", flops=3.0)
    kept = set_aside_previous_ledger(tmp_path)
    assert kept is not None and kept.exists() and "score" in kept.read_text()
    assert not (tmp_path / "ledger.jsonl").exists()
    ComputeLedger(tmp_path).record("score", flops=3.0)
    assert (tmp_path / "ledger.jsonl").read_text().count("score") == 1
