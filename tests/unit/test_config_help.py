"""frugalray.config_help: the text a stage's --help prints about its config, from the config class."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from frugalray.config import StrictModel
from frugalray.config_help import field_rows, render_config_help, type_name


class Inner(StrictModel):
    """Settings of the inner part.

    More text that is not shown."""

    rank: int = Field(8, ge=1, le=64, description="the rank")
    mode: Literal["a", "b"] = "a"


class Item(StrictModel):
    name: str


class Outer(StrictModel):
    path: str = Field(description="where the data is")
    names: list[Literal["x", "y", "z"]] = Field(default_factory=lambda: ["x"], min_length=1)
    ratio: float | None = Field(None, gt=0.0)
    inner: Inner = Field(default_factory=Inner)
    maybe: Inner | None = None
    items: list[Item] = Field(default_factory=list)
    target: Literal["all"] | list[str] = "all"
    extra: dict[str, float] = Field(default_factory=dict)


def test_type_names():
    assert type_name(int) == "int"
    assert type_name(float | None) == "float or null"
    assert type_name(Literal["a", "b"]) == "{a|b}"
    assert type_name(list[Literal["x", "y"]]) == "list[{x|y}]"
    assert type_name(Literal["all"] | list[str]) == "{all} or list[str]"
    assert type_name(dict[str, float]) == "dict[str, float]"
    assert type_name(Inner) == "section"


def test_rows_expand_sections_and_lists_of_sections():
    rows = {name: (kind, notes, description) for name, kind, notes, description in field_rows(Outer)}
    assert list(rows) == ["path", "names", "ratio", "inner", "inner.rank", "inner.mode", "maybe", "maybe.rank",
                          "maybe.mode", "items", "items[].name", "target", "extra"]
    assert rows["path"] == ("str", "required", "where the data is")
    assert rows["names"] == ("list[{x|y|z}]", "default [x], length >= 1", "")
    assert rows["ratio"] == ("float or null", "default null, > 0.0", "")
    assert rows["inner"] == ("section", "", "Settings of the inner part.")  # the class's first paragraph
    assert rows["inner.rank"] == ("int", "default 8, >= 1, <= 64", "the rank")
    assert rows["maybe"][:2] == ("section or null", "default null")
    assert rows["items[].name"] == ("str", "required", "")
    assert rows["target"] == ("{all} or list[str]", "default all", "")
    assert rows["extra"] == ("dict[str, float]", "default {}", "")


def test_render_puts_descriptions_under_their_field():
    text = render_config_help(Inner, "keys:")
    assert text == ("keys:\n"
                    "  rank: int  (default 8, >= 1, <= 64)\n"
                    "      the rank\n"
                    "  mode: {a|b}  (default a)\n")


def test_render_follows_the_class_so_it_cannot_drift():
    class Grown(Inner):
        added: bool = Field(True, description="a new key")

    text = render_config_help(Grown)
    assert text.startswith("config keys (Grown; unknown keys are errors):\n")
    assert "  added: bool  (default true)\n      a new key\n" in text


def test_a_field_may_say_what_applies_when_it_is_left_out():
    class Section(StrictModel):
        model: str = Field("m", json_schema_extra={"default_text": "default: the pipeline's model"})

    assert render_config_help(Section, "keys:") == "keys:\n  model: str  (default: the pipeline's model)\n"
