"""The one answer rule (frugalray.examples.answers): a table of the texts it meets, from generated
rows, a small model's replies, GSM8K solutions and serving clients' other answer kinds."""

from __future__ import annotations

import pytest

from frugalray.examples.answers import extract_answer, is_correct, normalize_number, states_answer
from frugalray.examples.generate import GenerateConfig, generate_tasks

RULE_TABLE = [
    # bare numbers: the `number` style rows and a model told to reply with only the number
    ("81", "81"),
    ("81.", "81"),
    ("**81**", "81"),
    ("007", "7"),
    ("-7", "-7"),
    ("-7 apples", "-7"),
    ("1,234", "1234"),
    ("It costs 1,250 dollars", "1250"),
    ("2.50", "2.5"),
    ("1000.0", "1000"),
    ("1,2,3", "3"),  # not a thousands group: three numbers
    # worked answers: the number after the last '=' / 'is' a number follows, never an operand
    ("23 + 58 = 81", "81"),
    ("2 + 9 = 11", "11"),
    ("9 - 9 is 0.", "0"),
    ("3 - 5 = -2", "-2"),
    ("The larger is 52.", "52"),
    ("The answer is 81.", "81"),
    ("The answer is -12", "-12"),
    ("This is 5", "5"),  # 'is' is a word: 'This' is no marker
    ("23 + 58 = 81 is the answer.", "81"),
    ("81 is the answer.", "81"),
    ("First, 20 + 50 = 70. Then 3 + 8 = 11. So 70 + 11 = 81.", "81"),
    # cut off after the marker: no answer stated (never the first operand)
    ("2 + 9 = ", None),
    ("23 + 58 =", None),
    ("What is 2 + 9? 2 + 9 = ", None),
    ("Let's add 2 and 9.\n2 + 9 = ", None),
    ("The answer is", None),
    # the reply ends where the model asks itself a new question: its next turn is not graded
    ("3 + 4 = 7\nWhat is 5 + 3? 5 + 3 = 8", "7"),
    ("81\nWhat is 45 + 12? 45 + 12 = 57", "81"),
    ("81\n\nWhat is 45 + 12?", "81"),
    # within the reply the last stated result wins: a chain of steps ends in its answer (an
    # unasked second sum looks the same as a step, so it wins too)
    ("20 + 50 = 70\n3 + 8 = 11\n70 + 11 = 81", "81"),
    ("23 + 58 = 81\n\n45 + 12 = 57", "57"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips in all.", "72"),
    # 'is' states a result only when a number follows it
    ("The larger is 52. 52 is bigger than 47.", "52"),
    ("52 is larger than 47", "47"),  # no stated result: the last number (a vote, not a grade)
    ("7 - 6 is 3.\nSo 1", "3"),
    ("Let's add 23 and 58.\n23 + 58 = 81", "81"),  # a preamble's numbers are not the answer
    ("2 + 9 =\n11", "11"),  # not cut off: the answer is on the next line
    # a question, restated or made up, is not an answer
    ("What is 23 + 58?\n81", "81"),
    ("Which number is larger: 47 or 52? 52", "52"),
    ("Is it 81?", None),
    # no marker: the last number of the first line that holds one
    ("23 plus 58 equals 81.", "81"),
    ("81 or 82", "82"),
    ("10-3", "3"),  # a hyphen between digits is a minus, not a sign
    # GSM8K: '####' marks the final answer
    ("#### 72", "72"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
    ("#### no digits here, but 5 before", "5"),
    ("#### 1,000", "1000"),
    # no answer at all
    ("", None),
    (None, None),
    ("no digits here", None),
    ("fA:*UyiCDmO&;", None),
]


@pytest.mark.parametrize("text, expected", RULE_TABLE)
def test_the_answer_rule(text, expected):
    assert extract_answer(text) == expected
    assert extract_answer(text, "number") == expected  # serving's default kind is the same rule


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7", "7"),
        ("3 + 4 = 7.", "7"),
        ("The answer is -12", "-12"),
        ("It costs 1,250 dollars", "1250"),
        ("1000.0", "1000"),
        ("2.50", "2.5"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### no digits here, but 5 before", "5"),
        ("no number at all", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_number(text, expected):
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(
    "text,expected",
    [("81", "81"), ("The answer is 81.", "81"), ("1,234", "1234"), ("-7 apples", "-7"), ("007", "7"),
     ("", None), (None, None), ("no digits here", None),
     # replies that restate the question: the answer after the last '=' / 'is', never an operand
     ("2 + 9 = 11", "11"), ("9 - 9 is 0.", "0"), ("2 + 9 = ", None), ("7 - 6 is 3.\nSo 1", "3")],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number():
    assert normalize_number("1,000") == normalize_number("1000.0") == normalize_number("1000") == "1000"
    assert normalize_number("-0") == "0" and normalize_number("0.50") == "0.5"
    assert normalize_number("x") is None


def test_is_correct():
    row = {"family": "arithmetic", "answer": "81"}
    assert is_correct("It is 81.", row) and not is_correct("80", row) and not is_correct("", row)


def test_states_answer_reads_the_reference_like_a_response():
    assert states_answer("23 + 58 = 81", 81) and states_answer("81", "81.0") and states_answer("81", "The answer is 81")
    assert states_answer("1,024", "1024") and not states_answer("2 + 9 = ", "11") and not states_answer(None, "11")
    # a reference without a number: the whole text, up to case, spacing and edge punctuation
    assert states_answer("Paris.", "paris") and states_answer('"New   York"', "new york")
    assert not states_answer("Lyon", "Paris") and not states_answer(None, "Paris")


@pytest.mark.parametrize("style", ["number", "worked"])
def test_generated_rows_state_their_answer_and_only_wrong_answer_noise_misses(style):
    rows = generate_tasks(GenerateConfig(n_rows=300, families=["arithmetic", "compare"], max_digits=3,
                                         operations=["+", "-", "*"], noise_rate=0.3, response_style=style, seed=5))
    for row in rows:
        assert extract_answer(row["answer"]) == row["answer"]
        assert is_correct(row["response"], row) == (row["noise_kind"] not in ("wrong_answer", "garbled", "empty_response"))


def test_extract_exact_normalizes_case_space_and_edge_punctuation():
    assert extract_answer("  Paris. ", "exact") == "paris"
    assert extract_answer('"New   York"', "exact") == "new york"
    assert extract_answer(" ... ", "exact") is None
    with pytest.raises(ValueError, match="answer_extractor"):
        extract_answer("x", "regex")  # a regex without a pattern
    with pytest.raises(ValueError, match="answer_extractor"):
        extract_answer("x", "xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (c).", "C"),
        ("Answer: E", "E"),
        ("B) Paris", "B"),
        ("C", "C"),
        ("A dog. I pick (D)", "D"),
        ("I think it's C", "C"),
        ("no letter here", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_answer(text, "choice") == expected


def test_extract_regex_takes_group_one_of_the_last_match_and_times_out_safely():
    assert extract_answer("final: 3 ... final: 42 apples", "regex", r"final:\s*(\d+)") == "42"
    assert extract_answer("say  yes  please", "regex", r"yes\s+please") == "yes please"
    assert extract_answer("nothing", "regex", r"\d+") is None
    # catastrophic backtracking gives up (None) instead of hanging the ingress
    assert extract_answer("a" * 5000 + "!", "regex", r"(a+)+$") is None
