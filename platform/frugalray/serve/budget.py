"""Per-request compute budgets: the pure logic behind the serving ingress.

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
- `answer_extractor`: `number` | `regex` (with `answer_regex`, group 1 or the whole match) |
  `exact` | `choice` (a multiple-choice letter A-J).
- `escalate_to` (cascade only): the served model/adapter that samples after escalating
  (default: the operator's `cascade_escalate_to`, else the requested model).
- `score_with` (best_of_n only): `logprob` (default: each sample's own mean token logprob) or
  `reward_model` (the mean logprob the operator's `reward_model` gives the sample's tokens).

Also outside OpenAI's spec, at the top level: `timeout_s`, a deadline shorter than the
server's `request_timeout_s` (past it: HTTP 504).

greedy and self_consistency keep `max_completion_tokens` and `max_flops` too: their single
round is sized for its worst case (fewer samples, or one shorter sample).

The adaptive strategies never exceed max_samples, max_completion_tokens or max_flops: each
round is sized for its worst case before it is sent.

Everything here is plain Python (no Ray, no vLLM) so it is unit-tested on its own: request
validation with limits in the types, answer extraction, majority voting and the FLOP and
usage arithmetic.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from frugalray.budget.flops import ModelShape, forward_flops_per_token
from frugalray.serve.stopping import Sample

Strategy = Literal["self_consistency", "greedy", "adaptive_consistency", "best_of_n", "cascade", "auto"]
AnswerKind = Literal["number", "regex", "exact", "choice"]
ScoreWith = Literal["logprob", "reward_model"]
# Strategies driven round by round by a frugalray.serve.stopping policy.
ADAPTIVE_STRATEGIES = ("adaptive_consistency", "best_of_n", "cascade", "auto")
MAX_ANSWER_REGEX_CHARS = 200


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
                _compile_answer_regex(value)
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


def check_chat_messages(messages: Any) -> None:
    """Shapes vLLM's chat parser only rejects deep inside the engine (as a 500): refuse them as a 400 here.

    Each message is an object with a string `role` and a `content` that is a string, null, or a
    list of content parts (objects with a string `type`).
    """
    if not isinstance(messages, list):
        return  # the request types report a non-list `messages`
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: must be an object with role and content", param=where)
        if not isinstance(message.get("role"), str):
            raise RequestError(f"{where}.role: must be a string such as 'user'", param=f"{where}.role")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content: must be a string, null, or a list of content parts",
                               param=f"{where}.content")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise RequestError(f"{where}.content[{j}]: a content part is an object with a string 'type'",
                                   param=f"{where}.content[{j}]")


def parse_request(body: Any, max_samples_ceiling: int, max_tokens_ceiling: int,
                  request_timeout_s: float = 86400.0) -> BaseModel:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", param=None)
    check_chat_messages(body.get("messages"))
    try:
        return request_model(max_samples_ceiling, max_tokens_ceiling, request_timeout_s).model_validate(body)
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


_CHOICE_STATED = re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)
_CHOICE_LEADING = re.compile(r"^\s*\(?([A-J])(?:[).:]|\s*$)")
_CHOICE_PAREN = re.compile(r"\(([A-J])\)")
_CHOICE_BARE = re.compile(r"(?<![A-Za-z'])([A-J])(?![A-Za-z'])")
# A client's regex runs on the server: bound its time so a pathological pattern cannot hang
# the ingress (the `regex` module, a transformers dependency, supports a timeout).
REGEX_TIMEOUT_S = 0.05


def _compile_answer_regex(pattern: str):
    return _compiled_regex(pattern)


@lru_cache(maxsize=256)
def _compiled_regex(pattern: str):
    import regex

    return regex.compile(pattern)


def _extract_choice(text: str) -> str | None:
    for rule, pick in ((_CHOICE_STATED, -1), (_CHOICE_LEADING, 0), (_CHOICE_PAREN, -1), (_CHOICE_BARE, -1)):
        found = rule.findall(text)
        if found:
            return found[pick].upper()
    return None


def _extract_regex(text: str, pattern: str) -> str | None:
    try:
        found = list(_compiled_regex(pattern).finditer(text, timeout=REGEX_TIMEOUT_S))
    except TimeoutError:
        return None
    if not found:
        return None
    match = found[-1]
    value = match.group(1) if match.re.groups >= 1 else match.group(0)
    cleaned = " ".join((value or "").strip().split())
    return cleaned or None


def extract_answer(text: str | None, kind: AnswerKind = "number", pattern: str | None = None) -> str | None:
    """The answer a completion commits to, or None when it commits to none.

    number: the last number in the text (after a GSM8K-style `####` when present),
            normalized so that "1,000", "1000.0" and "1000" compare equal.
    regex:  the last match of `pattern`: its group 1 when it has groups, else the whole
            match, whitespace collapsed (matching gives up after REGEX_TIMEOUT_S: None).
    exact:  the whole text, trimmed of edge punctuation, lower-cased, whitespace collapsed.
    choice: a multiple-choice letter A-J, upper-cased: a stated answer ("answer is (C)"),
            else a leading marked one ("B) ...", "C."), else the last "(X)", else the last lone letter.
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
    if kind == "choice":
        return _extract_choice(text)
    if kind == "regex":
        if not pattern:
            raise ValueError("answer_extractor 'regex' needs a pattern (answer_regex)")
        return _extract_regex(text, pattern)
    raise ValueError(f"answer_extractor: unknown kind {kind!r}; use 'number', 'regex', 'exact' or 'choice'")


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


# --- engine responses -> policy samples ----------------------------------------------------


def choice_text(choice: dict[str, Any]) -> str | None:
    if "message" in choice:
        return (choice.get("message") or {}).get("content")
    return choice.get("text")


def token_logprobs(choice: dict[str, Any]) -> list[float] | None:
    """The sampled tokens' logprobs of a chat or completions choice, when the engine sent them."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        return None
    if "content" in logprobs:  # chat
        return [t.get("logprob") for t in logprobs.get("content") or []]
    return list(logprobs.get("token_logprobs") or [])  # completions


def samples_from_choices(choices: list[dict[str, Any]], totals: list[int], kind: AnswerKind = "number",
                         pattern: str | None = None) -> list[Sample]:
    """Stopping-policy samples from one engine response's choices.

    Per-sample token counts come from the logprobs (one entry per generated token); without
    them, the round's total is spread evenly (`totals` is per choice or one round total).
    """
    if len(totals) == len(choices):
        fallback = list(totals)
    else:
        base, extra = divmod(sum(totals), max(len(choices), 1))
        fallback = [base + (1 if i < extra else 0) for i in range(len(choices))]
    samples = []
    for choice, spread in zip(choices, fallback):
        logprobs = token_logprobs(choice)
        finite = [lp for lp in (logprobs or []) if isinstance(lp, (int, float)) and not math.isnan(lp)]
        samples.append(Sample(
            answer=extract_answer(choice_text(choice), kind, pattern),
            completion_tokens=len(logprobs) if logprobs is not None and len(totals) != len(choices) else spread,
            mean_logprob=(sum(max(lp, -1e4) for lp in finite) / len(finite)) if finite else None,
        ))
    return samples


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


def scored_tokens_logprob(token_ids: list[int], prompt_logprobs: list[Any] | None, start: int) -> float | None:
    """Mean log-probability the scoring model gave token_ids[start:] (a sample after its prompt).

    `prompt_logprobs` is vLLM's per-position list (None for the first token, else a mapping
    of token id, as a string in JSON, to {"logprob": ...}); the entry of the token actually at
    that position is used. None when there is nothing to score or the entry is missing.
    """
    if not prompt_logprobs or start >= len(token_ids):
        return None
    values = []
    for pos in range(start, min(len(token_ids), len(prompt_logprobs))):
        entry = prompt_logprobs[pos]
        if not isinstance(entry, dict):
            return None
        found = entry.get(str(token_ids[pos]), entry.get(token_ids[pos]))
        logprob = found.get("logprob") if isinstance(found, dict) else found
        if not isinstance(logprob, (int, float)) or math.isnan(logprob):
            return None
        values.append(max(float(logprob), -1e4))
    return sum(values) / len(values) if values else None


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
