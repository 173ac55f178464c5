"""The main job's verdict: paired accuracy difference with its interval, a loud line when fine-tuning
did not help (naming the likely cause), the exit code, and the served recipe's provenance (pure)."""

from __future__ import annotations

import pytest

from frugalray.pipeline import finetune_verdict, served_recipe, summary_exit_code
from frugalray.stats import paired_difference


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


FT_LEARNED = {"first_loss": 1.3, "final_loss": 0.2, "eval_loss_before": 1.3, "eval_loss_after": 0.25}


def test_a_significant_gain_helps():
    v = finetune_verdict(paired_difference([1] * 30 + [0] * 10, [1] * 10 + [0] * 30), 10, FT_LEARNED)
    assert v["helped"] and v["line"].startswith("fine-tuning helped: +50.0 points")
    assert v["cause"] is None


def test_accuracy_falling_is_called_out_with_the_cause():
    # The regression this verdict exists for: base 47.5% -> fine-tuned 5.0%, train loss barely moving.
    before = [1] * 19 + [0] * 21
    after = [1] * 2 + [0] * 38
    v = finetune_verdict(paired_difference(after, before), None,
                         {"first_loss": 4.61, "final_loss": 4.4, "eval_loss_before": 3.55, "eval_loss_after": 2.5})
    assert not v["helped"]
    assert v["line"].startswith("FINE-TUNING DID NOT HELP: -42.5 points")
    assert "training did not learn" in v["cause"]


def test_eval_loss_rising_and_noise_are_told_apart():
    worse = finetune_verdict(paired_difference([1, 0, 0, 0], [1, 1, 0, 0]), None,
                             {"first_loss": 2.0, "final_loss": 0.5, "eval_loss_before": 1.0, "eval_loss_after": 1.4})
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
    ft = {"method": "qlora", "learning_rate": 0.003, "lora_rank": 8, "lora_alpha": 16, "max_steps": 40,
          "batch_size": 8, "lr_scheduler": "linear", "warmup_steps": 4, "max_grad_norm": 1.0, "compute_dtype": "auto"}
    sweep = {"best_config": {"learning_rate": 0.003}, "best_metric": 0.41, "metric": "eval_loss",
             "trials": [{"config": {"learning_rate": 0.001}, "metric": 0.52},
                        {"config": {"learning_rate": 0.003}, "metric": 0.41}]}
    recipe = served_recipe(ft, sweep)
    assert recipe["source"] == "sweep winner" and recipe["learning_rate"] == 0.003
    assert "learning_rate=0.003: final eval_loss 0.4100, the best of 2 trials; learning_rate=0.001: 0.5200" in recipe["why"]
    fallback = served_recipe(ft, {"best_config": None, "trials": []})
    assert fallback["source"] == "config" and "no trial" in fallback["why"]
