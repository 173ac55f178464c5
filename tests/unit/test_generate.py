"""Built-in verifiable tasks: determinism, exact noise counts and labels, answers the one rule can check."""

from __future__ import annotations

import json
import re
from collections import Counter

import pyarrow.parquet as pq
import pytest
from frugalray.config import ConfigError, parse_config
from frugalray.examples.answers import extract_answer, is_correct
from frugalray.examples.generate import (
    ALL_NOISE_KINDS,
    GenerateConfig,
    generate_tasks,
    make_eval_set,
    write_rows,
)


def _true_value(instruction: str) -> int:
    """Recompute the answer from the question text, independently of the generator."""
    a, b = (int(n) for n in re.findall(r"\d+", instruction))
    if "larger" in instruction:
        return max(a, b)
    op = re.search(r"\d+ ([-+*]) \d+", instruction).group(1)
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def test_same_seed_same_rows_and_other_seed_differs():
    cfg = GenerateConfig(n_rows=50, families=["arithmetic", "compare"], max_digits=3, noise_rate=0.2, seed=7)
    assert generate_tasks(cfg) == generate_tasks(cfg)
    other = generate_tasks(cfg.model_copy(update={"seed": 8}))
    assert [r["instruction"] for r in other] != [r["instruction"] for r in generate_tasks(cfg)]


def test_clean_rows_are_correct_and_well_formed():
    rows = generate_tasks(GenerateConfig(n_rows=200, families=["arithmetic", "compare"], max_digits=3, seed=1))
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
    assert {r["family"] for r in rows} == {"arithmetic", "compare"}
    assert {r["difficulty"] for r in rows} == {1, 2, 3}
    for r in rows:
        assert r["noise_kind"] == "none"
        assert r["difficulty_label"] == {1: "easy", 2: "medium", 3: "hard"}[r["difficulty"]]
        assert r["input"] == "" and r["response"] == r["answer"]
        assert int(r["answer"]) == _true_value(r["instruction"]), r
        assert r["instruction"].endswith("Reply with only the number.")
        assert r["messages"] == [
            {"role": "user", "content": r["instruction"]},
            {"role": "assistant", "content": r["response"]},
        ]
        # Operand digit count is the difficulty.
        operands = re.findall(r"\d+", r["instruction"])
        assert len(operands) == 2 and all(len(o) == r["difficulty"] for o in operands), r


@pytest.mark.parametrize("n_rows,noise_rate", [(100, 0.3), (37, 0.25), (10, 0.05), (11, 0.5)])
def test_exact_noise_count_spread_evenly_with_truthful_labels(n_rows, noise_rate):
    rows = generate_tasks(GenerateConfig(n_rows=n_rows, noise_rate=noise_rate, max_digits=2, seed=3))
    noisy = [r for r in rows if r["noise_kind"] != "none"]
    assert len(rows) == n_rows and len(noisy) == round(noise_rate * n_rows)
    counts = Counter(r["noise_kind"] for r in noisy)
    if len(noisy) >= len(ALL_NOISE_KINDS):
        assert set(counts) == set(ALL_NOISE_KINDS)
    assert max(counts.values(), default=0) - min(counts.get(k, 0) for k in ALL_NOISE_KINDS) <= 1
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == n_rows  # duplicates get new ids
    for r in noisy:
        kind = r["noise_kind"]
        if kind == "wrong_answer":
            assert r["response"] != r["answer"] and r["response"].isdigit()
            assert int(r["answer"]) == _true_value(r["instruction"])
        elif kind == "garbled":
            assert r["response"] and extract_answer(r["response"]) is None
        elif kind == "empty_response":
            assert r["response"] == ""
        elif kind == "exact_duplicate":
            source = by_id[r["duplicate_of"]]
            assert source["noise_kind"] == "none" and source["id"] != r["id"]
            assert (source["instruction"], source["response"]) == (r["instruction"], r["response"])
        elif kind == "near_duplicate":
            source = by_id[r["duplicate_of"]]
            assert source["noise_kind"] == "none"
            assert r["instruction"] != source["instruction"] and r["response"] == source["response"]
            assert re.findall(r"\d+", r["instruction"]) == re.findall(r"\d+", source["instruction"])
        assert r["messages"][1]["content"] == r["response"]


def test_noise_kinds_subset_and_config_errors():
    rows = generate_tasks(GenerateConfig(n_rows=20, noise_rate=0.5, noise_kinds=["garbled"], seed=0))
    assert Counter(r["noise_kind"] for r in rows) == {"garbled": 10, "none": 10}
    with pytest.raises(ConfigError) as err:
        parse_config(GenerateConfig, {"n_rows": 0, "max_digits": 4, "noise_rate": 1.0, "families": ["poetry"]})
    text = str(err.value)
    for name in ("n_rows", "max_digits", "noise_rate", "families"):
        assert name in text
    with pytest.raises(ConfigError, match="noise_rate"):  # every row noisy leaves nothing to duplicate
        parse_config(GenerateConfig, {"n_rows": 1, "noise_rate": 0.9})


def test_eval_set_is_clean_distinct_and_disjoint_from_training():
    train = generate_tasks(GenerateConfig(n_rows=100, max_digits=2, seed=0))
    eval_rows = make_eval_set(40, seed=1, max_digits=2, exclude_instructions=[r["instruction"] for r in train])
    assert len(eval_rows) == 40
    assert all(r["noise_kind"] == "none" for r in eval_rows)
    assert len({r["instruction"] for r in eval_rows}) == 40
    assert not {r["instruction"] for r in eval_rows} & {r["instruction"] for r in train}
    assert make_eval_set(5, seed=1) == make_eval_set(5, seed=1)


def test_write_rows_jsonl_and_parquet(tmp_path):
    rows = generate_tasks(GenerateConfig(n_rows=6, noise_rate=0.5, seed=2))
    jl = write_rows(rows, tmp_path / "a" / "tasks.jsonl")
    assert [json.loads(line) for line in jl.read_text().splitlines()] == rows
    pqp = write_rows(rows, tmp_path / "b" / "tasks.parquet")
    assert pq.read_table(pqp).to_pylist() == rows
    with pytest.raises(ValueError, match="output_path"):
        write_rows(rows, tmp_path / "tasks.csv")


def test_worked_style_writes_the_equation_and_keeps_answers_checkable():
    cfg = GenerateConfig(n_rows=120, families=["arithmetic", "compare"], max_digits=2, noise_rate=0.25,
                         noise_kinds=["wrong_answer"], response_style="worked", seed=3)
    rows = generate_tasks(cfg)
    bare = generate_tasks(cfg.model_copy(update={"response_style": "number"}))
    # Same questions and answers as the bare style, only the wording differs.
    assert [r["answer"] for r in rows] == [r["answer"] for r in bare]
    assert [r["instruction"] for r in rows] == [r["instruction"].replace(" Reply with only the number.", "")
                                               for r in bare]
    for row in rows:
        assert "Reply with only the number" not in row["instruction"]
        if row["family"] == "arithmetic":
            equation = re.fullmatch(r"(\d+) ([-+]) (\d+) = (\d+)", row["response"])
            assert equation, row["response"]
            assert row["instruction"] == f"What is {equation[1]} {equation[2]} {equation[3]}?"
        else:
            assert row["response"].startswith("The larger is ")
        stated = extract_answer(row["response"])
        if row["noise_kind"] == "wrong_answer":
            assert stated is not None and stated != row["answer"]  # the wrong number replaces the answer
        else:
            assert stated == row["answer"] == str(_true_value(row["instruction"]))
    assert sum(r["noise_kind"] == "wrong_answer" for r in rows) == 30


def test_eval_set_in_worked_style():
    rows = make_eval_set(10, seed=2, response_style="worked")
    assert all(r["instruction"].endswith("?") and is_correct(r["response"], r) for r in rows)


def test_told_to_reply_briefly_appends_the_suffix_only_where_missing():
    from frugalray.examples.generate import REPLY_SUFFIX, make_eval_set, told_to_reply_briefly

    worked = make_eval_set(4, seed=3, families=["arithmetic", "compare"], response_style="worked")
    told = told_to_reply_briefly(worked)
    assert [r["instruction"] for r in told] == [f"{r['instruction']} {REPLY_SUFFIX}" for r in worked]
    assert [r["answer"] for r in told] == [r["answer"] for r in worked]
    number = make_eval_set(4, seed=3)
    assert told_to_reply_briefly(number) == number
