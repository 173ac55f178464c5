"""Pure parts of the serving robustness work: API-key config, deadlines in the request types,
escalation/scoring fields, reward-model scoring arithmetic and the per-attempt FLOP accounting
(property tests: the cascade's split accounting never exceeds the budget it planned with)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frugalray.budget.flops import ModelShape
from frugalray.config import ConfigError, parse_config
from frugalray.serve.config import ServeConfig, api_key_digest, resolve_api_key
from frugalray.serve.samples import scored_tokens_logprob
from frugalray.serve.stopping import Limits, Sample, make_policy
from frugalray.serve.usage import attempts_usage, request_flops, scoring_flops
from frugalray.serve.validation import RequestError, check_chat_messages, parse_request

SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=1000)


def _shape() -> ModelShape:
    return SHAPE


# --- config -------------------------------------------------------------------------------


def test_api_key_comes_from_the_environment_and_stays_out_of_repr(monkeypatch):
    monkeypatch.setenv("FR_KEY_UNDER_TEST", "s3cret")
    cfg = ServeConfig(api_key_env="FR_KEY_UNDER_TEST")
    assert resolve_api_key(cfg) == "s3cret"
    assert "s3cret" not in repr(ServeConfig(api_key="s3cret"))
    assert resolve_api_key(ServeConfig(api_key="s3cret")) == "s3cret"
    assert resolve_api_key(ServeConfig()) is None
    assert api_key_digest("s3cret") != "s3cret" and len(api_key_digest("s3cret")) == 64
    monkeypatch.delenv("FR_KEY_UNDER_TEST")
    with pytest.raises(ConfigError) as info:
        resolve_api_key(cfg)
    assert info.value.problems[0].startswith("api_key_env: environment variable FR_KEY_UNDER_TEST is not set")


@pytest.mark.parametrize("data, needle", [
    ({"api_key": "a", "api_key_env": "B"}, "api_key: set either"),
    ({"api_key_env": "1-not-a-name"}, "api_key_env:"),
    ({"cascade_escalate_to": "bigger-model"}, "cascade_escalate_to: 'bigger-model' is not served"),
    ({"reward_model": "rm"}, "reward_model: 'rm' is not served"),
    ({"max_queued_requests": -2}, "max_queued_requests"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"retry_after_s": -1}, "retry_after_s"),
])
def test_robustness_config_problems_name_the_field(data, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(ServeConfig, data)
    assert needle in str(info.value)


def test_escalation_and_reward_targets_may_name_served_models():
    cfg = ServeConfig(model_name="base", adapters={"tuned": "/x"}, cascade_escalate_to="tuned", reward_model="base")
    assert cfg.cascade_escalate_to == "tuned" and cfg.reward_model == "base"


# --- request types ------------------------------------------------------------------------


def test_timeout_s_is_bounded_by_the_servers_deadline():
    req = parse_request({"timeout_s": 2.5}, 8, 64, request_timeout_s=10)
    assert req.timeout_s == 2.5
    for bad in (0, -1, 11, True, "1", float("nan"), float("inf")):
        with pytest.raises(RequestError) as info:
            parse_request({"timeout_s": bad}, 8, 64, request_timeout_s=10)
        assert info.value.param == "timeout_s" and info.value.status == 400


def test_escalate_to_and_score_with_parse_strictly():
    req = parse_request({"compute_budget": {"strategy": "cascade", "escalate_to": "tuned"}}, 8, 64)
    assert req.compute_budget.escalate_to == "tuned"
    req = parse_request({"compute_budget": {"strategy": "best_of_n", "score_with": "reward_model"}}, 8, 64)
    assert req.compute_budget.score_with == "reward_model"
    for budget, param in (({"escalate_to": 3}, "compute_budget.escalate_to"),
                          ({"escalate_to": ""}, "compute_budget.escalate_to"),
                          ({"score_with": "oracle"}, "compute_budget.score_with")):
        with pytest.raises(RequestError) as info:
            parse_request({"compute_budget": budget}, 8, 64)
        assert info.value.param == param


def test_temperature_must_be_a_number():
    with pytest.raises(RequestError) as info:
        parse_request({"temperature": True}, 8, 64)
    assert info.value.param == "temperature"


# --- reward-model scoring -----------------------------------------------------------------


def test_scored_tokens_logprob_averages_the_sample_tokens_after_the_prompt():
    ids = [5, 6, 7, 8]
    prompt_logprobs = [None, {"6": {"logprob": -0.5}}, {"7": {"logprob": -1.0}, "9": {"logprob": -0.1}},
                       {"8": {"logprob": -3.0}}]
    assert scored_tokens_logprob(ids, prompt_logprobs, 2) == pytest.approx(-2.0)
    assert scored_tokens_logprob(ids, prompt_logprobs, 3) == pytest.approx(-3.0)
    assert scored_tokens_logprob(ids, prompt_logprobs, 4) is None  # nothing after the prompt
    assert scored_tokens_logprob(ids, None, 2) is None
    assert scored_tokens_logprob(ids, [None, None, {"1": {"logprob": -1}}, None], 2) is None  # token missing
    assert scored_tokens_logprob([1, 2], [None, {2: -float("inf")}], 1) == -1e4  # clamped like sample logprobs


def test_scoring_flops_is_one_prefill_of_prompt_plus_sample_each():
    shape = _shape()
    one = scoring_flops(shape, 10, [4])
    assert one == pytest.approx(request_flops(shape, 15, [0]))
    assert scoring_flops(shape, 10, [4, 4]) == pytest.approx(2 * one)
    assert scoring_flops(shape, 10, []) == 0
    assert scoring_flops(shape, 10, [5]) > one  # grows with the sample's length


# --- per-attempt accounting (cascade escalation) ------------------------------------------


def test_attempts_usage_splits_by_model_with_each_models_lora():
    shape = _shape()
    attempts = attempts_usage(shape, 20, [6, 5, 4], ["base", "tuned", "tuned"], {"base": 1, "tuned": 1},
                              {"base": 0, "tuned": 5000})
    assert [(a["model"], a["samples"], a["completion_tokens"]) for a in attempts] == [("base", 1, 6),
                                                                                     ("tuned", 2, 9)]
    assert attempts[0]["flops"] == pytest.approx(request_flops(shape, 20, [6]))
    assert attempts[1]["flops"] == pytest.approx(request_flops(shape, 20, [5, 4], 5000, 1))
    seeded = attempts_usage(shape, 20, [6, 5, 4], ["base", "tuned", "tuned"], {}, {"tuned": 5000}, seeded=True)
    assert seeded[1]["flops"] == pytest.approx(request_flops(shape, 20, [5, 4], 5000, 2))
    assert attempts_usage(None, 20, [3], ["base"], {"base": 1}, {})[0].keys() == {"model", "samples",
                                                                                  "completion_tokens"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.integers(1, 200),
    max_tokens=st.integers(1, 32),
    max_samples=st.integers(1, 10),
    round_size=st.integers(1, 5),
    flop_share=st.floats(0.05, 3.0),
    lora_first=st.integers(0, 20000),
    lora_escalated=st.integers(0, 20000),
    reward_lora=st.one_of(st.none(), st.integers(0, 20000)),
    seeded=st.booleans(),
    stream=st.lists(st.tuples(st.integers(1, 32), st.sampled_from(["4", "5", None]), st.floats(-5, 0)),
                    min_size=1, max_size=40),
)
def test_cascade_escalation_and_reward_scoring_never_exceed_max_flops(
        prompt, max_tokens, max_samples, round_size, flop_share, lora_first, lora_escalated, reward_lora,
        seeded, stream):
    """Plan with the ingress's bound (larger LoRA, plus scoring), report with the exact split: <= max_flops."""
    shape = _shape()
    lora_bound = max(lora_first, lora_escalated)
    scale = request_flops(shape, prompt, [max_tokens] * max_samples, lora_bound, max_samples)
    max_flops = flop_share * scale

    def flops_of(completions, rounds):
        passes = len(completions) if seeded else rounds
        total = request_flops(shape, prompt, completions, lora_bound, passes)
        if reward_lora is not None:
            total += scoring_flops(shape, prompt, completions, reward_lora)
        return total

    policy = make_policy("cascade", Limits(max_samples, max_tokens, max_flops=max_flops), flops_of,
                         confidence=0.99, round_size=round_size)
    models, rounds_by_model, drawn = [], {}, iter(stream * 10)
    while (plan := policy.next_round()) is not None:
        model = "first" if plan.greedy else "escalated"
        samples = []
        for _ in range(plan.n):
            tokens, answer, logprob = next(drawn)
            samples.append(Sample(answer, min(tokens, plan.max_tokens), logprob))
        policy.observe(samples)
        models += [model] * len(samples)
        rounds_by_model[model] = rounds_by_model.get(model, 0) + 1
    completions = [s.completion_tokens for s in policy.samples]
    attempts = attempts_usage(shape, prompt, completions, models, rounds_by_model,
                              {"first": lora_first, "escalated": lora_escalated}, seeded)
    spent = sum(a["flops"] for a in attempts)
    if reward_lora is not None:
        spent += scoring_flops(shape, prompt, completions, reward_lora)
    assert spent <= max_flops * (1 + 1e-12)
    assert len(completions) <= max_samples
    assert all(c <= max_tokens for c in completions)


# --- the engine gate ------------------------------------------------------------------------


def test_exclusive_gate_runs_an_exclusive_holder_alone():
    import asyncio

    from frugalray.serve.gate import ExclusiveGate

    async def scenario():
        gate = ExclusiveGate()
        events: list[str] = []
        inside = {"shared": 0, "exclusive": 0}

        async def shared(name, hold):
            async with gate.shared():
                inside["shared"] += 1
                assert inside["exclusive"] == 0
                events.append(f"{name} in")
                await asyncio.sleep(hold)
                inside["shared"] -= 1

        async def exclusive(name):
            async with gate.exclusive():
                inside["exclusive"] += 1
                assert inside["shared"] == 0 and inside["exclusive"] == 1
                events.append(f"{name} in")
                await asyncio.sleep(0.01)
                inside["exclusive"] -= 1

        first = asyncio.create_task(shared("s1", 0.05))
        await asyncio.sleep(0.01)
        ex = asyncio.create_task(exclusive("x"))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(shared("s2", 0.01))  # waits behind the waiting exclusive holder
        await asyncio.gather(first, ex, late)
        assert events == ["s1 in", "x in", "s2 in"]
        # a cancelled shared holder keeps its hold for a moment (the engine is still aborting)
        cancelled = asyncio.create_task(shared("s3", 10))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert gate.shared_holders == 1
        await asyncio.sleep(1.1)
        assert gate.shared_holders == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("messages,param", [
    ([{"role": "system", "content": {"": None}}], "messages[0].content"),  # found by the fuzz test: was a 500
    (["hello"], "messages[0]"),
    ([{"content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0]"),
])
def test_malformed_chat_messages_are_a_400_naming_the_part(messages, param):
    with pytest.raises(RequestError) as info:
        check_chat_messages(messages)
    assert info.value.status == 400 and info.value.param == param


def test_well_formed_chat_messages_pass():
    check_chat_messages([{"role": "system", "content": None}, {"role": "user", "content": "2+2?"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}])


@pytest.mark.parametrize(("fast_bf16", "expected"), [(False, "float32"), (True, "auto")])
def test_engine_dtype_is_float32_where_bf16_is_emulated_unless_the_operator_names_one(monkeypatch, fast_bf16, expected):
    from frugalray import models
    from frugalray.serve.app import llm_config_for
    from frugalray.serve.config import ResolvedServe

    monkeypatch.setattr(models, "has_fast_bf16", lambda: fast_bf16)
    resolved = ResolvedServe(model_path="/models/m", shape=SHAPE)
    cfg = ServeConfig(model="/models/m")
    assert llm_config_for(cfg, resolved).engine_kwargs["dtype"] == expected
    chosen = ServeConfig(model="/models/m", engine_kwargs={"dtype": "bfloat16"})
    assert llm_config_for(chosen, resolved).engine_kwargs["dtype"] == "bfloat16"


def test_reserved_engine_cpus_reach_the_engine_environment_only_when_set():
    from frugalray.serve.app import llm_config_for
    from frugalray.serve.config import ResolvedServe

    resolved = ResolvedServe(model_path="/models/m", shape=SHAPE)
    env_of = lambda cfg: llm_config_for(cfg, resolved).runtime_env["env_vars"]
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env_of(ServeConfig(model="/models/m"))
    assert env_of(ServeConfig(model="/models/m", engine_reserved_cpus=0))["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    with pytest.raises(ConfigError, match="engine_reserved_cpus"):
        parse_config(ServeConfig, {"model": "/models/m", "engine_reserved_cpus": -1})
