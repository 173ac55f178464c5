"""Request bodies a JSON parser cannot take, or that are too large: 400 / 413, never a 500 (pure)."""

import json

import pytest
from frugalray.serve.validation import MAX_JSON_DEPTH, RequestError, json_depth_problem, parse_json_body

LIMIT = 1 << 20


def _refusal(raw: bytes, limit: int = LIMIT) -> RequestError:
    with pytest.raises(RequestError) as err:
        parse_json_body(raw, limit)
    return err.value


def test_deep_nesting_is_a_400_not_a_recursion_error():
    # What a new user tried: json.loads raises RecursionError on this, which the ingress answered with 500.
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(deep)
    err = _refusal(deep)
    assert err.status == 400 and "deeper than" in err.message
    # Unbalanced, and inside an object: still a 400.
    assert _refusal(b'{"model": "m", "messages": ' + b"[" * 5000).status == 400


def test_depth_is_counted_outside_strings_only():
    bracket_prompt = {"prompt": "[" * 10_000 + "{" * 10_000 + '\\"', "max_tokens": 1}
    assert parse_json_body(json.dumps(bracket_prompt).encode(), LIMIT) == bracket_prompt
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth_problem(at_limit) is None
    assert json_depth_problem("[" + at_limit + "]") == MAX_JSON_DEPTH + 1


def test_over_large_body_is_a_413_naming_the_limit():
    raw = json.dumps({"prompt": "x" * (LIMIT + 1)}).encode()
    err = _refusal(raw)
    assert err.status == 413 and "max_request_body_bytes" in err.message and str(LIMIT) in err.message
    assert err.body()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe{}", b'{"a": NaN'])
def test_unparseable_bodies_are_400(raw):
    assert _refusal(raw).status == 400


def test_ordinary_bodies_parse():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert parse_json_body(json.dumps(body).encode(), LIMIT) == body
