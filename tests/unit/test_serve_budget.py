"""Pure logic of the serving ingress: votes, limits, FLOPs (no Ray, no vLLM); answers are test_answers.py."""

from __future__ import annotations

import json

import pytest
from frugalray.budget.flops import ModelShape, forward_flops_per_token
from frugalray.config import ConfigError, parse_config
from frugalray.serve.config import ServeConfig, read_adapter
from frugalray.serve.samples import samples_from_choices
from frugalray.serve.stopping import majority_vote
from frugalray.serve.usage import budget_usage, request_flops, usage_extension
from frugalray.serve.validation import RequestError, parse_request

SHAPE = ModelShape(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, vocab_size=49152)


def test_majority_vote_counts_and_share():
    answer, share, counts = majority_vote(["7", "8", "7", None])
    assert answer == "7"
    assert share == pytest.approx(0.5)  # unanswered samples count in the denominator
    assert counts == {"7": 2, "8": 1}


def test_majority_vote_tie_goes_to_first_seen_and_is_order_deterministic():
    assert majority_vote(["8", "7", "7", "8"])[0] == "8"
    assert majority_vote(["7", "8", "8", "7"])[0] == "7"
    assert majority_vote([None, "3", "5"])[0] == "3"


def test_majority_vote_without_answers():
    assert majority_vote([None, None]) == (None, 0.0, {})
    assert majority_vote([]) == (None, 0.0, {})


def test_request_within_ceilings_parses():
    req = parse_request(
        {"model": "m", "messages": [], "compute_budget": {"max_samples": 4, "answer_extractor": "exact"}},
        max_samples_ceiling=8, max_tokens_ceiling=64,
    )
    assert req.compute_budget.max_samples == 4
    assert req.compute_budget.strategy == "self_consistency"
    assert req.model_extra["messages"] == []  # other OpenAI fields pass through to vLLM


@pytest.mark.parametrize(
    "body, param",
    [
        ({"compute_budget": {"max_samples": 9}}, "compute_budget.max_samples"),
        ({"compute_budget": {"max_samples": 0}}, "compute_budget.max_samples"),
        ({"compute_budget": {"max_samples": "4"}}, "compute_budget.max_samples"),
        ({"compute_budget": {"max_samples": 4.0}}, "compute_budget.max_samples"),
        ({"compute_budget": {"max_sample": 4}}, "compute_budget.max_sample"),
        ({"compute_budget": {"strategy": "beam"}}, "compute_budget.strategy"),
        ({"compute_budget": {"answer_extractor": "xml"}}, "compute_budget.answer_extractor"),
        ({"compute_budget": {"answer_extractor": "regex"}}, "compute_budget.answer_regex"),
        ({"compute_budget": {"answer_regex": "\\d+"}}, "compute_budget.answer_regex"),
        ({"compute_budget": {"answer_extractor": "regex", "answer_regex": "("}}, "compute_budget.answer_regex"),
        ({"compute_budget": {"answer_extractor": "regex", "answer_regex": "x" * 201}}, "compute_budget.answer_regex"),
        ({"compute_budget": {"strategy": "adaptive"}}, "compute_budget.strategy"),
        ({"compute_budget": {"confidence": 0}}, "compute_budget.confidence"),
        ({"compute_budget": {"confidence": 1.5}}, "compute_budget.confidence"),
        ({"compute_budget": {"confidence": "0.9"}}, "compute_budget.confidence"),
        ({"compute_budget": {"max_flops": 0}}, "compute_budget.max_flops"),
        ({"compute_budget": {"max_flops": True}}, "compute_budget.max_flops"),
        ({"compute_budget": {"round_size": 9}}, "compute_budget.round_size"),
        ({"compute_budget": {"round_size": 0}}, "compute_budget.round_size"),
        ({"compute_budget": {"max_completion_tokens": 8 * 64 + 1}}, "compute_budget.max_completion_tokens"),
        ({"compute_budget": {"max_completion_tokens": 2.5}}, "compute_budget.max_completion_tokens"),
        ({"compute_budget": 4}, "compute_budget"),
        ({"n": 9}, "n"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 3.0}, "temperature"),
    ],
)
def test_request_errors_name_the_param(body, param):
    with pytest.raises(RequestError) as info:
        parse_request({"model": "m", **body}, max_samples_ceiling=8, max_tokens_ceiling=64)
    err = info.value
    assert err.status == 400
    assert err.param == param
    assert err.body()["error"]["param"] == param
    assert param in err.message


def test_adaptive_budget_fields_parse():
    req = parse_request(
        {"compute_budget": {"strategy": "adaptive_consistency", "max_samples": 8, "max_completion_tokens": 100,
                            "max_flops": 5e11, "confidence": 0.9, "round_size": 2, "answer_extractor": "regex",
                            "answer_regex": r"= (\d+)"}},
        max_samples_ceiling=8, max_tokens_ceiling=64,
    )
    budget = req.compute_budget
    assert (budget.strategy, budget.round_size, budget.confidence) == ("adaptive_consistency", 2, 0.9)
    assert budget.max_flops == 5e11 and budget.max_completion_tokens == 100
    # an integer FLOP budget is fine; the other strategies parse too
    for strategy in ("best_of_n", "cascade", "auto", "greedy", "self_consistency"):
        req = parse_request({"compute_budget": {"strategy": strategy, "max_flops": 10**12}}, 8, 64)
        assert req.compute_budget.strategy == strategy


def test_over_ceiling_message_says_it_is_the_servers_ceiling():
    with pytest.raises(RequestError, match="ceiling") as info:
        parse_request({"compute_budget": {"max_samples": 100}}, max_samples_ceiling=8, max_tokens_ceiling=64)
    assert "8" in info.value.message


def test_non_object_body_is_rejected():
    with pytest.raises(RequestError):
        parse_request([1, 2], max_samples_ceiling=8, max_tokens_ceiling=64)


def test_request_flops_counts_prompt_once_plus_every_completion_token():
    per_token = forward_flops_per_token(SHAPE, 20 + 7)
    assert request_flops(SHAPE, 20, [5, 7, 6, 4]) == pytest.approx(per_token * (20 + 22))
    # separate prefills (seeded fan-out) pay the prompt per sample
    assert request_flops(SHAPE, 20, [5, 7], prompt_passes=2) == pytest.approx(per_token * (40 + 12))
    # a LoRA adapter adds 2 FLOPs per adapter weight per token
    with_lora = request_flops(SHAPE, 20, [7], lora_params=1000)
    assert with_lora - request_flops(SHAPE, 20, [7]) == pytest.approx(2000 * 27)


def test_budget_usage_sums_tokens_and_reports_samples():
    usage = budget_usage(SHAPE, 10, [3, 4, 5], "self_consistency", 2 / 3)
    assert usage["prompt_tokens"] == 10
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == 22
    figures = usage_extension(usage)
    assert figures["samples"] == 3
    assert figures["confidence"] == pytest.approx(2 / 3)
    assert figures["flops"] == pytest.approx(request_flops(SHAPE, 10, [3, 4, 5]))
    assert figures["stopped_early"] is False
    assert "flops" not in usage_extension(budget_usage(None, 10, [3], "greedy", 1.0))


# --- ServeConfig ---------------------------------------------------------------------------


def test_serve_config_defaults_and_typos():
    cfg = parse_config(ServeConfig, {})
    assert cfg.model_name == "smollm2-135m-instruct"
    assert cfg.http_host == "127.0.0.1"
    with pytest.raises(ConfigError, match="max_samples_celing"):
        parse_config(ServeConfig, {"max_samples_celing": 4})


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"default_samples": 20, "max_samples_ceiling": 8}, "default_samples"),
        ({"default_adaptive_samples": 20, "max_samples_ceiling": 8}, "default_adaptive_samples"),
        ({"stop_rule": "gamma"}, "stop_rule"),
        ({"default_confidence": 0}, "default_confidence"),
        ({"max_tokens_ceiling": 4096, "max_model_len": 2048}, "max_tokens_ceiling"),
        ({"adapters": {"smollm2-135m-instruct": "/x"}}, "adapters.smollm2-135m-instruct"),
        ({"route_prefix": "api"}, "route_prefix"),
        ({"engine_kwargs": {"enable_lora": True}}, "engine_kwargs.enable_lora"),
    ],
)
def test_serve_config_inconsistencies_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_config(ServeConfig, data)


def _fake_adapter(path, rank=8, peft_type="LORA", weights=True):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": peft_type, "r": rank, "target_modules": ["q_proj", "v_proj"]})
    )
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"")


def test_read_adapter_accepts_a_peft_lora_dir(tmp_path):
    _fake_adapter(tmp_path / "a")
    info, problems = read_adapter("adder", str(tmp_path / "a"), max_rank=16)
    assert problems == []
    assert info.rank == 8 and info.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda p: None, "not a directory"),
        (lambda p: p.mkdir(), "adapter_config.json"),
        (lambda p: _fake_adapter(p, weights=False), "weights"),
        (lambda p: _fake_adapter(p, rank=64), "max_lora_rank"),
        (lambda p: _fake_adapter(p, peft_type="IA3"), "LORA"),
    ],
)
def test_read_adapter_problems_name_the_adapter(tmp_path, setup, needle):
    path = tmp_path / "adapter"
    setup(path)
    info, problems = read_adapter("adder", str(path), max_rank=16)
    assert info is None
    assert len(problems) == 1 and problems[0].startswith("adapters.adder:") and needle in problems[0]


def test_preflight_collects_every_adapter_problem(tmp_path):
    from frugalray.serve.config import preflight

    cfg = ServeConfig(model=str(tmp_path / "no-model"), adapters={"a": str(tmp_path / "x"), "b": str(tmp_path / "y")})
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    text = "\n".join(info.value.problems)
    assert "model:" in text and "adapters.a:" in text and "adapters.b:" in text


# --- engine choices -> stopping-policy samples --------------------------------------------


def _chat_choice(text, logprobs):
    return {"index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": {"content": [{"token": "t", "logprob": lp} for lp in logprobs]}}


def test_samples_from_chat_choices_count_tokens_and_average_logprobs():
    choices = [_chat_choice("It is 7.", [-0.1, -0.3]), _chat_choice("8", [-1.0, -2.0, -3.0])]
    samples = samples_from_choices(choices, [5], "number")  # one round total: the logprobs give each count
    assert [(s.answer, s.completion_tokens) for s in samples] == [("7", 2), ("8", 3)]
    assert samples[0].mean_logprob == pytest.approx(-0.2)
    assert samples[1].mean_logprob == pytest.approx(-2.0)


def test_samples_from_completion_choices_and_fallbacks():
    completion = {"index": 0, "text": " B) yes", "logprobs": {"tokens": ["a"], "token_logprobs": [float("-inf"), -1.0]}}
    (sample,) = samples_from_choices([completion], [2], "choice")
    assert sample.answer == "B" and sample.completion_tokens == 2
    assert sample.mean_logprob == pytest.approx((-1e4 - 1.0) / 2)  # -inf is clipped, not a NaN mean
    # without logprobs: the round total is spread evenly; no score
    bare = [{"index": i, "text": "5"} for i in range(3)]
    samples = samples_from_choices(bare, [7])
    assert [s.completion_tokens for s in samples] == [3, 2, 2]
    assert all(s.mean_logprob is None for s in samples)
    # one total per choice (seeded single-sample requests) is taken as is
    assert [s.completion_tokens for s in samples_from_choices(bare, [1, 2, 3])] == [1, 2, 3]
