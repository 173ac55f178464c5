"""Any instruction dataset in; normalized rows plus a quarantine out.

`load_records(path, fields)` reads `.jsonl`, `.json` (a list of objects), `.parquet` (a file
or a directory of files) or a Hugging Face `datasets` directory saved with `save_to_disk`,
and maps each record through a `FieldMapping` to `{"id", "prompt", "response", ...}` with
every original column passed through. A row that cannot be used is never dropped silently:
it goes to `LoadResult.quarantined` with a `quarantine_reason`.

Preflight (before any Ray work): a missing file or a mapped column that the dataset does
not have at all is a `ConfigError` naming the config field and the columns that exist.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import model_validator

from frugalray.config import ConfigError, StrictModel
from frugalray.examples.formatting import join_prompt

log = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 20_000
# Mapped fields a dataset may simply lack while left at their defaults (ids are generated,
# input is empty). Set explicitly, they are required like the others.
_OPTIONAL_BY_DEFAULT = ("id", "input")


class FieldMapping(StrictModel):
    """Which dataset column holds each part of an example (None: the dataset has no such part).

    With `messages` set, the prompt is the user turn(s) right before the final assistant turn
    and the response is that assistant turn; `instruction`/`input`/`response` are then unused.

    `answer` names the column holding each row's reference answer (verifiable tasks: the
    `verifier` scorer checks the response against it). Unset (None) by default; once set, the
    dataset must have that column (a row whose cell is null just has no reference).
    """

    instruction: str | None = "instruction"
    input: str | None = "input"
    response: str | None = "response"
    messages: str | None = None
    id: str | None = "id"
    answer: str | None = None

    @model_validator(mode="after")
    def _messages_excludes_columns(self) -> FieldMapping:
        if self.messages is not None:
            clash = [
                f for f in ("instruction", "input", "response")
                if f in self.model_fields_set and getattr(self, f) is not None
            ]
            if clash:
                raise ValueError(
                    f"{', '.join(clash)}: not used when 'messages' is set (the chat turns give prompt and "
                    "response); remove them or set them to null"
                )
        elif self.response is None:
            raise ValueError("response: required unless 'messages' is set; name the column holding the answer")
        return self

    @classmethod
    def alpaca(cls) -> FieldMapping:
        """Stanford Alpaca: instruction / input / output."""
        return cls(instruction="instruction", input="input", response="output")

    @classmethod
    def chat(cls, column: str = "messages") -> FieldMapping:
        """A column of chat messages ([{"role", "content"}, ...])."""
        return cls(messages=column)

    @classmethod
    def prompt_response(cls) -> FieldMapping:
        """Rows frugalray wrote itself (scored or selected data): prompt / response."""
        return cls(instruction="prompt", input=None, response="response")

    def mapped(self) -> dict[str, str]:
        """Config field name -> dataset column, for the fields in use."""
        names = ("messages", "id") if self.messages is not None else ("instruction", "input", "response", "id")
        names += ("answer",)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class LoadResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    rows_in: int = 0
    columns: list[str] = field(default_factory=list)

    def reasons(self) -> dict[str, int]:
        """Quarantine counts by reason kind (the text before the first colon)."""
        counts: dict[str, int] = {}
        for q in self.quarantined:
            kind = q["quarantine_reason"].split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts


class _Malformed:
    """A source record that could not even be parsed (a bad JSONL line, a non-object entry)."""

    def __init__(self, raw: str, reason: str):
        self.raw = raw
        self.reason = reason


def _read_jsonl(path: Path) -> Iterator[dict | _Malformed]:
    with open(path, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield _Malformed(raw.decode("utf-8", errors="replace")[:500], f"undecodable: line {line_no}: {err}")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                yield _Malformed(text[:500], f"malformed JSON: line {line_no}: {err}")
                continue
            if not isinstance(record, dict):
                yield _Malformed(text[:500], f"malformed JSON: line {line_no}: not an object")
                continue
            yield record


def _read_json(path: Path, path_field: str) -> list[dict | _Malformed]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path_field}: '{path}' is not valid JSON ({err}); fix the file or use .jsonl"]) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ConfigError([f"{path_field}: '{path}' must hold a JSON list of objects (one per example)"])
    return [
        r if isinstance(r, dict) else _Malformed(json.dumps(r)[:500], f"malformed JSON: entry {i}: not an object")
        for i, r in enumerate(data)
    ]


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (
        path / "dataset_dict.json"
    ).is_file()


def _read_hf_dataset(path: Path, path_field: str, split: str | None) -> list[dict]:
    from datasets import Dataset, DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        splits = list(loaded.keys())
        chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
        if chosen not in splits:
            raise ConfigError([f"{path_field}: '{path}' holds splits {splits}; choose one (split=...)"])
        loaded = loaded[chosen]
    assert isinstance(loaded, Dataset)
    return loaded.to_list()


def _read_parquet(path: Path, path_field: str) -> list[dict]:
    import pyarrow.parquet as pq

    if path.is_dir() and not any(path.rglob("*.parquet")):
        raise ConfigError([f"{path_field}: directory '{path}' holds no .parquet files and is not a saved HF dataset"])
    return pq.read_table(path).to_pylist()


def read_rows(path: str | Path, path_field: str = "input_path", split: str | None = None) -> list[dict | _Malformed]:
    """Raw records of a file or directory, in order; unparseable ones as `_Malformed` placeholders."""
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path_field}: '{path}' does not exist; point it at a .jsonl/.json/.parquet file or a dataset directory"])
    if path.is_dir():
        if _is_hf_dataset_dir(path):
            return _read_hf_dataset(path, path_field, split)
        return _read_parquet(path, path_field)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_read_jsonl(path))
    if suffix == ".json":
        return _read_json(path, path_field)
    if suffix == ".parquet":
        return _read_parquet(path, path_field)
    raise ConfigError([f"{path_field}: '{path}' has unsupported suffix '{suffix}'; use .jsonl, .json, .parquet or a dataset directory"])


def _columns(records: list[dict | _Malformed]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        if isinstance(r, dict):
            for key in r:
                seen.setdefault(key, None)
    return list(seen)


def preflight(fields: FieldMapping, columns: list[str], fields_prefix: str = "fields") -> None:
    """Raise ConfigError for every mapped column the dataset does not have at all."""
    problems = []
    for name, column in fields.mapped().items():
        if column in columns:
            continue
        if name in _OPTIONAL_BY_DEFAULT and name not in fields.model_fields_set:
            continue  # left at its default: generate ids / use an empty input
        problems.append(
            f"{fields_prefix}.{name}: column '{column}' not in the dataset (columns: {', '.join(columns) or 'none'}); "
            f"set {fields_prefix}.{name} to one of them"
        )
    if problems:
        raise ConfigError(problems)


class _Reject(Exception):
    pass


# Control characters other than tab / newline / carriage return: a text field made of them
# (or holding a NUL) is binary data that slipped into a string column.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_UNDECODABLE = re.compile("[\ufffd\ud800-\udfff]")
NON_TEXT_CONTROL_FRACTION = 0.05


def check_text(value: str, what: str) -> str:
    """`value`, or `_Reject` when it is not text a tokenizer should see.

    - `undecodable`: holds U+FFFD, the mark a decoder leaves where bytes were not valid text,
      or a lone surrogate (a JSON `\\ud800` escape), which no encoder can write back;
    - `non-text`: holds a NUL, or more than 5% control characters (binary data in a string).
    """
    bad = _UNDECODABLE.search(value)
    if bad:
        raise _Reject(f"undecodable: {what} holds U+{ord(bad.group(0)):04X} at character {bad.start()} "
                      "(bytes that were not valid text)")
    controls = len(_CONTROL.findall(value))
    if controls and ("\x00" in value or controls > NON_TEXT_CONTROL_FRACTION * len(value)):
        raise _Reject(f"non-text: {what} has {controls} control characters in {len(value)} (binary data?)")
    return value


def _text(record: dict, name: str, column: str | None, required: bool) -> str:
    if column is None:
        return ""
    value = record.get(column)
    if value is None:
        if required:
            raise _Reject(f"missing field: {name} (column '{column}') is absent or null")
        return ""
    what = f"{name} (column '{column}')"
    if isinstance(value, (bytes, bytearray)):  # a binary Parquet/HF column: text only if it decodes
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise _Reject(f"undecodable: {what} is bytes that are not UTF-8 ({err})") from None
    if not isinstance(value, str):
        raise _Reject(f"non-string field: {what} is {type(value).__name__}, not a string")
    return check_text(value, what)


def _from_messages(record: dict, column: str) -> tuple[str, str]:
    turns = record.get(column)
    if turns is None:
        raise _Reject(f"missing field: messages (column '{column}') is absent or null")
    if not isinstance(turns, (list, tuple)) or not all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and "content" in t for t in turns
    ):
        raise _Reject(f"non-string field: messages (column '{column}') must be a list of {{role, content}} objects")
    if not turns or turns[-1]["role"] != "assistant":
        raise _Reject(f"missing field: messages (column '{column}') does not end with an assistant turn")
    if not all(isinstance(t["content"], str) for t in turns):
        raise _Reject(f"non-string field: messages (column '{column}') has a non-string content")
    user_turns = []
    for turn in reversed(turns[:-1]):
        if turn["role"] != "user":
            break
        user_turns.append(check_text(turn["content"], f"messages (column '{column}')").strip())
    return "\n\n".join(reversed(user_turns)), check_text(turns[-1]["content"], f"messages (column '{column}')")


def normalize_record(record: dict, index: int, fields: FieldMapping, max_chars: int) -> dict:
    """One normalized row, or `_Reject` with the reason."""
    if fields.messages is not None:
        prompt, response = _from_messages(record, fields.messages)
    else:
        instruction = _text(record, "instruction", fields.instruction, required=True)
        input_text = _text(record, "input", fields.input, required=False)
        prompt = join_prompt(instruction, input_text)
        response = _text(record, "response", fields.response, required=True)
    if not response.strip():
        raise _Reject("empty response: the response is empty or whitespace")
    size = len(prompt) + len(response)
    if size > max_chars:
        raise _Reject(f"too long: {size} characters > max_chars {max_chars}")
    raw_id = record.get(fields.id) if fields.id is not None else None
    row = dict(record)
    row["id"] = str(raw_id) if raw_id is not None else f"row-{index:06d}"
    row["prompt"] = prompt
    row["response"] = response
    row["source_index"] = index
    return row


def load_records(
    path: str | Path,
    fields: FieldMapping | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    path_field: str = "input_path",
    fields_prefix: str = "fields",
    split: str | None = None,
) -> LoadResult:
    """Read, preflight and normalize a dataset; see the module docstring."""
    fields = fields or FieldMapping()
    records = read_rows(path, path_field, split)
    columns = _columns(records)
    preflight(fields, columns, fields_prefix)
    result = LoadResult(rows_in=len(records), columns=columns)
    for index, record in enumerate(records):
        if isinstance(record, _Malformed):
            result.quarantined.append({"raw": record.raw, "source_index": index, "quarantine_reason": record.reason})
            continue
        try:
            result.rows.append(normalize_record(record, index, fields, max_chars))
        except _Reject as reason:
            result.quarantined.append({**record, "source_index": index, "quarantine_reason": str(reason)})
    if result.quarantined:
        log.info("quarantined %d of %d rows: %s", len(result.quarantined), result.rows_in, result.reasons())
    return result


def write_quarantine(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Quarantined rows as JSONL (their columns differ row to row, so not Parquet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # backslashreplace: an undecodable row's lone surrogates are written as JSON escapes, not lost.
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    return path
