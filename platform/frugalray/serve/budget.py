"""Per-request compute budgets: the pure logic behind the serving ingress.

A request may carry `compute_budget` (outside OpenAI's spec; the openai client sends it
through `extra_body`):

    {"max_samples": 4, "strategy": "self_consistency", "answer_extractor": "number"}

- `self_consistency`: draw `max_samples` samples, extract an answer from each, return a
  sample whose answer is the majority one (Wang et al. 2022).
- `greedy`: one deterministic decode (temperature 0); `max_samples` is ignored.

Everything here is plain Python (no Ray, no vLLM) so it is unit-tested on its own: request
validation with limits in the types, answer extraction, majority voting and the FLOP and
usage arithmetic.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from frugalray.budget.flops import ModelShape, forward_flops_per_token

Strategy = Literal["self_consistency", "greedy"]
AnswerKind = Literal["number", "exact"]


class RequestError(Exception):
    """An OpenAI-style client error: HTTP status, message, and the offending `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 err_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.err_type = err_type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


class ComputeBudget(BaseModel):
    """What a client may ask for; the operator's ceiling is enforced by `request_model`."""

    # strict: "4" or 4.0 or true for max_samples is a client bug, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)

    max_samples: int | None = Field(None, ge=1, description="samples to draw; None = server default")
    strategy: Strategy = "self_consistency"
    answer_extractor: AnswerKind = "number"


@lru_cache(maxsize=16)
def request_model(max_samples_ceiling: int, max_tokens_ceiling: int) -> type[BaseModel]:
    """The fields of a chat/completions request the ingress acts on, with the operator's limits.

    Other OpenAI fields pass through (extra="allow") and vLLM's own request model checks them.
    """

    class BoundedComputeBudget(ComputeBudget):
        max_samples: int | None = Field(None, ge=1, le=max_samples_ceiling)

    class BudgetedRequest(BaseModel):
        model_config = ConfigDict(extra="allow")

        # OpenAI field order; only the fields the ingress reads or limits.
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1, le=max_tokens_ceiling)
        max_completion_tokens: int | None = Field(None, ge=1, le=max_tokens_ceiling)
        n: int = Field(1, ge=1, le=max_samples_ceiling)
        seed: int | None = None
        stream: bool = False
        temperature: float | None = Field(None, ge=0.0, le=2.0)
        # frugalray extension (outside OpenAI's spec): see the module docstring.
        compute_budget: BoundedComputeBudget | None = None

    return BudgetedRequest


def validation_to_request_error(err: ValidationError) -> RequestError:
    """The first validation problem as a 400 naming its param (e.g. compute_budget.max_samples)."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        valid = f"; valid keys: {', '.join(ComputeBudget.model_fields)}" if first["loc"][0] == "compute_budget" else ""
        msg = f"{param}: unknown key{valid}"
    elif first["type"] == "less_than_equal":
        msg = f"{param}: {first['msg']} (the server's ceiling); ask for less"
    else:
        msg = f"{param}: {first['msg']} (got {first.get('input')!r})"
    return RequestError(msg, param=param)


def parse_request(body: Any, max_samples_ceiling: int, max_tokens_ceiling: int) -> BaseModel:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", param=None)
    try:
        return request_model(max_samples_ceiling, max_tokens_ceiling).model_validate(body)
    except ValidationError as err:
        raise validation_to_request_error(err) from None


# --- answer extraction ---------------------------------------------------------------------

# Thousands-grouped numbers first ("1,234.5"), then plain ones ("-12", "3.75").
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_EDGE_PUNCT = " \t\n\r.,;:!?\"'`*()[]{}"


def normalize_number(token: str) -> str | None:
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str | None, kind: AnswerKind = "number") -> str | None:
    """The answer a completion commits to, or None when it commits to none.

    number: the last number in the text (after a GSM8K-style `####` when present),
            normalized so that "1,000", "1000.0" and "1000" compare equal.
    exact:  the whole text, trimmed of edge punctuation, lower-cased, whitespace collapsed.
    """
    if text is None:
        return None
    if kind == "number":
        tail = text.rsplit("####", 1)[1] if "####" in text else text
        found = _NUMBER.findall(tail) or _NUMBER.findall(text)
        return normalize_number(found[-1]) if found else None
    if kind == "exact":
        cleaned = " ".join(text.strip(_EDGE_PUNCT).lower().split())
        return cleaned or None
    raise ValueError(f"answer_extractor: unknown kind {kind!r}; use 'number' or 'exact'")


def majority_vote(answers: list[str | None]) -> tuple[str | None, float, dict[str, int]]:
    """(majority answer, its share of ALL samples, counts per answer).

    Samples without an answer count in the denominator but never win. Ties go to the
    answer that appeared first, so the result is deterministic for a given sample order.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0, {}
    first_seen = {a: i for i, a in reversed(list(enumerate(answers))) if a is not None}
    winner = max(counts, key=lambda a: (counts[a], -first_seen[a]))
    return winner, counts[winner] / len(answers), dict(counts)


# --- FLOPs and usage -----------------------------------------------------------------------


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


def budget_usage(shape: ModelShape | None, prompt_tokens: int, completion_tokens: list[int],
                 strategy: str, confidence: float | None, lora_params: int = 0,
                 prompt_passes: int = 1) -> dict[str, Any]:
    """OpenAI `usage`, extended with what the compute budget bought."""
    total_completion = sum(completion_tokens)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": total_completion,
        "total_tokens": prompt_tokens + total_completion,
        "samples": len(completion_tokens),
        "strategy": strategy,
        "confidence": confidence,
    }
    if shape is not None:
        usage["flops"] = request_flops(shape, prompt_tokens, completion_tokens, lora_params, prompt_passes)
    return usage
