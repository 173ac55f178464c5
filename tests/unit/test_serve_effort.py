"""reasoning_effort -> compute-budget presets (pure): every level vLLM accepts has one, the operator's
replace the defaults level by level, and a request's own compute_budget wins field by field."""

import pytest
from frugalray.config import ConfigError, parse_config
from frugalray.serve.config import ServeConfig
from frugalray.serve.effort import DEFAULT_EFFORT_PRESETS, EFFORT_LEVELS, effort_presets
from frugalray.serve.validation import RequestError, parse_request

CHAT = {"messages": [{"role": "user", "content": "What is 2 + 3?"}]}


def _parse(body, presets, ceiling=16):
    return parse_request(body, ceiling, 64, effort_presets=presets)


def test_every_level_vllm_accepts_has_a_preset():
    presets, problems = effort_presets({}, 16)
    assert problems == [] and list(presets) == list(EFFORT_LEVELS)
    assert presets["low"] == {"strategy": "greedy"}
    assert presets["medium"] == {"strategy": "adaptive_consistency", "confidence": 0.8, "max_samples": 8}
    assert presets["high"] == {"strategy": "adaptive_consistency", "confidence": 0.95, "max_samples": 16}


def test_defaults_fit_a_lower_ceiling_but_an_operators_preset_must_fit_it():
    presets, problems = effort_presets({}, 8)
    assert problems == [] and presets["high"]["max_samples"] == 8 and presets["medium"]["max_samples"] == 8
    assert DEFAULT_EFFORT_PRESETS["high"]["max_samples"] == 16  # the defaults themselves are untouched
    _, problems = effort_presets({"high": {"strategy": "self_consistency", "max_samples": 12}}, 8)
    assert problems == ["reasoning_effort_presets.high.max_samples: 12 exceeds max_samples_ceiling 8; "
                        "lower it or raise the ceiling"]


def test_bad_presets_are_refused_naming_the_field():
    cases = {
        "ultra": {"strategy": "greedy"},
        "medium": {"strategy": "beam"},
        "low": {"max_sampels": 2},
    }
    for level, preset in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_config(ServeConfig, {"reasoning_effort_presets": {level: preset}}, source="test")
        assert f"reasoning_effort_presets.{level}" in str(err.value)
    cfg = parse_config(ServeConfig, {"reasoning_effort_presets": {"low": {"strategy": "self_consistency",
                                                                           "max_samples": 2}}}, source="test")
    assert effort_presets(cfg.reasoning_effort_presets, cfg.max_samples_ceiling)[0]["low"]["max_samples"] == 2


def test_request_effort_becomes_its_budget_and_explicit_fields_win():
    presets, _ = effort_presets({}, 16)
    req = _parse({**CHAT, "reasoning_effort": "medium"}, presets)
    assert (req.compute_budget.strategy, req.compute_budget.confidence, req.compute_budget.max_samples) == (
        "adaptive_consistency", 0.8, 8)
    req = _parse({**CHAT, "reasoning_effort": "high", "compute_budget": {"confidence": 0.9, "max_flops": 1e12}},
                 presets)
    assert (req.compute_budget.confidence, req.compute_budget.max_samples, req.compute_budget.max_flops) == (
        0.9, 16, 1e12)
    assert _parse({**CHAT, "reasoning_effort": "low"}, presets).compute_budget.strategy == "greedy"
    assert _parse(CHAT, presets).compute_budget is None  # no effort, no budget: a plain request


def test_bad_effort_requests_are_400s_naming_the_param():
    presets, _ = effort_presets({}, 8)
    for body, param in [
        ({**CHAT, "reasoning_effort": "ultra"}, "reasoning_effort"),
        ({**CHAT, "reasoning_effort": 3}, "reasoning_effort"),
        ({**CHAT, "thinking_token_budget": -1}, "thinking_token_budget"),
        ({**CHAT, "thinking_token_budget": "10"}, "thinking_token_budget"),
        ({**CHAT, "reasoning_effort": "high", "compute_budget": {"max_samples": 9}}, "compute_budget.max_samples"),
    ]:
        with pytest.raises(RequestError) as err:
            _parse(body, presets, ceiling=8)
        assert err.value.status == 400 and err.value.param == param, (body, err.value.message)
