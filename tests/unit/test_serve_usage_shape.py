"""The served `usage`: OpenAI's fields exact (checked with the official `openai` SDK's typed model),
frugalray's figures in one extension object, and the stated temperature rule (no Ray, no engine)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_engine import FakeStream
from openai.types import CompletionUsage

from frugalray.budget.flops import ModelShape, forward_flops_per_token
from frugalray.serve.client import sent_temperature
from frugalray.serve.sampling import sampling_temperature
from frugalray.serve.usage import (
    USAGE_EXTENSION,
    attempts_usage,
    budget_usage,
    later_rounds_cached_tokens,
    request_flops,
    served_usage,
    usage_extension,
)
from frugalray.serve.validation import RequestError, parse_request

SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=1000)
OPENAI_FIELDS = set(CompletionUsage.model_fields)
# Every figure frugalray reports today: none of them may sit at the top level of `usage`.
FIGURES = {"samples", "strategy", "confidence", "stopped_early", "flops", "answer", "answer_counts", "rounds",
           "prompt_passes", "stop_reason", "answered_by", "attempts", "budget", "scoring_flops", "scored_by",
           "sample_scores", "temperature", "cached_prompt_tokens"}


def assert_openai_exact(usage: dict) -> dict:
    """The usage parses as the SDK's CompletionUsage with only OpenAI's fields plus the one extension;
    returns the extension."""
    typed = CompletionUsage.model_validate(usage)
    assert set(usage) <= OPENAI_FIELDS | {USAGE_EXTENSION}, set(usage) - OPENAI_FIELDS
    assert set(typed.model_extra) == {USAGE_EXTENSION}
    assert not FIGURES & set(usage)
    assert typed.total_tokens == typed.prompt_tokens + typed.completion_tokens
    assert isinstance(typed.completion_tokens_details.reasoning_tokens, int)
    assert isinstance(typed.prompt_tokens_details.cached_tokens, int)
    assert 0 <= typed.prompt_tokens_details.cached_tokens <= typed.prompt_tokens
    return usage_extension(typed)


# -- the pure builders ---------------------------------------------------------------------------

def test_budget_usage_is_openai_exact_with_the_figures_in_the_extension():
    usage = budget_usage(SHAPE, 10, [3, 4, 5], "self_consistency", 2 / 3, temperature=0.7)
    figures = assert_openai_exact(usage)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (10, 12, 22)
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert figures["samples"] == 3 and figures["strategy"] == "self_consistency"
    assert figures["confidence"] == pytest.approx(2 / 3) and figures["stopped_early"] is False
    assert figures["flops"] == pytest.approx(request_flops(SHAPE, 10, [3, 4, 5]))
    assert figures["temperature"] == 0.7
    assert usage_extension(usage) is usage[USAGE_EXTENSION]  # consumers read and extend it in place


def test_cached_tokens_and_completion_details_are_carried_from_the_engine():
    one = {"prompt_tokens": 45, "completion_tokens": 9, "total_tokens": 54,
           "prompt_tokens_details": {"cached_tokens": 32, "created_cache_tokens": None},
           "completion_tokens_details": {"reasoning_tokens": 3}}
    usage = served_usage(45, 9, {"samples": 1}, [one])
    assert assert_openai_exact(usage) == {"samples": 1, "cached_prompt_tokens": 32}
    assert usage["prompt_tokens_details"] == {"cached_tokens": 32}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}
    # three rounds: the prompt is read three times; OpenAI's field stays a part of the prompt, the
    # extension keeps the sum over rounds
    rounds = [{"prompt_tokens": 45, "prompt_tokens_details": None, "completion_tokens_details": None},
              {"prompt_tokens": 45, "prompt_tokens_details": {"cached_tokens": 32},
               "completion_tokens_details": {"reasoning_tokens": 2}},
              {"prompt_tokens": 45, "prompt_tokens_details": {"cached_tokens": 44},
               "completion_tokens_details": {"reasoning_tokens": 5}}]
    usage = budget_usage(SHAPE, 45, [9, 9, 9], "adaptive_consistency", 0.9, engine_usages=rounds)
    figures = assert_openai_exact(usage)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 45}
    assert figures["cached_prompt_tokens"] == 76
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 7}


def test_usage_extension_reads_dicts_sdk_models_and_nothing():
    usage = budget_usage(None, 5, [2], "greedy", 1.0, temperature=0.0)
    assert usage_extension(CompletionUsage.model_validate(usage)) == usage[USAGE_EXTENSION]
    assert usage_extension(json.loads(json.dumps(usage)))["temperature"] == 0.0
    assert usage_extension(None) == {}
    assert usage_extension({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}) == {}


# -- the temperature rule ------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["self_consistency", "adaptive_consistency", "best_of_n", "cascade", "auto"])
def test_sampling_strategies_use_the_given_temperature_or_the_operators_and_refuse_zero(strategy):
    assert sampling_temperature(strategy, None, 0.7) == 0.7
    assert sampling_temperature(strategy, 1.3, 0.7) == 1.3
    assert sampling_temperature(strategy, 0.05, 0.7) == 0.05
    with pytest.raises(RequestError) as info:
        sampling_temperature(strategy, 0.0, 0.7)
    err = info.value
    assert err.param == "temperature" and err.status == 400
    assert "omit" in err.message and "above 0" in err.message and "'greedy'" in err.message


def test_greedy_decodes_at_zero_whatever_the_request_says():
    assert sampling_temperature("greedy", None, 0.7) == 0.0
    assert sampling_temperature("greedy", 0.0, 0.7) == 0.0
    assert sampling_temperature("greedy", 0.9, 0.7) == 0.0


def test_our_evaluation_client_sends_no_temperature_with_a_budget():
    assert sent_temperature(None, budgeted=True) == {}
    assert sent_temperature(None, budgeted=False) == {"temperature": 0.0}
    assert sent_temperature(0.4, budgeted=True) == {"temperature": 0.4}


# -- every path of the ingress writes this usage (a fake engine handle, no Ray) ------------------

class _Response:
    """A vLLM completions response: every sample answers "42" in 2 tokens at logprob -0.01 each;
    the prompt's 5 tokens, 4 of them from the prefix cache."""

    def __init__(self, payload):
        self._payload = payload

    def model_dump(self, mode="json"):
        n = self._payload.get("n") or 1
        logprobs = {"tokens": ["4", "2"], "token_logprobs": [-0.01, -0.01]}
        return {"id": "x", "object": "text_completion", "model": self._payload["model"],
                "choices": [{"index": i, "text": "42", "logprobs": logprobs, "finish_reason": "stop"}
                            for i in range(n)],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2 * n, "total_tokens": 5 + 2 * n,
                          "prompt_tokens_details": {"cached_tokens": 4, "created_cache_tokens": None,
                                                    "multimodal_tokens": None},
                          "completion_tokens_details": None}}


class _Engine:
    """Stands in for the LLMServer handle: records each engine request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.completions = self
        self.chat = self

    def options(self, **_):
        return self

    def remote(self, request, _raw=None):
        self.requests.append(request)
        return FakeStream(_Response(request))


def _ingress(platform: str = "cpu", adapters: dict[str, int] | None = None):
    from frugalray.serve.ingress import FrugalIngress

    plain = FrugalIngress.__mro__[1]  # the class under serve.ingress's ASGI wrapper
    ingress = object.__new__(plain)
    settings = {"model_name": "m", "adapters": adapters or {}, "shape": SHAPE, "model_path": None,
                "max_samples_ceiling": 16, "max_tokens_ceiling": 64, "default_samples": 3,
                "default_max_tokens": 8, "sample_temperature": 0.7, "engine_platform": platform}
    plain.__init__(ingress, _Engine(), settings)
    ingress._validated = lambda kind, payload: dict(payload)  # Ray's request types import vLLM
    ingress._raise_if_error = lambda item: None
    return ingress


def _serve(body: dict, platform: str = "cpu", adapters: dict[str, int] | None = None):
    ingress = _ingress(platform, adapters)
    req = parse_request(body, 16, 64)
    response = asyncio.run(ingress._dispatch("completions", dict(body), req, deadline=1e12))
    return json.loads(response.body), ingress._server.requests


PROMPT = {"model": "m", "prompt": "6*7="}


@pytest.mark.parametrize(("body", "platform", "adapters", "samples"), [
    pytest.param({}, "cpu", None, 1, id="plain"),
    pytest.param({"n": 3, "temperature": 0.9}, "cuda", None, 3, id="plain-n"),
    pytest.param({"n": 3, "seed": 7, "temperature": 0.9}, "cpu", None, 3, id="seeded-split"),
    pytest.param({"prompt_logprobs": 0}, "cpu", {"tuned": 100}, 1, id="prompt-logprobs"),
    pytest.param({"compute_budget": {"strategy": "greedy"}}, "cpu", None, 1, id="greedy"),
    pytest.param({"compute_budget": {"max_samples": 3}}, "cuda", None, 3, id="self-consistency"),
    pytest.param({"seed": 5, "compute_budget": {"max_samples": 3}}, "cpu", None, 3, id="self-consistency-seeded"),
    pytest.param({"compute_budget": {"strategy": "adaptive_consistency", "max_samples": 8, "round_size": 2,
                                     "confidence": 0.8}}, "cpu", None, None, id="adaptive"),
    pytest.param({"seed": 3, "compute_budget": {"strategy": "best_of_n", "max_samples": 4, "round_size": 2,
                                                "confidence": 1.0}}, "cpu", None, 4, id="best-of-n-seeded"),
])
def test_every_ingress_path_returns_openai_exact_usage(body, platform, adapters, samples):
    result, requests = _serve({**PROMPT, **body}, platform, adapters)
    figures = assert_openai_exact(result["usage"])
    usage = result["usage"]
    drawn = figures["samples"]
    if samples is not None:
        assert drawn == samples
    assert usage["completion_tokens"] == 2 * drawn  # OpenAI's meaning: every sample, not the returned one
    assert usage["prompt_tokens"] == 5
    # vLLM's cached prompt tokens are carried: summed over the engine requests in the extension, and
    # in OpenAI's field at most the prompt (several requests each read it)
    assert figures["cached_prompt_tokens"] == 4 * len(requests)
    assert usage["prompt_tokens_details"]["cached_tokens"] == min(4 * len(requests), 5)
    assert figures["flops"] > 0
    if "compute_budget" in body:
        assert len(result["choices"]) == 1
        assert figures["answer"] == "42" and figures["strategy"] == body["compute_budget"].get(
            "strategy", "self_consistency")


def test_a_sampling_strategy_samples_at_the_operators_temperature_when_none_is_given():
    result, requests = _serve({**PROMPT, "compute_budget": {"max_samples": 3}})
    assert [r["temperature"] for r in requests] == [0.7]
    assert usage_extension(result["usage"])["temperature"] == 0.7


def test_a_given_temperature_is_used_as_given():
    body = {**PROMPT, "temperature": 1.1, "compute_budget": {"strategy": "adaptive_consistency", "max_samples": 4,
                                                            "round_size": 2, "confidence": 1.0}}
    result, requests = _serve(body)
    assert {r["temperature"] for r in requests} == {1.1}
    assert usage_extension(result["usage"])["temperature"] == 1.1


@pytest.mark.parametrize("strategy", ["self_consistency", "adaptive_consistency", "best_of_n", "cascade", "auto"])
def test_temperature_zero_with_a_sampling_strategy_is_refused_before_any_engine_work(strategy):
    ingress = _ingress()
    body = {**PROMPT, "temperature": 0, "compute_budget": {"strategy": strategy, "max_samples": 2}}
    with pytest.raises(RequestError) as info:
        asyncio.run(ingress._dispatch("completions", body, parse_request(body, 16, 64), deadline=1e12))
    assert info.value.param == "temperature" and info.value.status == 400
    assert ingress._server.requests == []


def test_greedy_reports_temperature_zero_and_a_cascade_the_temperature_it_used():
    result, requests = _serve({**PROMPT, "temperature": 0.9, "compute_budget": {"strategy": "greedy"}})
    assert [r["temperature"] for r in requests] == [0.0]
    assert usage_extension(result["usage"])["temperature"] == 0.0
    # confident greedy decode (exp(-0.01) >= 0.5): the cascade never sampled
    stayed, requests = _serve({**PROMPT, "compute_budget": {"strategy": "cascade", "max_samples": 4,
                                                           "confidence": 0.5}})
    assert [r["temperature"] for r in requests] == [0.0]
    assert usage_extension(stayed["usage"])["temperature"] == 0.0
    # confidence 1.0: it escalates and samples at the operator's temperature
    escalated, requests = _serve({**PROMPT, "compute_budget": {"strategy": "cascade", "max_samples": 4,
                                                              "round_size": 2, "confidence": 1.0}})
    assert [r["temperature"] for r in requests][:2] == [0.0, 0.7]
    assert usage_extension(escalated["usage"])["temperature"] == 0.7


def test_flops_rule_later_rounds_cache_hits_cost_no_prefill_the_first_round_pays_in_full():
    per_token = forward_flops_per_token(SHAPE, 45 + 9)
    cached = lambda n: {"prompt_tokens": 45, "prompt_tokens_details": {"cached_tokens": n}}
    # round 1 found 16 tokens cached (another request's system prompt): it still pays all 45
    rounds = [cached(16), cached(32), cached(44)]
    assert later_rounds_cached_tokens(rounds) == 76
    usage = budget_usage(SHAPE, 45, [9, 9, 9], "adaptive_consistency", 0.9, prompt_passes=3, engine_usages=rounds)
    assert usage_extension(usage)["flops"] == pytest.approx(per_token * (45 + 13 + 1 + 27))
    assert usage_extension(usage)["flops"] == pytest.approx(request_flops(SHAPE, 45, [9, 9, 9], 0, 3, 76))
    # no cache reported: every round pays its prefill (the planning upper bound)
    plain = budget_usage(SHAPE, 45, [9, 9, 9], "adaptive_consistency", 0.9, prompt_passes=3,
                         engine_usages=[cached(0)] * 3)
    assert usage_extension(plain)["flops"] == pytest.approx(per_token * (3 * 45 + 27))
    # a hit can never make a round cheaper than free, nor the first pass free
    assert request_flops(SHAPE, 45, [9], 0, 1, 45) == pytest.approx(per_token * (45 + 9))
    assert request_flops(SHAPE, 45, [9, 9], 0, 2, 500) == pytest.approx(per_token * (45 + 18))


def test_attempts_count_each_models_own_later_cache_hits():
    attempts = attempts_usage(SHAPE, 45, [9, 9, 9, 9], ["base", "base", "tuned", "tuned"],
                              {"base": 1, "tuned": 2}, {"base": 0, "tuned": 0}, cached_of={"tuned": 40})
    by_model = {a["model"]: a["flops"] for a in attempts}
    assert by_model["base"] == pytest.approx(request_flops(SHAPE, 45, [9, 9], 0, 1))
    assert by_model["tuned"] == pytest.approx(forward_flops_per_token(SHAPE, 54) * (90 - 40 + 18))
