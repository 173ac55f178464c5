"""What a typed config accepts, as text: every field with its type, default and description.

`frugalray <stage> --help` and the jobs' `--help` print this for the stage's config class, so the
help is generated from the class itself and cannot drift from what validation accepts. Nested
sections are listed as `section.field`; Literal types print their allowed values.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

# -- types -----------------------------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    """A short, YAML-minded name for a field's type: `int`, `{a|b}`, `list[str]`, `float or null`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return "{" + "|".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        inner = [type_name(a) for a in args if a is not Ellipsis]
        return f"{origin.__name__}[{', '.join(inner)}]" if inner else origin.__name__
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]" if args else "dict"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field nests (`X`, `X | None`), or None when the field is not a section."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of each item of a `list[X]` field (its keys are listed as `field[].key`)."""
    if typing.get_origin(annotation) is list:
        args = typing.get_args(annotation)
        if len(args) == 1:
            return section_model(args[0])
    return None


# -- defaults and bounds ---------------------------------------------------------------------------


def yaml_value(value: Any) -> str:
    """A default as it would be written in the YAML config (null, true, [a, b])."""
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def default_text(field: FieldInfo) -> str:
    """`required`, `default <value>`, or the field's own words for what applies when it is left out
    (`json_schema_extra={"default_text": ...}`, e.g. a pipeline section's `default: the pipeline's model`)."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("default_text"), str):
        return extra["default_text"]
    if field.is_required():
        return "required"
    try:
        value = field.get_default(call_default_factory=True, validated_data={})
    except (KeyError, TypeError, ValueError, AttributeError):  # a factory that reads the other fields
        return "default computed from the other fields"
    if isinstance(value, BaseModel):
        return ""
    return f"default {yaml_value(value)}"


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
           ("max_length", "length <="))


def bounds_text(field: FieldInfo) -> str:
    """Numeric and length bounds from the field's constraints, e.g. `>= 1, <= 512`."""
    parts = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


# -- rendering -------------------------------------------------------------------------------------


def field_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default and bounds, description) per field, sections expanded in place
    (a list of sections as `field[].key`)."""
    rows = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        nested = section_model(field.annotation)
        description = field.description or ""
        if nested is not None and not description and nested.__doc__:
            description = " ".join(nested.__doc__.strip().split("\n\n")[0].split())  # its first paragraph
        notes = ", ".join(p for p in (default_text(field), bounds_text(field)) if p)
        rows.append((dotted, type_name(field.annotation), notes, description))
        if nested is not None:
            rows.extend(field_rows(nested, prefix=f"{dotted}."))
        elif (item := list_item_model(field.annotation)) is not None:
            rows.extend(field_rows(item, prefix=f"{dotted}[]."))
    return rows


def render_config_help(model: type[BaseModel], title: str | None = None) -> str:
    """The fields `model` accepts, one entry per field, descriptions indented under it."""
    lines = [title or f"config keys ({model.__name__}; unknown keys are errors):"]
    for dotted, kind, notes, description in field_rows(model):
        head = f"  {dotted}: {kind}" + (f"  ({notes})" if notes else "")
        lines.append(head)
        if description:
            lines.append(f"      {description}")
    return "\n".join(lines) + "\n"
