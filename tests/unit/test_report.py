import csv
import json

import pytest
from frugalray.budget.ledger import ComputeLedger
from frugalray.report import collect_report_data, sweep_frontier, write_report


def _write_trial(root, name, config, rows):
    trial = root / "sweep" / "ray_tune" / "exp" / name
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(config))
    with open(trial / "progress.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["flops", "eval_loss", "timestamp"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def run_dir(tmp_path):
    ledger = ComputeLedger(tmp_path)
    quarantine = tmp_path / "scored_quarantine.jsonl"
    quarantine.write_text("\n".join(json.dumps({"id": i, "quarantine_reason": reason}) for i, reason in
                                    enumerate(["empty response: blank", "empty response: blank", "too long: 900 > 512"])))
    ledger.record("score", flops=3e12, tokens=1000, wall_s=10,
                  produced={"quarantine_path": str(quarantine)}, rows_in=20, rows_quarantined=3)
    ledger.record("select", flops=0.0, kept=10, dropped=7, quarantined=3, rows_in=17,
                  drop_reasons={"budget": 5, "duplicate": 2})
    ledger.record("finetune", flops=5e12, tokens=2000, wall_s=30)
    ledger.record("sweep", flops=1e12, tokens=300, wall_s=20)
    ledger.record("sweep", flops=0.5e12, tokens=100, wall_s=5)  # a resumed sweep appends a second record
    ledger.record("serve", flops=2e11, produced={"accuracy_base": 0.4, "flops_per_query_base": 1e9,
                                                 "accuracy_finetuned": 0.6, "flops_per_query_finetuned": 1.1e9})
    _write_trial(tmp_path, "t0", {"lr": 0.001}, [{"flops": 1e11, "eval_loss": 2.0, "timestamp": 1},
                                                  {"flops": 2e11, "eval_loss": 1.5, "timestamp": 2}])
    _write_trial(tmp_path, "t1", {"lr": 0.01}, [{"flops": 1e11, "eval_loss": 1.8, "timestamp": 3},
                                                 {"flops": 3e11, "eval_loss": "inf", "timestamp": 4}])
    return tmp_path


def test_totals_and_data_outcome_add_up(run_dir):
    data = collect_report_data(run_dir)
    assert data.total_flops == pytest.approx(3e12 + 5e12 + 1.5e12 + 2e11)
    assert data.stages["sweep"]["records"] == 2 and data.stages["sweep"]["flops"] == pytest.approx(1.5e12)
    assert data.totals_add_up
    assert data.data_outcome == {"quarantined: empty response": 2, "quarantined: too long": 1, "kept": 10,
                                 "dropped: budget": 5, "dropped: duplicate": 2}
    assert data.rows_in == 20 and data.data_adds_up
    assert [p["label"] for p in data.serving_points] == ["base", "finetuned"]


def test_frontier_is_serial_spend_and_running_best(run_dir):
    data = collect_report_data(run_dir)
    assert [t.config for t in data.trials] == [{"lr": 0.001}, {"lr": 0.01}]
    xs, ys = sweep_frontier(data.trials)
    # the non-finite report of t1 is skipped; spend accumulates per trial increments
    assert xs == pytest.approx([1e11, 2e11, 3e11])
    assert ys == [2.0, 1.5, 1.5]


def test_a_trial_counts_with_its_last_report_not_its_best():
    from frugalray.report import TrialCurve

    # t0 dips to 0.9 and ends at 1.6; t1 ends at 1.2: the sweep's best trial is t1 (1.2), as in the summary.
    trials = [TrialCurve("t0", {"lr": 1}, [1e11, 2e11, 3e11], [2.0, 0.9, 1.6], 0.0),
              TrialCurve("t1", {"lr": 2}, [1e11, 2e11], [1.5, 1.2], 1.0)]
    xs, ys = sweep_frontier(trials)
    assert ys == [2.0, 0.9, 1.6, 1.5, 1.2]


def test_write_report_makes_markdown_and_plots(run_dir):
    path = write_report(run_dir)
    text = path.read_text()
    assert "Stage totals vs ledger total: OK" in text
    assert "adds up" in text and "| dropped: duplicate | 2 |" in text
    for png in ("report_flops_by_stage.png", "report_data.png", "report_loss_vs_flops.png",
                "report_sweep_frontier.png", "report_serving.png"):
        assert (run_dir / png).stat().st_size > 1000, png
        assert png in text


def test_missing_counts_are_reported_not_hidden(run_dir):
    (run_dir / "scored_quarantine.jsonl").unlink()
    data = collect_report_data(run_dir)
    assert data.data_outcome["quarantined: reason file unavailable"] == 3
    assert data.data_adds_up


def test_report_without_ledger_names_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="RUN_DIR"):
        collect_report_data(tmp_path)
