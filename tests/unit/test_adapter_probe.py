"""The adapter probe's decision (pure): an adapter whose top next-token log-probabilities equal the base
model's is not in effect."""

from frugalray.serve.adapter_probe import SAME_WITHIN, inert_adapters, probe_request, same_distribution

BASE = {" Paris": -0.1, " the": -2.5, " a": -3.0}


def test_equal_distributions_are_inert_and_any_difference_is_not():
    shifted = {t: lp + 10 * SAME_WITHIN for t, lp in BASE.items()}
    other_tokens = {" Paris": -0.1, " the": -2.5, " located": -3.0}
    assert same_distribution(BASE, dict(BASE))
    assert same_distribution(BASE, {t: lp + SAME_WITHIN / 2 for t, lp in BASE.items()})
    assert not same_distribution(BASE, shifted)
    assert not same_distribution(BASE, other_tokens)
    assert inert_adapters(BASE, {"copy": dict(BASE), "tuned": shifted, "other": other_tokens}) == ["copy"]
    assert inert_adapters(BASE, {}) == []


def test_probe_is_one_greedy_token_with_top_logprobs():
    req = probe_request("adder")
    assert req["model"] == "adder" and req["max_tokens"] == 1 and req["temperature"] == 0.0 and req["logprobs"] >= 2
