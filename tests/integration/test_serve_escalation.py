"""cascade escalating to another served model (the LoRA adapter), and best_of_n scored by a
reward model (the adapter, configured as the server's reward_model): real engine, real scores."""

from __future__ import annotations

import math

import pytest

from frugalray.serve.samples import scored_tokens_logprob
from frugalray.serve.usage import request_flops, scoring_flops, usage_extension

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(served_model):
    import openai

    return openai.OpenAI(base_url=served_model["base_url"], api_key=served_model["api_key"], timeout=180,
                         max_retries=0)


@pytest.fixture(scope="module")
def shape(served_model):
    from frugalray.models import model_shape

    return model_shape(served_model["config"].model)


def _lora_params(served_model, shape) -> int:
    # the fixture's adapter: rank 8 on q_proj, v_proj, o_proj
    return shape.lora_params(8, ["q_proj", "v_proj", "o_proj"])


def _chat(client, model, budget, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": LONG_PROMPT}],
                                          extra_body={"compute_budget": budget}, **kw)


def test_cascade_escalates_to_the_adapter_and_reports_both_attempts(client, served_model, shape):
    # confidence 1.0: no greedy decode of a story is that sure, so it always escalates
    budget = {"strategy": "cascade", "max_samples": 3, "round_size": 2, "confidence": 1.0,
              "answer_extractor": "exact", "escalate_to": served_model["adapter"]}
    resp = _chat(client, served_model["model"], budget, max_tokens=5)
    usage = usage_extension(resp.usage)
    attempts = usage["attempts"]
    assert [a["model"] for a in attempts] == [served_model["model"], served_model["adapter"]], attempts
    assert [a["samples"] for a in attempts] == [1, 2]
    assert usage["samples"] == 3 and usage["rounds"] == 2
    assert usage["answered_by"] == served_model["adapter"] == resp.model
    # each attempt at its own model's cost; the total is their sum
    p = resp.usage.prompt_tokens
    greedy, sampled = attempts
    assert greedy["flops"] == pytest.approx(request_flops(shape, p, [greedy["completion_tokens"]]))
    lora = _lora_params(served_model, shape)
    assert sampled["flops"] >= request_flops(shape, p, [1, 1], lora, 1)
    assert sampled["flops"] <= request_flops(shape, p, [5, 5], lora, 1)
    assert usage["flops"] == pytest.approx(greedy["flops"] + sampled["flops"])
    assert greedy["completion_tokens"] + sampled["completion_tokens"] == resp.usage.completion_tokens


def test_cascade_stays_on_the_first_model_when_confident(client, served_model):
    resp = client.completions.create(
        model=served_model["model"], prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=2,
        extra_body={"compute_budget": {"strategy": "cascade", "max_samples": 4, "confidence": 0.05,
                                       "escalate_to": served_model["adapter"]}})
    usage = usage_extension(resp.usage)
    assert usage["stop_reason"] == "greedy_confident"
    assert [a["model"] for a in usage["attempts"]] == [served_model["model"]]
    assert usage["answered_by"] == served_model["model"]


@pytest.mark.parametrize("budget, param", [
    ({"strategy": "cascade", "escalate_to": "no-such-model"}, "compute_budget.escalate_to"),
    ({"strategy": "best_of_n", "escalate_to": "smollm2-test-adapter"}, "compute_budget.escalate_to"),
    ({"strategy": "cascade", "score_with": "reward_model"}, "compute_budget.score_with"),
    ({"strategy": "best_of_n", "score_with": "oracle"}, "compute_budget.score_with"),
])
def test_escalation_and_scoring_targets_are_validated(client, served_model, budget, param):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, served_model["model"], budget, max_tokens=2)
    assert info.value.param == param


def test_best_of_n_scored_by_the_reward_model(client, served_model, shape, default_model_path):
    from frugalray.models import load_tokenizer

    budget = {"strategy": "best_of_n", "max_samples": 3, "round_size": 3, "confidence": 1.0,
              "answer_extractor": "exact", "score_with": "reward_model"}
    resp = _chat(client, served_model["model"], budget, max_tokens=6, temperature=1.0)
    usage = usage_extension(resp.usage)
    assert usage["scored_by"] == served_model["adapter"]
    scores = usage["sample_scores"]
    assert len(scores) == usage["samples"] == 3
    assert all(s is None or s <= 0 for s in scores)
    # the returned sample is the best-scored one
    best = max(s for s in scores if s is not None)
    assert usage["confidence"] == pytest.approx(math.exp(best))
    # scoring counted: the request's FLOPs are generation plus the reward model's prefills
    assert usage["scoring_flops"] > 0
    assert usage["flops"] == pytest.approx(sum(a["flops"] for a in usage["attempts"]) + usage["scoring_flops"])
    p = resp.usage.prompt_tokens
    lora = _lora_params(served_model, shape)
    assert usage["scoring_flops"] <= scoring_flops(shape, p, [6, 6, 6], lora)
    # The chosen answer's score is what the adapter itself gives those tokens after the prompt.
    tokenizer = load_tokenizer(default_model_path)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": LONG_PROMPT}],
                                               add_generation_prompt=True, tokenize=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = prompt_ids["input_ids"]
    answer_ids = tokenizer(resp.choices[0].message.content, add_special_tokens=False).input_ids[:6]
    check = client.completions.create(model=served_model["adapter"], prompt=list(prompt_ids) + answer_ids,
                                      max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 0})
    expected = scored_tokens_logprob(list(prompt_ids) + answer_ids, check.choices[0].model_extra["prompt_logprobs"],
                                     len(prompt_ids))
    assert expected == pytest.approx(best, abs=1e-3)
