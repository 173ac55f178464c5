"""From the engine's responses to the samples a stopping policy votes on (pure Python).

A choice's text and token logprobs (chat or completions), its answer by the one answer rule
(frugalray.examples.answers), and the mean logprob a reward model gave a sample's tokens.
"""

from __future__ import annotations

import math
from typing import Any

from frugalray.examples.answers import AnswerKind, extract_answer
from frugalray.serve.stopping import Sample


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
