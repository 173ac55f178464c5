"""What answer a text states: the one rule that data generation, the verifier, pass rates,
held-out accuracy and serving's vote all use, so that training-side checking and serving-side
voting cannot disagree about the same text.

    extract_answer("23 + 58 = 81")                  -> "81"
    extract_answer("2 + 9 = ")                      -> None   (cut off: no answer stated)
    is_correct("The answer is 81.", {"answer": 81}) -> True

The rule (`extract_answer`'s default `number` kind) is written out, with its reasons, in
`extract_answer`'s docstring and tested on a table of cases in tests/unit/test_answers.py.
The other kinds (`regex`, `exact`, `choice`) are what a serving client may pick instead
(`compute_budget.answer_extractor`) when its answers are not numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Literal

AnswerKind = Literal["number", "regex", "exact", "choice"]
ANSWER_KINDS: tuple[str, ...] = ("number", "regex", "exact", "choice")

# A client's regex runs on the server: bound its time so a pathological pattern cannot hang
# the ingress (the `regex` module, a transformers dependency, supports a timeout).
REGEX_TIMEOUT_S = 0.05

# Thousands-grouped numbers first ("1,234.5"), then plain ones ("-12", "3.75"). A minus sign
# counts only where it cannot be a subtraction ("10-3" is 10 and 3, "= -7" is -7).
_SIGN = r"(?:(?<![\w)\]])-)?"
_NUMBER_PATTERN = rf"{_SIGN}\d{{1,3}}(?:,\d{{3}})+(?:\.\d+)?|{_SIGN}\d+(?:\.\d+)?"
_NUMBER = re.compile(_NUMBER_PATTERN)
# A stated answer: a number right after `=` or `is` ("23 + 58 = 81", "The larger is 52", "= **-7**",
# GSM8K's "<<48/2=24>>"); "52 is bigger than 47" states nothing with its `is`.
_STATED = re.compile(rf"(?:=|\bis\b)[ \t]*[*$]*[ \t]*({_NUMBER_PATTERN})", re.IGNORECASE)
_ENDS_ON_MARKER = re.compile(r"(?:=|\bis)\s*$", re.IGNORECASE)
_GSM8K_MARKER = "####"
_EDGE_PUNCT = " \t\n\r.,;:!?\"'`*()[]{}"

_CHOICE_STATED = re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)
_CHOICE_LEADING = re.compile(r"^\s*\(?([A-J])(?:[).:]|\s*$)")
_CHOICE_PAREN = re.compile(r"\(([A-J])\)")
_CHOICE_BARE = re.compile(r"(?<![A-Za-z'])([A-J])(?![A-Za-z'])")


# -- the rule --------------------------------------------------------------------------------------


def extract_answer(text: str | None, kind: AnswerKind = "number", pattern: str | None = None) -> str | None:
    r"""The answer `text` states, normalized, or None when it states none.

    number (the rule; every caller in frugalray uses it unless a serving client asks otherwise):
      1. GSM8K's `####`: when a number follows the last `####`, only what follows it is read
         ("...48/2 = 24 clips.\n#### 72" -> "72").
      2. The reply: each line is read after its last `?` (a restated question is not an answer:
         "What is 2 + 3?\n5" -> "5"), and the reply ends at a line that asks a new question once a
         number has been stated: a small model often invents its next turn
         ("3 + 4 = 7\nWhat is 5 + 3? 5 + 3 = 8" -> "7").
      3. A reply that ends on `=` or `is` was cut off and states no answer ("2 + 9 = " -> None,
         never the first operand).
      4. The last stated result: a number right after `=` or `is` ("23 + 58 = 81" -> "81", "The
         larger is 52." -> "52"), the last one in the reply, so a chain of steps is read by its
         final step ("20 + 50 = 70\n3 + 8 = 11\n70 + 11 = 81" -> "81"; a GSM8K solution without
         `####` by its last equation). "52 is bigger than 47" states no result with its `is`.
      5. Nothing stated that way: the last number in the reply ("23 plus 58 makes 81" -> "81",
         "81 or 82" -> "82"); no number at all: None.
      Numbers: a sign ("-7"), thousands groups ("1,234"), decimals ("2.50"); normalized so that
      "1,000", "1000.0" and "1000" compare equal (-> "1000"), and "2.50" gives "2.5".
    regex:  the last match of `pattern`: its group 1 when it has groups, else the whole match,
            whitespace collapsed (matching gives up after REGEX_TIMEOUT_S: None).
    exact:  the whole text, trimmed of edge punctuation, lower-cased, whitespace collapsed.
    choice: a multiple-choice letter A-J, upper-cased: a stated answer ("answer is (C)"),
            else a leading marked one ("B) ...", "C."), else the last "(X)", else the last lone letter.
    """
    if text is None:
        return None
    if kind == "number":
        return _extract_number(text)
    if kind == "exact":
        cleaned = " ".join(text.strip(_EDGE_PUNCT).lower().split())
        return cleaned or None
    if kind == "choice":
        return _extract_choice(text)
    if kind == "regex":
        if not pattern:
            raise ValueError("answer_extractor 'regex' needs a pattern (answer_regex)")
        return _extract_regex(text, pattern)
    raise ValueError(f"answer_extractor: unknown kind {kind!r}; use one of {', '.join(ANSWER_KINDS)}")


def normalize_number(token: str) -> str | None:
    """A number token in one spelling: "1,000", "1000.0", "1000" -> "1000"; "2.50" -> "2.5"; else None."""
    try:
        value = Decimal(token.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _extract_number(text: str) -> str | None:
    if _GSM8K_MARKER in text:
        tail = text.rsplit(_GSM8K_MARKER, 1)[1]
        if _NUMBER.search(tail):
            text = tail
    reply = _reply(text)
    if _ENDS_ON_MARKER.search(reply):
        return None  # cut off right after "=" / "is": the numbers before it are the question's
    stated = _STATED.findall(reply)
    if stated:
        return normalize_number(stated[-1])
    numbers = _NUMBER.findall(reply)
    return normalize_number(numbers[-1]) if numbers else None


def _reply(text: str) -> str:
    """The reply to the question asked: each line after its last `?`, up to a line that asks a new
    question once a number has been stated (the model's next, made-up turn)."""
    kept: list[str] = []
    for line in text.strip().splitlines():
        if "?" in line and any(_NUMBER.search(previous) for previous in kept):
            break
        kept.append(line.rsplit("?", 1)[-1])
    return "\n".join(kept)


# -- checking against a reference ------------------------------------------------------------------


def states_answer(text: str | None, reference: Any) -> bool:
    """Does `text` state `reference` (81, "81", or a text such as "The answer is 81")?

    Both sides are read by `extract_answer`. A reference that states no number ("Paris") must
    equal the text up to case, spacing and edge punctuation (the `exact` kind).
    """
    expected = extract_answer(str(reference))
    if expected is not None:
        return extract_answer(text) == expected
    expected = extract_answer(str(reference), "exact")
    return expected is not None and extract_answer(text, "exact") == expected


def is_correct(text: str | None, row: Mapping[str, Any]) -> bool:
    """Does `text` state the row's `answer`? (A generated task row, or any row with an answer.)"""
    return states_answer(text, row["answer"])


# -- the kinds a serving client may choose ---------------------------------------------------------


@lru_cache(maxsize=256)
def compile_answer_regex(pattern: str):
    """A client's `answer_regex`, compiled once (raises on an invalid pattern)."""
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
        found = list(compile_answer_regex(pattern).finditer(text, timeout=REGEX_TIMEOUT_S))
    except TimeoutError:
        return None
    if not found:
        return None
    match = found[-1]
    value = match.group(1) if match.re.groups >= 1 else match.group(0)
    cleaned = " ".join((value or "").strip().split())
    return cleaned or None
