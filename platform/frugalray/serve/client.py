"""A small evaluation client for a served model (the official `openai` client underneath).

    result = evaluate(base_url, "smollm2-135m-instruct", rows, max_tokens=16)
    result.accuracy, result.usage["flops"]   # summed over rows (the server's usage.frugalray.flops)

Rows carry `prompt` (or `instruction`, with an optional `input`) and the gold `answer`;
answers are compared after the same pure extraction the server's vote uses.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, Field

from frugalray.examples.answers import AnswerKind, extract_answer
from frugalray.serve.usage import usage_extension

log = logging.getLogger(__name__)


class EvalResult(BaseModel):
    model: str
    n: int
    correct: int
    accuracy: float
    answers: list[str | None] = Field(description="extracted answer per row, in row order")
    gold: list[str | None]
    usage: dict[str, float] = Field(description="prompt_tokens and completion_tokens (OpenAI's usage) and samples "
                                    "and flops (usage.frugalray), each summed over the rows")


def row_prompt(row: dict[str, Any]) -> str:
    if row.get("prompt"):
        return str(row["prompt"])
    if row.get("instruction"):
        extra = row.get("input")
        return f"{row['instruction']}\n\n{extra}" if extra else str(row["instruction"])
    raise ValueError(f"row has neither 'prompt' nor 'instruction': keys {sorted(row)}")


def sent_temperature(temperature: float | None, budgeted: bool) -> dict[str, float]:
    """The `temperature` field `evaluate` sends: the caller's; else 0.0 for a plain request (greedy),
    none for a budgeted one (the server's sample_temperature; 0 there is refused, not replaced)."""
    if temperature is not None:
        return {"temperature": temperature}
    return {} if budgeted else {"temperature": 0.0}


def evaluate(
    base_url: str,
    model: str,
    rows: list[dict[str, Any]],
    max_tokens: int = 32,
    compute_budget: dict[str, Any] | None = None,
    api_key: str | None = None,
    answer_extractor: AnswerKind = "number",
    temperature: float | None = None,
    concurrency: int = 4,
    timeout_s: float = 300.0,
) -> EvalResult:
    """Ask the served `model` every row's prompt and score the extracted answers.

    `temperature` None: a plain request decodes greedily, a `compute_budget` one samples at the
    server's `sample_temperature` (sent_temperature).
    """
    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=0)
    extra_body = {"compute_budget": compute_budget} if compute_budget else None
    sent = sent_temperature(temperature, budgeted=bool(compute_budget))

    def ask(row: dict[str, Any]):
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": row_prompt(row)}],
            max_tokens=max_tokens,
            extra_body=extra_body,
            **sent,
        )
        return resp.choices[0].message.content, (resp.usage.model_dump() if resp.usage else {})

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        outputs = list(tqdm(pool.map(ask, rows), total=len(rows), desc=f"eval {model}", leave=False))

    answers = [extract_answer(text, answer_extractor) for text, _ in outputs]
    gold = [extract_answer(str(row["answer"]), answer_extractor) for row in rows]
    correct = sum(a is not None and a == g for a, g in zip(answers, gold))
    totals: dict[str, float] = {"prompt_tokens": 0, "completion_tokens": 0, "samples": 0, "flops": 0.0}
    for _, usage in outputs:
        figures = usage_extension(usage)
        for key in totals:
            value = usage.get(key) if key in ("prompt_tokens", "completion_tokens") else figures.get(key)
            if isinstance(value, (int, float)):
                totals[key] += value
    log.info("eval %s: %d/%d correct", model, correct, len(rows))
    return EvalResult(model=model, n=len(rows), correct=correct,
                      accuracy=correct / len(rows) if rows else 0.0,
                      answers=answers, gold=gold, usage=totals)
