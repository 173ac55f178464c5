"""What a tenant reservation holds and what a request settles (pure): the worst case bounds every
real spend the ingress reports, and a refusal tells the client when to come back."""

import pytest
from frugalray.budget.flops import ModelShape
from frugalray.serve.spend import PROMPT_MARGIN_TOKENS, SpendMeter, WorstCase, tenant_refusal, worst_case
from frugalray.serve.tenant_ledger import Refusal
from frugalray.serve.usage import attempts_usage, budget_usage, scoring_flops

SHAPE = ModelShape(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, vocab_size=49152)


@pytest.mark.parametrize("samples", [1, 3, 8])
def test_the_worst_case_bounds_what_any_draw_of_that_request_reports(samples):
    prompt, per_sample = 40, 12
    bound = worst_case(SHAPE, prompt, per_sample, samples, lora_params=10_000)
    for lengths in ([per_sample] * samples, [1] * samples, list(range(1, samples + 1))):
        for passes in (1, samples):
            usage = budget_usage(SHAPE, prompt, lengths, "self_consistency", None, 10_000, prompt_passes=passes)
            assert usage["frugalray"]["flops"] <= bound.flops
            assert usage["completion_tokens"] <= bound.completion_tokens
    # across two models of a cascade, each costed with its own LoRA term
    attempts = attempts_usage(SHAPE, prompt, [per_sample] * samples, ["m"] + ["big"] * (samples - 1),
                              {"m": 1, "big": 1}, {"m": 0, "big": 10_000})
    assert sum(a["flops"] for a in attempts) <= bound.flops
    scored = worst_case(SHAPE, prompt, per_sample, samples, scored=True)
    unscored = worst_case(SHAPE, prompt, per_sample, samples)
    assert scored.flops == pytest.approx(
        unscored.flops + scoring_flops(SHAPE, prompt + PROMPT_MARGIN_TOKENS, [per_sample] * samples))


def test_a_budgets_own_caps_lower_the_worst_case():
    free = worst_case(SHAPE, 40, 12, 8)
    capped = worst_case(SHAPE, 40, 12, 8, max_completion_tokens=20, max_flops=free.flops / 4)
    assert capped == WorstCase(free.flops / 4, 20)
    assert worst_case(None, 40, 12, 8) == WorstCase(0.0, 96)  # no shape: tokens only


def test_the_meter_counts_finished_engine_requests_and_the_worst_case_of_a_cut_one():
    meter = SpendMeter(SHAPE, prompt_tokens=40, lora_of={"adder": 5_000})
    meter.answered("m", 40, 24, sequences=2)
    assert meter.completion_tokens == 24 and meter.flops > 0
    before = meter.flops
    meter.cancelled("adder", max_tokens=16, sequences=1)
    assert meter.completion_tokens == 40
    assert meter.flops - before == pytest.approx(
        worst_case(SHAPE, 40, 16, 1, lora_params=5_000).flops, rel=1e-9)
    assert PROMPT_MARGIN_TOKENS > 0


def test_refusals_are_429_with_retry_after_or_400_when_waiting_cannot_help():
    waiting = Refusal(tenant="acme", dimension="flops", short=("flops",), retry_after_s=12.2, never_fits=False,
                      remaining_flops=3e9, remaining_tokens=None, window_s=3600)
    err = tenant_refusal(waiting, WorstCase(5e9, 64))
    assert err.status == 429 and err.headers["Retry-After"] == "13"
    assert err.headers["x-frugalray-budget-remaining-flops"] == "3e+09"
    assert "x-frugalray-budget-remaining-completion-tokens" not in err.headers
    never = Refusal(tenant="acme", dimension="completion_tokens", short=("completion_tokens",), retry_after_s=None,
                    never_fits=True, remaining_flops=None, remaining_tokens=10, window_s=60)
    err = tenant_refusal(never, WorstCase(0.0, 512))
    assert err.status == 400 and "Retry-After" not in err.headers and "512 completion tokens" in err.message
