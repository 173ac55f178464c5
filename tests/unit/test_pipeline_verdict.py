"""The main job's verdict: paired accuracy difference with its interval, a loud line when fine-tuning
did not help (naming the likely cause), the exit code, and the served recipe's provenance (pure)."""

from __future__ import annotations

import pytest

from frugalray.data.score import ScoreResult
from frugalray.data.select import SelectResult
from frugalray.pipeline import finetune_verdict, served_recipe, summary_exit_code
from frugalray.stats import paired_difference
from frugalray.train.finetune import FinetuneConfig, FinetuneResult
from frugalray.tune.sweep import SweepResult, TrialSummary


def test_paired_difference_counts_and_interval():
    after = [1] * 30 + [0] * 10
    before = [1] * 20 + [0] * 20
    d = paired_difference(after, before)
    assert d.n == 40 and d.diff == pytest.approx(0.25)
    assert (d.a_only, d.b_only) == (10, 0)
    # 10 of 40 differences are 1, the rest 0: sd = sqrt(0.25 * 0.75 * 40 / 39)
    half = 1.959964 * (0.25 * 0.75 * 40 / 39) ** 0.5 / 40 ** 0.5
    assert (d.ci_low, d.ci_high) == pytest.approx((0.25 - half, 0.25 + half))
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([1, 0], [1])


def test_identical_answers_have_a_zero_width_interval():
    d = paired_difference([1, 0, 1], [1, 0, 1])
    assert d.diff == 0 and d.ci_low == d.ci_high == 0


def _finetune(first_loss: float, final_loss: float, eval_loss_before: float, eval_loss_after: float,
              flops: float = 0.0) -> FinetuneResult:
    """A finished finetune's result with the given losses (the rest as a short run reports them)."""
    return FinetuneResult(
        adapter_path="runs/pipeline/finetune/adapter", checkpoint_path="runs/pipeline/finetune/checkpoint",
        steps=2, losses=[first_loss, final_loss], first_loss=first_loss, final_loss=final_loss,
        eval_loss_before=eval_loss_before, eval_loss_after=eval_loss_after, tokens=512, flops=flops,
        train_flops=flops, eval_flops=0.0, wall_s=1.0, step_seconds=[0.5, 0.5], trainable_params=1000,
        compute_dtype="float32")


FT_LEARNED = _finetune(first_loss=1.3, final_loss=0.2, eval_loss_before=1.3, eval_loss_after=0.25)


def _sweep(best_config: dict | None, best_metric: float | None, trials: tuple[TrialSummary, ...] = (),
           flops_spent: float = 0.0, flop_cap: float = 3.0) -> SweepResult:
    return SweepResult(best_config=best_config, best_metric=best_metric, metric="eval_loss", mode="min",
                       flops_spent=flops_spent, flops_reserved=flops_spent, flops_released=0.0, flop_cap=flop_cap,
                       min_trial_flops=1.0, trials=list(trials), wall_s=1.0)


def _trial(config: dict, metric: float) -> TrialSummary:
    return TrialSummary(config=config, metric=metric, train_loss=metric, flops=1.0, reserved_flops=1.0,
                        tokens=64, steps=4, stopped_by_cap=False)


def test_a_significant_gain_helps():
    v = finetune_verdict(paired_difference([1] * 30 + [0] * 10, [1] * 10 + [0] * 30), 10, FT_LEARNED)
    assert v["helped"] and v["line"].startswith("fine-tuning helped: +50.0 points")
    assert v["cause"] is None


def test_accuracy_falling_is_called_out_with_the_cause():
    # The regression this verdict exists for: base 47.5% -> fine-tuned 5.0%, train loss barely moving.
    before = [1] * 19 + [0] * 21
    after = [1] * 2 + [0] * 38
    v = finetune_verdict(paired_difference(after, before), None,
                         _finetune(first_loss=4.61, final_loss=4.4, eval_loss_before=3.55, eval_loss_after=2.5))
    assert not v["helped"]
    assert v["line"].startswith("FINE-TUNING DID NOT HELP: -42.5 points")
    assert "training did not learn" in v["cause"]


def test_eval_loss_rising_and_noise_are_told_apart():
    worse = finetune_verdict(paired_difference([1, 0, 0, 0], [1, 1, 0, 0]), None,
                             _finetune(first_loss=2.0, final_loss=0.5, eval_loss_before=1.0, eval_loss_after=1.4))
    assert "got worse on the validation rows" in worse["cause"]
    noise = finetune_verdict(paired_difference([1, 1, 0, 0], [1, 0, 1, 0]), None, FT_LEARNED)
    assert not noise["helped"] and "within noise" in noise["cause"]
    short = finetune_verdict(paired_difference([1] * 24 + [0] * 16, [1] * 20 + [0] * 20), 20, FT_LEARNED)
    assert short["ci95_points"][0] > 0 and not short["helped"] and "below min_gain_points 20" in short["cause"]


def _summary(helped: bool, min_gain, ledger_ok: bool = True) -> dict:
    return {"ledger_matches_stages": ledger_ok, "verdict": {"helped": helped, "min_gain_points": min_gain}}


def test_exit_code_fails_the_job_only_when_a_gain_was_required():
    assert summary_exit_code(_summary(True, 10)) == 0
    assert summary_exit_code(_summary(False, 10)) == 3
    assert summary_exit_code(_summary(False, None)) == 0
    assert summary_exit_code(_summary(True, None, ledger_ok=False)) == 1


def test_served_recipe_names_the_winner_and_the_alternatives():
    ft = FinetuneConfig(data_path="runs/pipeline/selected.jsonl", method="qlora", learning_rate=0.003, lora_rank=8,
                        lora_alpha=16, max_steps=40, batch_size=8, lr_scheduler="linear", warmup_steps=4,
                        max_grad_norm=1.0, compute_dtype="auto")
    sweep = _sweep({"learning_rate": 0.003}, 0.41,
                   (_trial({"learning_rate": 0.001}, 0.52), _trial({"learning_rate": 0.003}, 0.41)))
    recipe = served_recipe(ft, sweep)
    assert recipe["source"] == "sweep winner" and recipe["learning_rate"] == 0.003
    assert "learning_rate=0.003: final eval_loss 0.4100, the best of 2 trials; learning_rate=0.001: 0.5200" in recipe["why"]
    fallback = served_recipe(ft, _sweep(None, None))
    assert fallback["source"] == "config" and "no trial" in fallback["why"]


def _evaluation(model: str, right: int, n: int = 10):
    from frugalray.serve.client import EvalResult

    answers = ["1"] * right + ["0"] * (n - right)
    return EvalResult(model=model, n=n, correct=right, accuracy=right / n, answers=answers, gold=["1"] * n,
                      usage={"flops": 1.0, "prompt_tokens": 1, "completion_tokens": 1, "samples": n})


def _results(after_right: int, told_right: int | None) -> dict:
    score = ScoreResult(rows_in=10, rows_scored=10, rows_quarantined=0, rows_unscorable=0, output_path="scored",
                        quarantine_path=None, tokens=400, loss_tokens=100, flops=0.0, wall_s=1.0, tokens_per_s=400.0,
                        median_perplexity=3.0, quarantine_reasons={})
    select = SelectResult(rows_in=10, kept=8, dropped=2, kept_tokens=320, output_path="selected.jsonl",
                          report_path="select_report.json")
    return {
        "generate": {"noisy_rows": 2}, "score": score, "select": select,
        "sweep": _sweep({"learning_rate": 1e-3}, 0.2, flops_spent=0.0, flop_cap=3.0), "finetune": FT_LEARNED,
        "served_recipe": {"method": "qlora", "learning_rate": 1e-3, "lora_rank": 8, "max_steps": 40,
                          "lr_scheduler": "linear", "warmup_steps": 4, "max_grad_norm": 1.0,
                          "source": "sweep winner", "why": "the sweep's winner"},
        "serve": {"before": _evaluation("base", 1), "after": _evaluation("finetuned", after_right),
                  "before_told": None if told_right is None else _evaluation("base", told_right),
                  "budgeted": None, "queries": [], "flops": 0.0},
    }


def test_the_verdict_compares_with_the_base_at_its_best(tmp_path):
    from frugalray.budget.ledger import ComputeLedger
    from frugalray.pipeline import build_summary, format_summary

    ledger = ComputeLedger(tmp_path)
    # The base answers 1/10 as asked but 6/10 when told to reply briefly; the adapter 7/10.
    summary = build_summary(_results(after_right=7, told_right=6), ledger, wall_s=1.0, min_gain_points=10)
    assert summary["verdict_base"].startswith("told")
    assert summary["heldout_paired"]["mean_b"] == 0.6 and summary["heldout_paired"]["diff"] == pytest.approx(0.1)
    assert not summary["verdict"]["helped"] and summary_exit_code(summary) == 3
    text = format_summary(summary, tmp_path)
    assert "base told to reply briefly   60.0%" in text
    assert "!" * 72 + "\nVERDICT: FINE-TUNING DID NOT HELP: +10.0 points" in text

    helped = build_summary(_results(after_right=10, told_right=None), ledger, wall_s=1.0, min_gain_points=10)
    assert helped["verdict_base"] == "as asked" and helped["verdict"]["helped"]
    assert "VERDICT: fine-tuning helped: +90.0 points" in format_summary(helped, tmp_path)


def test_a_sweep_of_another_method_than_the_served_one_is_refused(tmp_path):
    from pathlib import Path

    from frugalray.config import ConfigError, load_config
    from frugalray.pipeline import PipelineConfig, StagePlan

    shipped = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "pipeline_small.yaml"
    cfg = load_config(PipelineConfig, shipped, ["sweep.finetune.method=lora"])
    with pytest.raises(ConfigError) as err:
        StagePlan(cfg, tmp_path)
    text = str(err.value)
    assert "sweep.finetune.method: 'lora' but finetune.method is 'qlora'" in text
    assert "drop sweep.finetune.method" in text


def test_a_rerun_that_resumes_scoring_still_adds_up(tmp_path):
    from frugalray.budget.ledger import ComputeLedger
    from frugalray.pipeline import build_summary

    results = _results(after_right=10, told_right=None)
    # Every shard resumed from an earlier run: the output cost 3e12 FLOPs, this run computed none of it.
    results["score"] = results["score"].model_copy(update={"flops": 3e12, "flops_now": 0.0})
    ledger = ComputeLedger(tmp_path)
    ledger.record("score", flops=0.0, wall_s=1.0)
    summary = build_summary(results, ledger, wall_s=1.0, min_gain_points=10)
    assert summary["ledger_matches_stages"], summary["ledger_mismatches"]
    ledger.record("score", flops=1.0, wall_s=1.0)  # a ledger that does not match this run is still caught
    assert not build_summary(results, ledger, wall_s=1.0, min_gain_points=10)["ledger_matches_stages"]
