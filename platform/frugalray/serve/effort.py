"""`reasoning_effort` -> a compute budget (pure Python).

OpenAI-style clients set `reasoning_effort`; routers use the same words. vLLM 0.32 accepts the levels
below and reads the field to switch a thinking model's mode (`enable_thinking`), so the field also
goes on to vLLM for chat requests. Here each level also names a compute-budget preset the operator
defines (`ServeConfig.reasoning_effort_presets`, merged over `DEFAULT_EFFORT_PRESETS`); a request's
explicit `compute_budget` fields win over the preset's, field by field.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import ValidationError

from frugalray.serve.protocol import ComputeBudget

EffortLevel = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]  # vLLM 0.32's values
EFFORT_LEVELS: tuple[str, ...] = get_args(EffortLevel)

DEFAULT_EFFORT_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"strategy": "greedy"},
    "minimal": {"strategy": "greedy"},
    "low": {"strategy": "greedy"},
    "medium": {"strategy": "adaptive_consistency", "confidence": 0.8, "max_samples": 8},
    "high": {"strategy": "adaptive_consistency", "confidence": 0.95, "max_samples": 16},
    "xhigh": {"strategy": "adaptive_consistency", "confidence": 0.99, "max_samples": 16},
    "max": {"strategy": "self_consistency", "max_samples": 16},
}


def effort_presets(operator: dict[str, dict[str, Any]], max_samples_ceiling: int) -> tuple[dict, list[str]]:
    """The presets a server offers, and the config problems (each naming its field).

    The operator's presets replace the defaults level by level and must fit `max_samples_ceiling`.
    A default preset asks for at most the ceiling: on a server whose ceiling is 8, `high` samples 8
    (documented in the README), since the defaults were written for the default ceiling of 16.
    """
    presets: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for level in EFFORT_LEVELS:
        given = level in operator
        preset = dict(operator[level] if given else DEFAULT_EFFORT_PRESETS[level])
        field = f"reasoning_effort_presets.{level}"
        try:
            ComputeBudget.model_validate(preset)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            problems.append(f"{field}.{where}: {first['msg']}; a preset takes compute_budget's fields")
            continue
        if (preset.get("max_samples") or 0) > max_samples_ceiling:
            if given:
                problems.append(f"{field}.max_samples: {preset['max_samples']} exceeds max_samples_ceiling "
                                f"{max_samples_ceiling}; lower it or raise the ceiling")
                continue
            preset["max_samples"] = max_samples_ceiling
        presets[level] = preset
    for level in sorted(set(operator) - set(EFFORT_LEVELS)):
        problems.append(f"reasoning_effort_presets.{level}: not a reasoning_effort level; use one of "
                        f"{', '.join(EFFORT_LEVELS)}")
    return presets, problems


def budget_for_effort(effort: str, explicit: dict[str, Any] | None, presets: dict[str, dict[str, Any]]) -> dict:
    """The compute budget fields of a request with `reasoning_effort`: the preset, overridden field by field
    by the fields the request's own `compute_budget` sets."""
    return {**presets[effort], **(explicit or {})}
