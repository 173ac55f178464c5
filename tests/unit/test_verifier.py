"""The verifier scorer (does a response state the row's reference answer) and the selection
filter built on it (`drop_wrong_answer`): pure logic, no Ray, no model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frugalray.config import ConfigError, parse_config
from frugalray.examples.generate import GenerateConfig, generate_tasks
from frugalray.examples.loaders import FieldMapping, load_records
from frugalray.data.score import ScoreConfig, _scorer_settings, output_schema
from frugalray.data.score_columns import SCORER_COLUMNS
from frugalray.data.score_flops import scorer_flops
from frugalray.data.ranking import filter_reasons, select_rows
from frugalray.data.select import SelectConfig, run_select
from frugalray.data.signals import answer_correct


@pytest.mark.parametrize(
    ("response", "reference", "expected"),
    [
        ("11", "11", 1.0),
        ("2 + 9 = 11", "11", 1.0),  # restates the question, then the right answer
        ("2 + 9 = 12", "11", 0.0),  # the same shape with the wrong answer: what perplexity cannot tell
        ("12", "11", 0.0),
        ("The answer is 11.", "11", 1.0),
        ("1,024", "1024", 1.0),
        ("11", 11, 1.0),  # a numeric reference column (Parquet int64)
        ("fA:*UyiCDmO&;", "11", 0.0),  # no answer stated at all is wrong, not unknown
        ("", "11", 0.0),
        ("2 + 9 = ", "11", 0.0),  # cut off: the first operand is not the answer
        ("Paris.", "paris", 1.0),  # a non-numeric reference: the whole response, normalized
        ("Lyon", "Paris", 0.0),
        ("11", None, None),  # no reference: nothing to judge
        ("11", "", None),
        ("11", "  ", None),
        ("11", math.nan, None),  # a missing cell read back as NaN
    ],
)
def test_answer_correct(response, reference, expected):
    assert answer_correct(response, reference) == expected


def test_verifier_flags_exactly_the_wrong_answer_noise_of_generated_tasks():
    rows = generate_tasks(GenerateConfig(n_rows=60, noise_rate=0.5, noise_kinds=["wrong_answer"], seed=4))
    verdicts = {r["id"]: answer_correct(r["response"], r["answer"]) for r in rows}
    assert {r["id"] for r in rows if verdicts[r["id"]] == 0.0} == {r["id"] for r in rows if r["noise_kind"] != "none"}
    assert sum(v == 0.0 for v in verdicts.values()) == 30


def _score_cfg(**extra) -> dict:
    return {"input_path": "in.jsonl", "output_path": "out", **extra}


def test_score_config_refuses_verifier_without_a_reference_answer_field():
    with pytest.raises(ConfigError) as err:
        parse_config(ScoreConfig, _score_cfg(scorers=["perplexity", "verifier"]))
    message = str(err.value)
    assert "fields.answer" in message and "verifier" in message and "set fields.answer" in message
    cfg = parse_config(ScoreConfig, _score_cfg(scorers=["heuristics", "verifier"], fields={"answer": "answer"}))
    assert cfg.fields.answer == "answer"
    # The verifier is a cheap heuristic: no model, zero FLOPs, its settings name the answer column.
    assert scorer_flops(cfg, None, [10, 20], []) == {"heuristics": 0.0, "verifier": 0.0}
    assert _scorer_settings(cfg, "verifier")["answer_column"] == "answer"
    assert SCORER_COLUMNS["verifier"] == ("answer_correct",)
    schema = output_schema([{"id": "a", "prompt": "p", "response": "r", "answer": "1", "source_index": 0}], cfg)
    assert str(schema.field("answer_correct").type) == "double"


def test_mapped_answer_column_must_exist_and_passes_through(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "What is 2 + 9?", "response": "11", "gold": "11"},
        {"instruction": "What is 2 + 9?", "response": "12", "gold": None},
    ]))
    loaded = load_records(path, FieldMapping(answer="gold"))
    assert [r["gold"] for r in loaded.rows] == ["11", None]
    with pytest.raises(ConfigError, match=r"fields\.answer: column 'answer' not in the dataset"):
        load_records(path, FieldMapping(answer="answer"))
    assert "answer" not in FieldMapping().mapped()  # unset: nothing is required of the dataset


def _rows() -> list[dict]:
    # r0-r5 right, r6-r7 wrong, r8 no reference, r9 degenerate and wrong.
    verdicts = [1.0] * 6 + [0.0, 0.0, None, 0.0]
    return [
        {"id": f"r{i}", "prompt": f"What is {i} + 1?", "response": str(i + 1), "perplexity": float(i + 1),
         "n_tokens": 10, "answer_correct": v, "degenerate_reason": "empty" if i == 9 else "",
         "noise_kind": "wrong_answer" if v == 0.0 and i != 9 else "none"}
        for i, v in enumerate(verdicts)
    ]


def test_filter_reasons_drop_wrong_answers_only_when_asked():
    rows = _rows()
    assert filter_reasons(rows) == {}
    assert filter_reasons(rows, drop_wrong_answer=True) == {6: "wrong_answer", 7: "wrong_answer", 9: "wrong_answer"}
    # A row several filters catch gets the first reason; no reference (r8) is never judged.
    assert filter_reasons(rows, drop_degenerate=True, drop_wrong_answer=True) == {
        6: "wrong_answer", 7: "wrong_answer", 9: "degenerate"}
    sel = select_rows(rows, "perplexity", "highest", keep_fraction=1.0,
                      excluded=filter_reasons(rows, drop_wrong_answer=True))
    assert sorted(r["id"] for r in sel.kept) == [f"r{i}" for i in range(6)] + ["r8"]
    assert sel.reason_counts() == {"wrong_answer": 3}


def _write_scored(tmp_path: Path, rows: list[dict]) -> Path:
    scored = tmp_path / "scored"
    scored.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), scored / "part-0.parquet")
    return scored


def test_run_select_reports_wrong_answer_removals(tmp_path):
    scored = _write_scored(tmp_path, _rows())
    cfg = SelectConfig(input_path=str(scored), output_path=str(tmp_path / "kept.jsonl"), keep_fraction=0.5,
                       drop_wrong_answer=True, histograms=False)
    result = run_select(cfg, tmp_path / "run")
    assert result.kept == 5 and result.drop_reasons == {"wrong_answer": 3, "budget": 2}
    kept = [json.loads(line) for line in Path(result.output_path).read_text().splitlines()]
    assert all(r["answer_correct"] != 0.0 for r in kept)
    report = json.loads(Path(result.report_path).read_text())
    assert report["drop_wrong_answer"] is True and report["drop_reasons"]["wrong_answer"] == 3
    assert {ex["id"] for ex in report["drop_examples"]["wrong_answer"]} == {"r6", "r7", "r9"}
    assert report["noise"]["wrong_answer"] == {"in": 2, "dropped": 2, "kept": 0}
    assert "| wrong_answer | 3 |" in Path(result.markdown_report_path).read_text()


def test_run_select_refuses_drop_wrong_answer_without_the_verifier_column(tmp_path):
    scored = _write_scored(tmp_path, [{k: v for k, v in r.items() if k != "answer_correct"} for r in _rows()])
    cfg = SelectConfig(input_path=str(scored), output_path=str(tmp_path / "kept.jsonl"), keep_fraction=0.5,
                       drop_wrong_answer=True, histograms=False)
    with pytest.raises(ConfigError) as err:
        run_select(cfg, tmp_path / "run")
    message = str(err.value)
    assert "drop_wrong_answer: column 'answer_correct' not in" in message and "verifier" in message
    assert "fields.answer" in message
    assert not (tmp_path / "kept.jsonl").exists()  # refused before writing anything


def test_row_scorer_writes_answer_correct_from_the_mapped_column(default_model_path):
    from frugalray.data.scoring_actor import RowScorer

    # Verifier alone: the actor loads the tokenizer (token counts) but no model.
    scorer = RowScorer(default_model_path, max_length=64, scorers=("verifier",), answer_column="gold")
    assert scorer.model is None
    batch = pa.table({
        "prompt": ["What is 2 + 9?", "What is 2 + 9?", "What is 3 + 3?", "Capital of France?"],
        "response": ["2 + 9 = 11", "2 + 9 = 12", "6", "Paris"],
        "gold": ["11", "11", None, "Paris"],
    })
    out = scorer(batch)
    assert out.column("answer_correct").type == pa.float64()
    assert out.column("answer_correct").to_pylist() == [1.0, 0.0, None, 1.0]
    assert all(n > 0 for n in out.column("n_tokens").to_pylist())
