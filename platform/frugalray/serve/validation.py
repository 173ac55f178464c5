"""Reading a request body into the protocol models: OpenAI-style client errors that name the `param`.

Plain Python (no Ray, no vLLM): a malformed body is refused here as a 400 instead of failing deep
inside the engine as a 500.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from frugalray.serve.effort import budget_for_effort
from frugalray.serve.protocol import ComputeBudget, request_model


class RequestError(Exception):
    """An OpenAI-style client error: HTTP status, message, and the offending `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 err_type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.err_type = err_type
        self.code = code
        self.headers = headers  # e.g. Retry-After with a 429

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


# OpenAI bodies nest a few levels (messages[].content[].image_url.url); tool JSON schemas a few dozen.
# Deeper bodies only cost the parsers recursion: 100,000 nested brackets was a RecursionError (HTTP 500).
MAX_JSON_DEPTH = 128


def body_too_large(size: int, limit: int) -> RequestError:
    return RequestError(f"request body is {size} bytes, over this server's limit of {limit} "
                        "(the operator's max_request_body_bytes); send a shorter prompt",
                        status=413, code="request_too_large")


def json_depth_problem(text: str, limit: int = MAX_JSON_DEPTH) -> int | None:
    """The nesting depth of a JSON text's brackets where it exceeds `limit`, else None.

    A linear scan that skips strings, so it cannot itself recurse; run before json.loads. Bodies with
    fewer brackets than `limit` (almost all) are passed at C speed without the scan.
    """
    if text.count("[") + text.count("{") <= limit:
        return None
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return depth
        elif ch in "]}":
            depth -= 1
    return None


def parse_json_body(raw: bytes, limit_bytes: int) -> Any:
    """A request body as JSON, or a RequestError: 413 over `limit_bytes`, 400 for what JSON cannot take."""
    if len(raw) > limit_bytes:
        raise body_too_large(len(raw), limit_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("request body is not UTF-8 text") from None
    if json_depth_problem(text) is not None:
        raise RequestError(f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH} levels; "
                           "send a flatter body") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError("request body is not valid JSON") from None


def validation_to_request_error(err: ValidationError) -> RequestError:
    """The first validation problem as a 400 naming its param (e.g. compute_budget.max_samples)."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        valid = f"; valid keys: {', '.join(ComputeBudget.model_fields)}" if first["loc"][0] == "compute_budget" else ""
        msg = f"{param}: unknown key{valid}"
    elif first["type"] == "less_than_equal":
        msg = f"{param}: {first['msg']} (the server's ceiling); ask for less"
    else:
        msg = f"{param}: {first['msg']} (got {first.get('input')!r})"
    return RequestError(msg, param=param)


def check_chat_messages(messages: Any) -> None:
    """Shapes vLLM's chat parser only rejects deep inside the engine (as a 500): refuse them as a 400 here.

    Each message is an object with a string `role` and a `content` that is a string, null, or a
    list of content parts (objects with a string `type`).
    """
    if not isinstance(messages, list):
        return  # the request types report a non-list `messages`
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: must be an object with role and content", param=where)
        if not isinstance(message.get("role"), str):
            raise RequestError(f"{where}.role: must be a string such as 'user'", param=f"{where}.role")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestError(f"{where}.content: must be a string, null, or a list of content parts",
                               param=f"{where}.content")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise RequestError(f"{where}.content[{j}]: a content part is an object with a string 'type'",
                                   param=f"{where}.content[{j}]")


def parse_request(body: Any, max_samples_ceiling: int, max_tokens_ceiling: int,
                  request_timeout_s: float = 86400.0, effort_presets: dict[str, dict] | None = None) -> BaseModel:
    """The request, validated against the operator's limits; a `reasoning_effort` becomes its compute budget
    (the level's preset from `effort_presets`, the request's own compute_budget fields winning)."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", param=None)
    check_chat_messages(body.get("messages"))
    model = request_model(max_samples_ceiling, max_tokens_ceiling, request_timeout_s)
    try:
        req = model.model_validate(body)
    except ValidationError as err:
        raise validation_to_request_error(err) from None
    if req.reasoning_effort is not None:
        presets = effort_presets or {}
        if req.reasoning_effort not in presets:
            raise RequestError(f"reasoning_effort: '{req.reasoning_effort}' is not a level this server offers; "
                               f"use one of {', '.join(presets) or '(none configured)'}", param="reasoning_effort")
        explicit = req.compute_budget.model_dump(exclude_unset=True) if req.compute_budget is not None else None
        try:
            req.compute_budget = model.budget_model.model_validate(
                budget_for_effort(req.reasoning_effort, explicit, presets))
        except ValidationError as err:
            first = validation_to_request_error(err)
            raise RequestError(f"compute_budget.{first.message} (reasoning_effort "
                               f"'{req.reasoning_effort}' preset with the request's compute_budget)",
                               param=f"compute_budget.{first.param}") from None
    return req
