"""Reading a request body into the protocol models: OpenAI-style client errors that name the `param`.

Plain Python (no Ray, no vLLM): a malformed body is refused here as a 400 instead of failing deep
inside the engine as a 500.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from frugalray.serve.protocol import ComputeBudget, request_model


class RequestError(Exception):
    """An OpenAI-style client error: HTTP status, message, and the offending `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 err_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.err_type = err_type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


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
                  request_timeout_s: float = 86400.0) -> BaseModel:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", param=None)
    check_chat_messages(body.get("messages"))
    try:
        return request_model(max_samples_ceiling, max_tokens_ceiling, request_timeout_s).model_validate(body)
    except ValidationError as err:
        raise validation_to_request_error(err) from None
