"""Typed configs shared by every entry point.

Every config crossing a process or file boundary is a `StrictModel` (unknown keys are
errors, never silently a default). Loading collects *every* problem and raises one
`ConfigError` whose lines each name the field and the fix.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ConfigError(ValueError):
    """One or more config problems, each naming the field and how to fix it."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config{where} ({len(self.problems)} problem(s)):\n{lines}")


def _field_names(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at the parent of `loc`, for did-you-mean suggestions."""
    cls: Any = model_cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}).keys())


def describe_validation_error(err: ValidationError, model_cls: type[BaseModel]) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        name = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            known = _field_names(model_cls, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(known)}"
            problems.append(f"{name}: unknown key; remove it ({hint})")
        elif e["type"] == "missing":
            problems.append(f"{name}: required; add it to the config")
        else:
            problems.append(f"{name}: {e['msg']} (got {e.get('input')!r})")
    return problems


def parse_config(model_cls: type[T], data: dict[str, Any], source: str | None = None) -> T:
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, model_cls), source) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config: file '{p}' does not exist; pass an existing YAML file"], str(p))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"config: not valid YAML ({err}); fix the syntax"], str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError(["config: top level must be a mapping of keys to values"], str(p))
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`a.b=3` style overrides from the command line; values parsed as YAML scalars."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError([f"override '{item}': expected KEY=VALUE, e.g. finetune.max_steps=4"])
        key, value = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override '{item}': '{part}' is not a section"])
        node[parts[-1]] = yaml.safe_load(value)
    return data


def load_config(model_cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    data = apply_overrides(read_yaml(path), overrides)
    return parse_config(model_cls, data, str(path))
