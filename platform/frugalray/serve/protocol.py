"""The request models of the serving ingress: a chat/completions request and its compute budget.

A request may carry `compute_budget` (outside OpenAI's spec; the openai client sends it
through `extra_body`), e.g.

    {"strategy": "adaptive_consistency", "max_samples": 8, "confidence": 0.95,
     "round_size": 4, "max_completion_tokens": 256, "max_flops": 1e12, "answer_extractor": "number"}

Fields (all optional; the operator's ServeConfig sets the defaults and the ceilings):

- `strategy`:
  - `self_consistency` (default): one request for `max_samples` samples, majority vote (Wang et al. 2022).
  - `greedy`: one deterministic decode (temperature 0); `max_samples` is ignored.
  - `adaptive_consistency`: rounds of `round_size` samples; stop once the posterior probability
    that the leading answer stays the leader reaches `confidence` (Aggarwal et al. 2023).
  - `best_of_n`: rounds of samples; return the one with the best mean token log-probability and
    stop once exp(mean logprob) of the best reaches `confidence`.
  - `cascade`: greedy first; escalate to adaptive_consistency only if exp(mean logprob) of the
    greedy decode is below `confidence`.
  - `auto`: one sampled probe; its token confidence sets how many more samples the prompt gets.
  (the stopping rules live in frugalray.serve.stopping)
- `max_samples`: samples at most (<= the server's max_samples_ceiling).
- `max_completion_tokens`: completion tokens at most, summed over all samples.
- `max_flops`: forward FLOPs at most (frugalray.budget.flops; prompt prefill counted per round).
- `confidence`: the stopping threshold in (0, 1].
- `round_size`: samples per engine request in the adaptive strategies.
- `answer_extractor`: `number` (the one answer rule, frugalray.examples.answers) | `regex` (with
  `answer_regex`, group 1 or the whole match) | `exact` | `choice` (a multiple-choice letter A-J).
- `escalate_to` (cascade only): the served model/adapter that samples after escalating
  (default: the operator's `cascade_escalate_to`, else the requested model).
- `score_with` (best_of_n only): `logprob` (default: each sample's own mean token logprob) or
  `reward_model` (the mean logprob the operator's `reward_model` gives the sample's tokens).

Limits, which is which: the top-level `max_tokens` / `max_completion_tokens` bound *each sample*
(OpenAI's meaning); `compute_budget.max_completion_tokens` bounds the *sum over all samples*.

`reasoning_effort` (OpenAI's field: none, minimal, low, medium, high, xhigh, max) picks the
operator's compute-budget preset for that level (frugalray.serve.effort; e.g. low = greedy,
medium = adaptive_consistency at 0.8 with 8 samples, high = 16 samples at 0.95); fields the
request's own `compute_budget` sets win over the preset's. Chat requests also pass it on to vLLM,
which switches a thinking model's mode with it. `thinking_token_budget` (vLLM's) goes to the
engine when the served model has a reasoning parser, and is a 400 naming it otherwise.

Also outside OpenAI's spec, at the top level: `timeout_s`, a deadline shorter than the
server's `request_timeout_s` (past it: HTTP 504).

Temperature (frugalray.serve.sampling): `greedy` decodes at 0. Every other strategy samples at
the request's `temperature` when it is above 0, at the operator's `sample_temperature` when the
request sets none, and refuses `temperature: 0` with a 400 naming `temperature` (omit it, set it
above 0, or use strategy `greedy`). The temperature used is `usage.frugalray.temperature`.

The response's `usage` keeps OpenAI's fields exact; frugalray's figures (samples, FLOPs,
strategy, confidence, answer counts, ...) are the one extension object `usage.frugalray`
(frugalray.serve.usage).

greedy and self_consistency keep `max_completion_tokens` and `max_flops` too: their single
round is sized for its worst case (fewer samples, or one shorter sample).

The adaptive strategies never exceed max_samples, max_completion_tokens or max_flops: each
round is sized for its worst case before it is sent.

Only pydantic models and their field types live here (as vLLM keeps its protocol.py to models);
reading a body into them with OpenAI-style 400s is frugalray.serve.validation, the answer kinds
are frugalray.examples.answers, and usage and FLOPs are frugalray.serve.usage.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from frugalray.examples.answers import AnswerKind, compile_answer_regex

Strategy = Literal["self_consistency", "greedy", "adaptive_consistency", "best_of_n", "cascade", "auto"]
ScoreWith = Literal["logprob", "reward_model"]
# Strategies driven round by round by a frugalray.serve.stopping policy.
ADAPTIVE_STRATEGIES = ("adaptive_consistency", "best_of_n", "cascade", "auto")
MAX_ANSWER_REGEX_CHARS = 200


class ComputeBudget(BaseModel):
    """What a client may ask for; the operator's ceiling is enforced by `request_model`."""

    # strict: "4" or 4.0 or true for max_samples is a client bug, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)

    max_samples: int | None = Field(None, ge=1, description="samples to draw at most; None = server default")
    strategy: Strategy = "self_consistency"
    answer_extractor: AnswerKind = "number"
    max_completion_tokens: int | None = Field(None, ge=1, description="completion tokens summed over samples")
    max_flops: float | None = Field(None, gt=0, allow_inf_nan=False, description="forward FLOPs of the request")
    confidence: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False,
                                     description="stopping threshold; None = server default")
    round_size: int | None = Field(None, ge=1, description="samples per round; None = server default")
    answer_regex: str | None = Field(None, min_length=1, max_length=MAX_ANSWER_REGEX_CHARS,
                                     validate_default=True, description="pattern for answer_extractor=regex (group 1 or whole match)")
    escalate_to: str | None = Field(None, min_length=1, max_length=200,
                                    description="cascade: the served model/adapter that samples after escalating")
    score_with: ScoreWith | None = Field(None, description="best_of_n: score samples by their own mean logprob "
                                         "('logprob') or by the server's reward_model ('reward_model')")

    @field_validator("max_flops", "confidence", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        # strict floats still take ints (fine) but must not take True/False
        if isinstance(value, bool):
            raise ValueError("must be a number, not a boolean")  # noqa: TRY004 - pydantic reports ValueError
        return value

    @field_validator("answer_regex", mode="after")
    @classmethod
    def _regex_compiles(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("answer_extractor") == "regex":
            raise ValueError("answer_extractor='regex' needs a pattern in answer_regex")
        if value is not None:
            try:
                compile_answer_regex(value)
            except Exception as err:  # noqa: BLE001 - any compile error is the client's
                raise ValueError(f"not a valid regular expression ({err})") from None
            if info.data.get("answer_extractor") != "regex":
                raise ValueError("only used with answer_extractor='regex'; set it or drop answer_regex")
        return value


@lru_cache(maxsize=16)
def request_model(max_samples_ceiling: int, max_tokens_ceiling: int,
                  request_timeout_s: float = 86400.0) -> type[BaseModel]:
    """The fields of a chat/completions request the ingress acts on, with the operator's limits.

    Other OpenAI fields pass through (extra="allow") and vLLM's own request model checks them
    (vLLM ignores fields it does not know, with a warning in the server log).
    """

    class BoundedComputeBudget(ComputeBudget):
        max_samples: int | None = Field(None, ge=1, le=max_samples_ceiling)
        max_completion_tokens: int | None = Field(None, ge=1, le=max_samples_ceiling * max_tokens_ceiling)
        round_size: int | None = Field(None, ge=1, le=max_samples_ceiling)

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
        # OpenAI's effort knob (frugalray.serve.effort maps it onto a compute-budget preset) and vLLM's
        # per-request thinking budget (models served with a reasoning parser only).
        reasoning_effort: str | None = Field(None, strict=True)
        thinking_token_budget: int | None = Field(None, ge=0, strict=True)
        # frugalray extensions (outside OpenAI's spec): see the module docstring.
        compute_budget: BoundedComputeBudget | None = None
        timeout_s: float | None = Field(None, gt=0.0, le=request_timeout_s, allow_inf_nan=False,
                                        description="a deadline shorter than the server's request_timeout_s")

        @field_validator("timeout_s", "temperature", mode="before")
        @classmethod
        def _a_number(cls, value: Any) -> Any:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError("must be a number")
            return value

    BudgetedRequest.budget_model = BoundedComputeBudget  # what reasoning_effort presets are validated into
    return BudgetedRequest
