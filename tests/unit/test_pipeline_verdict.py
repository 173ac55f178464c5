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


def _evaluation(model: str, right: int, n: int = 10):
    from frugalray.serve.client import EvalResult

    answers = ["1"] * right + ["0"] * (n - right)
    return EvalResult(model=model, n=n, correct=right, accuracy=right / n, answers=answers, gold=["1"] * n,
                      usage={"flops": 1.0, "prompt_tokens": 1, "completion_tokens": 1, "samples": n})


def _results(after_right: int, told_right: int | None) -> dict:
    sweep = {"best_config": {"learning_rate": 1e-3}, "best_metric": 0.2, "flops_spent": 0.0, "flop_cap": 3.0}
    return {
        "generate": {"noisy_rows": 2}, "score": {"flops": 0.0}, "select": {"rows_in": 10, "kept": 8, "dropped": 2},
        "sweep": sweep, "finetune": {"flops": 0.0, **FT_LEARNED},
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
    from frugalray.config import ConfigError, load_config
    from frugalray.pipeline import PipelineConfig, StagePlan

    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "pipeline_small.yaml"
    cfg = load_config(PipelineConfig, shipped, ["sweep.finetune.method=lora"])
    with pytest.raises(ConfigError) as err:
        StagePlan(cfg, tmp_path)
    text = str(err.value)
    assert "sweep.finetune.method: 'lora' but finetune.method is 'qlora'" in text
    assert "drop sweep.finetune.method" in text
