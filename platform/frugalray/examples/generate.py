"""Built-in verifiable tasks of graded difficulty, with optional injected noise.

The embedded default data set, so that every stage runs anywhere without a download.
Each row is a short question with one correct answer that the one answer rule
(`frugalray.examples.answers.is_correct`) checks, so a model's accuracy is measurable by exact match.

Families:
- `arithmetic`: "What is 23 + 58? Reply with only the number." Difficulty = operand digits.
- `compare`: "Which number is larger: 47 or 52? Reply with only the number."
  Difficulty = operand digits (larger numbers share more leading digits, so it gets harder).

Response styles: `number` (the default above: the reply is the bare answer) or `worked`:
"What is 23 + 58?" -> "23 + 58 = 81", "Which number is larger: 47 or 52?" -> "The larger is 52."
A small model answers better when it writes the equation out first: the 135M default does so on
its own (65% of 1-digit sums right untrained), and fine-tuning it on bare answers dropped that
to 42% after 12 steps whatever the data, while worked rows took it above 90%. So `worked` rows
measure what the data teaches rather than the cost of a format the model is bad at.

Noise (`noise_rate` > 0) replaces exactly round(noise_rate * n_rows) rows with a corrupted
version and labels each with its `noise_kind`, so that a data-selection method can be scored
on how many bad rows it removes:
- `wrong_answer`: the response is a wrong number (`answer` keeps the true one);
- `garbled`: the response is random characters;
- `exact_duplicate`: a copy of another (clean) row under a new id;
- `near_duplicate`: another clean row with its instruction slightly reworded;
- `empty_response`: the response is empty (the loaders quarantine these).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from frugalray.config import StrictModel

TaskFamily = Literal["arithmetic", "compare"]
ResponseStyle = Literal["number", "worked"]
NoiseKind = Literal["wrong_answer", "garbled", "exact_duplicate", "near_duplicate", "empty_response"]
Operation = Literal["+", "-", "*"]

ALL_FAMILIES: tuple[str, ...] = ("arithmetic", "compare")
ALL_NOISE_KINDS: tuple[str, ...] = ("wrong_answer", "garbled", "exact_duplicate", "near_duplicate", "empty_response")
DIFFICULTY_LABELS = {1: "easy", 2: "medium", 3: "hard"}
REPLY_SUFFIX = "Reply with only the number."


class GenerateConfig(StrictModel):
    n_rows: int = Field(default=200, ge=1, description="rows to generate, noisy ones included")
    families: list[TaskFamily] = Field(default_factory=lambda: ["arithmetic"], min_length=1)
    max_digits: int = Field(default=2, ge=1, le=3, description="operands have 1..max_digits digits")
    operations: list[Operation] = Field(default_factory=lambda: ["+", "-"], min_length=1)
    noise_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    noise_kinds: list[NoiseKind] = Field(default_factory=lambda: list(ALL_NOISE_KINDS), min_length=1)
    response_style: ResponseStyle = Field(
        default="number", description="number: the bare answer; worked: the equation written out, then the answer")
    seed: int = 0
    output_path: str = "runs/data/tasks.jsonl"

    @model_validator(mode="after")
    def _duplicates_need_a_clean_row(self) -> GenerateConfig:
        n_noisy = noisy_row_count(self.n_rows, self.noise_rate)
        copies = {"exact_duplicate", "near_duplicate"} & set(self.noise_kinds)
        if copies and n_noisy >= self.n_rows:
            raise ValueError(
                f"noise_rate: {self.noise_rate} makes all {self.n_rows} rows noisy, but {sorted(copies)} "
                "need a clean row to copy; lower noise_rate or raise n_rows"
            )
        return self


def noisy_row_count(n_rows: int, noise_rate: float) -> int:
    return round(noise_rate * n_rows)


def _operand(rng: random.Random, digits: int) -> int:
    low = 1 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _arithmetic(rng: random.Random, digits: int, operations: list[str]) -> tuple[str, str, str]:
    """(question, answer, worked prefix): the worked response is the prefix followed by the answer."""
    op = rng.choice(operations)
    a, b = _operand(rng, digits), _operand(rng, digits)
    if op == "-" and b > a:
        a, b = b, a  # keep answers non-negative: negatives are a different skill
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", str(value), f"{a} {op} {b} = "


def _compare(rng: random.Random, digits: int) -> tuple[str, str, str]:
    a = _operand(rng, digits)
    b = a
    while b == a:
        b = _operand(rng, digits)
    return f"Which number is larger: {a} or {b}?", str(max(a, b)), "The larger is "


def _clean_row(rng: random.Random, row_id: str, families: list[str], max_digits: int, operations: list[str],
               style: str = "number") -> dict:
    family = rng.choice(families)
    difficulty = rng.randint(1, max_digits)
    if family == "arithmetic":
        question, answer, prefix = _arithmetic(rng, difficulty, operations)
    elif family == "compare":
        question, answer, prefix = _compare(rng, difficulty)
    else:  # pragma: no cover - the config's Literal guards this
        raise ValueError(f"families: unknown family {family!r}; use one of {ALL_FAMILIES}")
    if style == "worked":
        instruction, response = question, prefix + answer + ("." if family == "compare" else "")
    else:
        instruction, response = f"{question} {REPLY_SUFFIX}", answer
    return _row(row_id, family, difficulty, instruction, response, answer, "none")


def _with_answer(response: str, answer: str, replacement: str) -> str:
    """The response with its stated answer (its last occurrence) replaced: bare or worked alike."""
    at = response.rfind(answer)
    return response[:at] + replacement + response[at + len(answer):] if at >= 0 else replacement


def _row(
    row_id: str, family: str, difficulty: int, instruction: str, response: str, answer: str, noise_kind: str,
    duplicate_of: str = "",
) -> dict:
    return {
        "id": row_id,
        "family": family,
        "difficulty": difficulty,
        "difficulty_label": DIFFICULTY_LABELS[difficulty],
        "instruction": instruction,
        "input": "",
        "response": response,
        "answer": answer,
        "messages": [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": response},
        ],
        "noise_kind": noise_kind,
        "duplicate_of": duplicate_of,
    }


def _wrong_number(rng: random.Random, answer: str) -> str:
    true = int(answer)
    offset = rng.choice([-1, 1]) * rng.randint(1, max(3, abs(true) // 4 + 1))
    wrong = true + offset
    if wrong < 0:  # stay plausible: the task never has negative answers
        wrong = true + abs(offset)
    return str(wrong)


def _garble(rng: random.Random) -> str:
    # Letters and punctuation only: no digit, so no number can be extracted from it.
    alphabet = string.ascii_letters + "!?#%&*;:~ "
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(6, 24))).strip() or "#?!"


def _near_duplicate_instruction(rng: random.Random, instruction: str) -> str:
    """A small edit that keeps the question and its answer: casing, spacing or punctuation."""
    edits = [
        lambda s: s[0].lower() + s[1:],
        lambda s: s.replace("? ", "?  ", 1),
        lambda s: s.rstrip("."),
        lambda s: s.replace("Reply with only the number.", "Reply with just the number."),
        lambda s: s.replace("What is", "What's", 1) if s.startswith("What is") else s.replace("Which", "which", 1),
    ]
    edited = rng.choice(edits)(instruction)
    return edited if edited != instruction else instruction + " "


def _corrupt(rng: random.Random, row: dict, kind: str, clean_rows: list[dict]) -> dict:
    if kind == "wrong_answer":
        response = _with_answer(row["response"], row["answer"], _wrong_number(rng, row["answer"]))
        return _row(row["id"], row["family"], row["difficulty"], row["instruction"], response, row["answer"], kind)
    if kind == "garbled":
        return _row(row["id"], row["family"], row["difficulty"], row["instruction"], _garble(rng), row["answer"], kind)
    if kind == "empty_response":
        return _row(row["id"], row["family"], row["difficulty"], row["instruction"], "", row["answer"], kind)
    source = rng.choice(clean_rows)
    instruction = source["instruction"]
    if kind == "near_duplicate":
        instruction = _near_duplicate_instruction(rng, instruction)
    elif kind != "exact_duplicate":  # pragma: no cover - the config's Literal guards this
        raise ValueError(f"noise_kinds: unknown kind {kind!r}; use one of {ALL_NOISE_KINDS}")
    return _row(
        row["id"], source["family"], source["difficulty"], instruction, source["response"], source["answer"], kind,
        duplicate_of=source["id"],
    )


def generate_tasks(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """`cfg.n_rows` rows, deterministic for a given config; exactly round(noise_rate * n) are noisy."""
    rng = random.Random(cfg.seed)
    rows = [
        _clean_row(rng, f"task-{cfg.seed}-{i:06d}", list(cfg.families), cfg.max_digits, list(cfg.operations),
                   cfg.response_style)
        for i in range(cfg.n_rows)
    ]
    n_noisy = noisy_row_count(cfg.n_rows, cfg.noise_rate)
    if n_noisy == 0:
        return rows
    noisy_positions = rng.sample(range(cfg.n_rows), n_noisy)
    kinds = list(cfg.noise_kinds)
    noisy_set = set(noisy_positions)
    clean_rows = [r for i, r in enumerate(rows) if i not in noisy_set]
    # Round-robin over kinds: counts differ by at most one, and every kind appears once n_noisy >= len(kinds).
    for k, position in enumerate(noisy_positions):
        rows[position] = _corrupt(rng, rows[position], kinds[k % len(kinds)], clean_rows)
    return rows


def make_eval_set(
    n: int,
    seed: int,
    families: Iterable[str] = ("arithmetic",),
    max_digits: int = 2,
    operations: Iterable[str] = ("+", "-"),
    exclude_instructions: Iterable[str] = (),
    response_style: ResponseStyle = "number",
) -> list[dict[str, Any]]:
    """`n` clean held-out questions with distinct instructions, none in `exclude_instructions`.

    Use a seed different from the training set's. When the question space is too small
    (1-digit sums) to find `n` unseen questions, the remainder may repeat.
    """
    rng = random.Random(seed)
    families, operations = list(families), list(operations)
    excluded = set(exclude_instructions)
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        row = _clean_row(rng, f"eval-{seed}-{len(rows):06d}", families, max_digits, operations, response_style)
        attempts += 1
        if row["instruction"] in excluded and attempts < 50 * n:
            continue
        excluded.add(row["instruction"])
        rows.append(row)
    return rows


def told_to_reply_briefly(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same questions with "Reply with only the number." appended where it is missing (worked-style
    rows), for scoring an untrained model at its best: untold, it often explains at length and is cut off."""
    return [r if r["instruction"].endswith(REPLY_SUFFIX) else {**r, "instruction": f"{r['instruction']} {REPLY_SUFFIX}"}
            for r in rows]


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as `.jsonl` or `.parquet` (by suffix), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with open(path, "w") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"output_path: '{path}' must end in .jsonl or .parquet")
    return path
