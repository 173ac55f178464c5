"""What a served request cost: forward FLOPs and the OpenAI `usage` with frugalray's figures (pure Python).

The `usage` of every non-streamed response keeps OpenAI's fields exact, so strict clients and
typed SDKs (`openai.types.CompletionUsage`) read it unchanged, and puts frugalray's own figures in
one extension object under `usage[USAGE_EXTENSION]` (`"frugalray"`):

    {"prompt_tokens": 45, "completion_tokens": 36, "total_tokens": 81,
     "completion_tokens_details": {"reasoning_tokens": 0},
     "prompt_tokens_details": {"cached_tokens": 32},
     "frugalray": {"samples": 4, "strategy": "adaptive_consistency", "confidence": 0.97,
                   "stopped_early": true, "flops": 3.1e10, "temperature": 0.7, "answer": "11", ...}}

- `prompt_tokens`: the prompt, counted once; `completion_tokens`: summed over every sample the
  request drew (not only the returned choice); `total_tokens`: their sum.
- `completion_tokens_details`: what vLLM reported, summed over the request's engine requests
  (`{"reasoning_tokens": 0}` when it reported none).
- `prompt_tokens_details.cached_tokens`: prompt tokens vLLM served from its prefix cache, summed
  over the engine requests and capped at `prompt_tokens` (OpenAI's meaning: a part of the prompt);
  0 unless the engine reports it. The uncapped sum over rounds is `frugalray.cached_prompt_tokens`.
- `frugalray`: samples, strategy, confidence, stopped_early, flops (frugalray.budget.flops: what the
  engine computed. A request pays its whole prompt on its first engine request; a later round's
  engine request pays only the prompt tokens vLLM did not serve from its prefix cache (its
  `cached_tokens`); every generated token is one forward pass at the longest context. Budgets and
  tenant reservations plan for no cache hits, so a cache hit only ever makes the bill smaller),
  temperature (the one the samples were drawn at; 0.0 when all were greedy), and per strategy
  answer, answer_counts, rounds, prompt_passes, stop_reason, answered_by, attempts, budget,
  scoring_flops, scored_by, sample_scores. Read it with `usage_extension(usage)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from frugalray.budget.flops import ModelShape, forward_flops_per_token

# The one key under which frugalray's figures sit in a response's `usage`.
USAGE_EXTENSION = "frugalray"


def usage_extension(usage: Any) -> dict[str, Any]:
    """frugalray's figures in a served `usage`: a JSON dict, or the openai SDK's `CompletionUsage`
    (its extra fields). `{}` when there are none (a streamed chunk, another server)."""
    if usage is None:
        return {}
    if not isinstance(usage, Mapping):
        usage = getattr(usage, "model_extra", None) or {}
    figures = usage.get(USAGE_EXTENSION)
    return figures if isinstance(figures, dict) else {}


def engine_cached_tokens(engine_usage: Mapping[str, Any] | None) -> int:
    """Prompt tokens one engine response says vLLM served from its prefix cache (0 when not reported)."""
    return int(((engine_usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def later_rounds_cached_tokens(engine_usages: Iterable[Mapping[str, Any] | None]) -> int:
    """Prompt tokens the prefix cache served to a request's engine requests after its first.

    The billing rule: the first engine request pays its whole prompt (what it found cached was
    computed for another request, which paid for it); later rounds re-read the request's own prompt,
    and what the cache served them cost no prefill.
    """
    return sum(engine_cached_tokens(u) for u in list(engine_usages)[1:])


def served_usage(prompt_tokens: int, completion_tokens: int, figures: dict[str, Any],
                 engine_usages: Iterable[Mapping[str, Any] | None] = ()) -> dict[str, Any]:
    """OpenAI's `usage` for a request the ingress answered from `engine_usages` (the `usage` of each
    engine response it made), with `figures` as the frugalray extension."""
    details: dict[str, Any] = {}
    cached = 0
    for engine in engine_usages:
        engine = engine or {}
        for key, value in (engine.get("completion_tokens_details") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                details[key] = details.get(key, 0) + value
            else:
                details.setdefault(key, value)
        cached += engine_cached_tokens(engine)
    details.setdefault("reasoning_tokens", 0)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": details,
        # Several rounds each read the prompt from the cache: the OpenAI field stays a part of the prompt.
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt_tokens)},
        USAGE_EXTENSION: {**figures, "cached_prompt_tokens": cached},
    }


def request_flops(shape: ModelShape, prompt_tokens: int, completion_tokens: list[int],
                  lora_params: int = 0, prompt_passes: int = 1, cached_prompt_tokens: int = 0) -> float:
    """Forward FLOPs of serving one request.

    The prompt is prefilled `prompt_passes` times (1 when samples share one prefill, as
    vLLM's n>1 does) less `cached_prompt_tokens` (later passes' prefix-cache hits, see
    `later_rounds_cached_tokens`; the first pass is always paid), and every generated token costs
    one forward pass. The attention term uses the longest final context, an upper bound in line
    with flops.py's dense convention.
    """
    context = prompt_tokens + max(completion_tokens, default=0)
    prefilled = prompt_tokens * prompt_passes
    prefilled -= min(max(cached_prompt_tokens, 0), prompt_tokens * (prompt_passes - 1))
    tokens = prefilled + sum(completion_tokens)
    return forward_flops_per_token(shape, max(context, 1), lora_params) * tokens


def attempts_usage(shape: ModelShape | None, prompt_tokens: int, completion_tokens: list[int],
                   sample_models: list[str], rounds_by_model: dict[str, int], lora_of: dict[str, int],
                   seeded: bool = False, cached_of: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per served model (in order of first use): samples, completion tokens and forward FLOPs.

    A cascade that escalates runs its greedy attempt on one model and its samples on another;
    each attempt is costed with its own LoRA term, its own prefills (one per round, or one per
    sample when seeded) and its own longest context. The sum never exceeds what a budget
    planned with the larger LoRA term and the request's longest context for all samples.
    `cached_of`: per model, its later engine requests' prefix-cache hits (free prefill).
    """
    attempts = []
    for name in dict.fromkeys(sample_models):
        mine = [c for c, m in zip(completion_tokens, sample_models) if m == name]
        attempt: dict[str, Any] = {"model": name, "samples": len(mine), "completion_tokens": sum(mine)}
        if shape is not None:
            passes = len(mine) if seeded else rounds_by_model.get(name, 1)
            attempt["flops"] = request_flops(shape, prompt_tokens, mine, lora_of.get(name, 0), passes,
                                             (cached_of or {}).get(name, 0))
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
                 prompt_passes: int = 1, stopped_early: bool = False, temperature: float | None = None,
                 engine_usages: Iterable[Mapping[str, Any] | None] = ()) -> dict[str, Any]:
    """OpenAI `usage` of a request that drew `completion_tokens` (one entry per sample), with what
    the compute budget bought in the extension (see the module docstring)."""
    figures: dict[str, Any] = {
        "samples": len(completion_tokens),
        "strategy": strategy,
        "confidence": confidence,
        "stopped_early": stopped_early,
    }
    engine_usages = list(engine_usages)
    if shape is not None:
        figures["flops"] = request_flops(shape, prompt_tokens, completion_tokens, lora_params, prompt_passes,
                                         later_rounds_cached_tokens(engine_usages))
    if temperature is not None:
        figures["temperature"] = temperature
    return served_usage(prompt_tokens, sum(completion_tokens), figures, engine_usages)
