"""What a request may cost before it runs, and what it has cost so far (pure Python).

A tenant's budget (frugalray.serve.tenant_ledger) reserves a request's worst case before any engine
work and settles its real spend after: the response's `usage` when it answered, else what the
`SpendMeter` saw the engine compute (every finished engine request, plus the worst case of one that
was cancelled mid-way: its partial tokens are not reported), so a timed-out request settles what it spent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from frugalray.budget.flops import ModelShape
from frugalray.serve.tenant_ledger import Refusal
from frugalray.serve.usage import request_flops, scoring_flops
from frugalray.serve.validation import RequestError

PROMPT_MARGIN_TOKENS = 16  # the ingress counts the prompt with the model's tokenizer; the engine's count rules


@dataclass(frozen=True)
class WorstCase:
    flops: float
    completion_tokens: int


def worst_case(shape: ModelShape | None, prompt_tokens: int, per_sample: int, samples: int, lora_params: int = 0,
               scored: bool = False, scorer_lora_params: int = 0, max_completion_tokens: int | None = None,
               max_flops: float | None = None) -> WorstCase:
    """An upper bound on a request's spend: every sample at its full length with its own prefill at the longest
    context (+ scoring each by a reward model), within the request's own compute_budget caps."""
    tokens = samples * per_sample
    if max_completion_tokens is not None:
        tokens = min(tokens, max_completion_tokens)
    if shape is None:
        return WorstCase(0.0, tokens)
    prompt = prompt_tokens + PROMPT_MARGIN_TOKENS
    lengths = [per_sample] * samples
    flops = request_flops(shape, prompt, lengths, lora_params, prompt_passes=samples)
    if scored:
        flops += scoring_flops(shape, prompt, lengths, scorer_lora_params)
    if max_flops is not None:
        flops = min(flops, max_flops)
    return WorstCase(flops, tokens)


@dataclass
class SpendMeter:
    """The engine work one request has caused so far (ingress: one per request, through `SPEND`)."""

    shape: ModelShape | None
    prompt_tokens: int
    lora_of: dict[str, int]
    flops: float = 0.0
    completion_tokens: int = 0

    def answered(self, model: str, prompt_tokens: int, completion_tokens: int, sequences: int = 1) -> None:
        """A finished engine request: its prefill and tokens (each of its `sequences` decodes)."""
        self.completion_tokens += completion_tokens
        if self.shape is not None:
            per = [completion_tokens // max(sequences, 1)] * max(sequences, 1)
            per[0] += completion_tokens - sum(per)
            self.flops += request_flops(self.shape, prompt_tokens, per, self.lora_of.get(model, 0))

    def cancelled(self, model: str, max_tokens: int, sequences: int = 1) -> None:
        """An engine request cut off mid-way: how far it got is not reported, so its worst case counts."""
        self.answered(model, self.prompt_tokens + PROMPT_MARGIN_TOKENS, max_tokens * sequences, sequences)


# The meter of the request this task serves. Reached only through the functions below: Serve pickles the
# ingress's ASGI app, and a ContextVar referenced from its code cannot be pickled.
_SPEND: ContextVar[SpendMeter | None] = ContextVar("frugalray_spend", default=None)


def current_meter() -> SpendMeter | None:
    return _SPEND.get()


@contextmanager
def metering(meter: SpendMeter) -> Iterator[SpendMeter]:
    """Make `meter` the current request's (tasks the request starts share it)."""
    token = _SPEND.set(meter)
    try:
        yield meter
    finally:
        _SPEND.reset(token)


def tenant_refusal(refusal: Refusal, bound: WorstCase) -> RequestError:
    """The answer to a request the tenant's balance cannot cover: 429 with Retry-After and the remaining
    balance in headers, or 400 when its worst case exceeds the whole budget (waiting cannot help)."""
    headers = {"x-frugalray-tenant": refusal.tenant}
    if refusal.remaining_flops is not None:
        headers["x-frugalray-budget-remaining-flops"] = f"{refusal.remaining_flops:.6g}"
    if refusal.remaining_tokens is not None:
        headers["x-frugalray-budget-remaining-completion-tokens"] = str(refusal.remaining_tokens)
    need = f"{bound.flops:.3g} FLOPs" if refusal.dimension == "flops" else f"{bound.completion_tokens} completion tokens"
    if refusal.never_fits:
        return RequestError(f"this request may spend up to {need}, more than tenant '{refusal.tenant}' may spend in "
                            f"{refusal.window_s:g}s; ask for fewer samples or tokens (max_tokens, "
                            "compute_budget.max_samples / max_flops)", status=400, code="over_tenant_budget",
                            headers=headers)
    retry = max(1, math.ceil(refusal.retry_after_s or 1))
    headers["Retry-After"] = str(retry)
    return RequestError(f"tenant '{refusal.tenant}' has not enough {refusal.dimension} left in its {refusal.window_s:g}s "
                        f"budget window for this request's worst case ({need}); retry after {retry}s or ask for less",
                        status=429, err_type="rate_limit_error", code="tenant_budget_exhausted", headers=headers)
