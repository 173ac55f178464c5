"""Loaders: every supported format in, every quarantine reason out, and the preflight errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frugalray.config import ConfigError, parse_config
from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows
from frugalray.examples.loaders import FieldMapping, load_records, write_quarantine

ALPACA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"

ROWS = [
    {"id": "a", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"id": "b", "instruction": "Say hi.", "input": "", "output": "hi"},
    {"id": "c", "instruction": "Name a color.", "input": "", "output": "blue"},
]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _check_alpaca_rows(result):
    assert result.rows_in == 3 and not result.quarantined
    assert [r["id"] for r in result.rows] == ["a", "b", "c"]
    assert result.rows[0]["prompt"] == "Add the numbers.\n\n2 and 3"
    assert result.rows[0]["response"] == "5"
    assert result.rows[1]["prompt"] == "Say hi."
    assert result.rows[0]["output"] == "5" and result.rows[0]["instruction"] == "Add the numbers."  # passed through


def test_jsonl(tmp_path):
    _check_alpaca_rows(load_records(_write_jsonl(tmp_path / "d.jsonl", ROWS), FieldMapping.alpaca()))


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    _check_alpaca_rows(load_records(path, FieldMapping.alpaca()))


def test_parquet_file_and_directory(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    _check_alpaca_rows(load_records(tmp_path / "d.parquet", FieldMapping.alpaca()))
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "dir" / "part-0.parquet")
    _check_alpaca_rows(load_records(tmp_path / "dir", FieldMapping.alpaca()))


def test_hf_dataset_dir_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    _check_alpaca_rows(load_records(tmp_path / "hf", FieldMapping.alpaca()))
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "hfdict")
    )
    _check_alpaca_rows(load_records(tmp_path / "hfdict", FieldMapping.alpaca()))
    assert load_records(tmp_path / "hfdict", FieldMapping.alpaca(), split="test").rows_in == 1


def test_generated_tasks_load_with_defaults_and_chat_mapping(tmp_path):
    rows = generate_tasks(GenerateConfig(n_rows=10, noise_rate=0.5, seed=0))
    for suffix in ("jsonl", "parquet"):
        path = write_rows(rows, tmp_path / f"t.{suffix}")
        for fields in (FieldMapping(), FieldMapping.chat()):
            result = load_records(path, fields)
            empties = sum(r["noise_kind"] == "empty_response" for r in rows)
            assert len(result.rows) == 10 - empties and len(result.quarantined) == empties
            assert all(q["quarantine_reason"].startswith("empty response") for q in result.quarantined)
            by_id = {r["id"]: r for r in rows}
            for row in result.rows:
                assert row["prompt"] == by_id[row["id"]]["instruction"]
                assert row["response"] == by_id[row["id"]]["response"]
                assert row["noise_kind"] == by_id[row["id"]]["noise_kind"]


def test_chat_messages_prompt_is_user_turns_before_final_assistant(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Part 1"},
                      {"role": "user", "content": "Part 2"}, {"role": "assistant", "content": "Done"}]},
        {"messages": [{"role": "user", "content": "No answer"}]},
        {"messages": "not a list"},
    ]
    result = load_records(_write_jsonl(tmp_path / "c.jsonl", records), FieldMapping.chat())
    assert [(r["prompt"], r["response"]) for r in result.rows] == [("Part 1\n\nPart 2", "Done")]
    assert result.rows[0]["id"] == "row-000000"  # no id column: generated
    reasons = [q["quarantine_reason"] for q in result.quarantined]
    assert reasons[0].startswith("missing field") and "assistant" in reasons[0]
    assert reasons[1].startswith("non-string field")


def test_every_quarantine_reason_and_nothing_dropped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"id": 1, "instruction": "ok", "input": "", "output": "fine"}),
        json.dumps({"id": 2, "instruction": "no output here", "input": ""}),
        json.dumps({"id": 3, "instruction": "numeric", "input": "", "output": 42}),
        json.dumps({"id": 4, "instruction": "blank", "input": "", "output": "   "}),
        json.dumps({"id": 5, "instruction": "long", "input": "", "output": "x" * 500}),
        '{"id": 6, "instruction": "broken", ',
        json.dumps([1, 2, 3]),
        json.dumps({"id": 8, "instruction": None, "input": "", "output": "orphan"}),
    ]
    with open(path, "wb") as fh:
        fh.write(("\n".join(lines) + "\n").encode())
        fh.write(b'{"id": 9, "output": "\xff\xfe"}\n')
    result = load_records(path, FieldMapping.alpaca(), max_chars=200)
    assert result.rows_in == 9
    assert len(result.rows) + len(result.quarantined) == result.rows_in
    assert [r["id"] for r in result.rows] == ["1"]  # ids become strings
    reasons = {str(q["id"]): q["quarantine_reason"] for q in result.quarantined if "id" in q}
    assert reasons["2"].startswith("missing field: response (column 'output')")
    assert reasons["3"].startswith("non-string field: response") and "int" in reasons["3"]
    assert reasons["4"].startswith("empty response")
    assert reasons["5"].startswith("too long") and "max_chars 200" in reasons["5"]
    assert reasons["8"].startswith("missing field: instruction")
    malformed = [q for q in result.quarantined if "raw" in q]
    assert [q["quarantine_reason"].split(":")[0] for q in malformed] == ["malformed JSON", "malformed JSON", "undecodable"]
    assert "line 6" in malformed[0]["quarantine_reason"] and "line 7" in malformed[1]["quarantine_reason"]
    assert "line 9" in malformed[2]["quarantine_reason"]
    assert result.reasons() == {
        "missing field": 2, "non-string field": 1, "empty response": 1, "too long": 1,
        "malformed JSON": 2, "undecodable": 1,
    }
    out = write_quarantine(result.quarantined, tmp_path / "q" / "quarantine.jsonl")
    assert [json.loads(line)["quarantine_reason"] for line in out.read_text().splitlines()] == [
        q["quarantine_reason"] for q in result.quarantined
    ]


def test_missing_mapped_column_is_a_config_error_naming_the_field(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "answer": "a"}])
    with pytest.raises(ConfigError) as err:
        load_records(path, FieldMapping(response="output"))
    message = str(err.value)
    assert "fields.response: column 'output' not in the dataset" in message
    assert "instruction, answer" in message and "set fields.response to one of them" in message
    # id and input left at their defaults may be absent; set explicitly they are required.
    assert load_records(path, FieldMapping(response="answer")).rows[0]["id"] == "row-000000"
    with pytest.raises(ConfigError, match="fields.id: column 'uid'"):
        load_records(path, FieldMapping(response="answer", id="uid"))
    with pytest.raises(ConfigError) as err:
        load_records(path, FieldMapping(instruction="question", response="output"))
    assert len(err.value.problems) == 2  # every problem at once


def test_missing_file_and_bad_inputs_name_input_path(tmp_path):
    with pytest.raises(ConfigError, match="input_path: .*does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="input_path: .*unsupported suffix"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ConfigError, match="input_path: .*not valid JSON"):
        load_records(tmp_path / "d.json")


def test_field_mapping_validation():
    with pytest.raises(ConfigError, match="response"):
        parse_config(FieldMapping, {"messages": "messages", "response": "output"})
    with pytest.raises(ConfigError, match="respones"):
        parse_config(FieldMapping, {"respones": "output"})
    assert parse_config(FieldMapping, {"messages": "conv"}).mapped() == {"messages": "conv", "id": "id"}


@pytest.mark.skipif(not ALPACA.is_file(), reason="shared Alpaca data not present")
def test_shared_alpaca_json():
    result = load_records(ALPACA, FieldMapping.alpaca())
    assert result.rows_in == 5000
    assert len(result.rows) + len(result.quarantined) == 5000
    assert len(result.rows) > 4900
    with pytest.raises(ConfigError, match="fields.response: column 'response'"):
        load_records(ALPACA, FieldMapping())


def test_non_text_and_undecodable_fields_are_quarantined(tmp_path):
    lines = [
        json.dumps({"id": "ok", "instruction": "tab\tand newline\nare text", "input": "", "output": "fine"}),
        json.dumps({"id": "nul", "instruction": "q", "input": "", "output": "a\u0000b"}),
        json.dumps({"id": "ctl", "instruction": "\u0001\u0002\u0003 binary", "input": "", "output": "x"}),
        json.dumps({"id": "fffd", "instruction": "q", "input": "", "output": "caf\ufffd"}),
        '{"id": "surrogate", "instruction": "q", "input": "", "output": "bad \\ud800 half"}',
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = load_records(path, FieldMapping.alpaca())
    assert [r["id"] for r in result.rows] == ["ok"]
    reasons = {q["id"]: q["quarantine_reason"] for q in result.quarantined}
    assert reasons["nul"].startswith("non-text: response")
    assert reasons["ctl"].startswith("non-text: instruction")
    assert reasons["fffd"].startswith("undecodable: response") and "U+FFFD" in reasons["fffd"]
    assert reasons["surrogate"].startswith("undecodable") and "U+D800" in reasons["surrogate"]
    # The quarantine file stays valid UTF-8 JSONL even for a lone surrogate.
    out = write_quarantine(result.quarantined, tmp_path / "q.jsonl")
    assert len([json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]) == 4


def test_binary_parquet_columns_decode_or_are_quarantined(tmp_path):
    table = pa.table({
        "id": ["utf8", "latin1"],
        "instruction": ["q", "q"],
        "input": ["", ""],
        "output": pa.array([b"caf\xc3\xa9", b"caf\xe9"], type=pa.binary()),
    })
    pq.write_table(table, tmp_path / "b.parquet")
    result = load_records(tmp_path / "b.parquet", FieldMapping.alpaca())
    assert [(r["id"], r["response"]) for r in result.rows] == [("utf8", "café")]
    (q,) = result.quarantined
    assert q["id"] == "latin1" and q["quarantine_reason"].startswith("undecodable: response (column 'output') is bytes")
