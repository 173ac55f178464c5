"""What a served request cost: forward FLOPs and the OpenAI `usage` extended with the budget (pure Python).

FLOPs follow frugalray.budget.flops (prompt prefill counted per round, every generated token one
forward pass at the longest context); `usage` adds samples, strategy, confidence and FLOPs.
"""

from __future__ import annotations

from typing import Any

from frugalray.budget.flops import ModelShape, forward_flops_per_token


def request_flops(shape: ModelShape, prompt_tokens: int, completion_tokens: list[int],
                  lora_params: int = 0, prompt_passes: int = 1) -> float:
    """Forward FLOPs of serving one request.

    The prompt is prefilled `prompt_passes` times (1 when samples share one prefill, as
    vLLM's n>1 does) and every generated token costs one forward pass. The attention term
    uses the longest final context, an upper bound in line with flops.py's dense convention.
    """
    context = prompt_tokens + max(completion_tokens, default=0)
    tokens = prompt_tokens * prompt_passes + sum(completion_tokens)
    return forward_flops_per_token(shape, max(context, 1), lora_params) * tokens


def attempts_usage(shape: ModelShape | None, prompt_tokens: int, completion_tokens: list[int],
                   sample_models: list[str], rounds_by_model: dict[str, int], lora_of: dict[str, int],
                   seeded: bool = False) -> list[dict[str, Any]]:
    """Per served model (in order of first use): samples, completion tokens and forward FLOPs.

    A cascade that escalates runs its greedy attempt on one model and its samples on another;
    each attempt is costed with its own LoRA term, its own prefills (one per round, or one per
    sample when seeded) and its own longest context. The sum never exceeds what a budget
    planned with the larger LoRA term and the request's longest context for all samples.
    """
    attempts = []
    for name in dict.fromkeys(sample_models):
        mine = [c for c, m in zip(completion_tokens, sample_models) if m == name]
        attempt: dict[str, Any] = {"model": name, "samples": len(mine), "completion_tokens": sum(mine)}
        if shape is not None:
            passes = len(mine) if seeded else rounds_by_model.get(name, 1)
            attempt["flops"] = request_flops(shape, prompt_tokens, mine, lora_of.get(name, 0), passes)
        attempts.append(attempt)
    return attempts


def scoring_flops(shape: ModelShape, prompt_tokens: int, completion_tokens: list[int], lora_params: int = 0) -> float:
    """Forward FLOPs of scoring each sample with a reward model: one prefill of prompt + sample
    (+ the one token vLLM generates after it), per sample. Grows with every sample's length."""
    total = 0.0
    for tokens in completion_tokens:
        length = prompt_tokens + tokens + 1
        total += forward_flops_per_token(shape, length, lora_params) * length
    return total


def budget_usage(shape: ModelShape | None, prompt_tokens: int, completion_tokens: list[int],
                 strategy: str, confidence: float | None, lora_params: int = 0,
                 prompt_passes: int = 1, stopped_early: bool = False) -> dict[str, Any]:
    """OpenAI `usage`, extended with what the compute budget bought."""
    total_completion = sum(completion_tokens)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": total_completion,
        "total_tokens": prompt_tokens + total_completion,
        "samples": len(completion_tokens),
        "strategy": strategy,
        "confidence": confidence,
        "stopped_early": stopped_early,
    }
    if shape is not None:
        usage["flops"] = request_flops(shape, prompt_tokens, completion_tokens, lora_params, prompt_passes)
    return usage
