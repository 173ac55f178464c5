"""Fuzzing the served model: >= 1,000 malformed or hostile requests against the real Serve app.

Each request starts from a valid, tiny one (max_tokens 1-2) and gets one to three hostile
mutations: wrong types, huge or negative numbers, NaN/Infinity, unknown fields, nonsense
messages, bad compute budgets, n>1 with a seed (the vLLM-CPU engine killer), vLLM's own
sampling extras with hostile values, bodies that are not JSON objects. Afterwards: the engine
is alive (health OK, a normal request answers), no response was a 5xx other than 503/504,
and every 2xx respected its budget in `usage`.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from frugalray.serve.effort import EFFORT_LEVELS
from frugalray.serve.usage import USAGE_EXTENSION, usage_extension

pytestmark = pytest.mark.slow

EXAMPLES = 1000
OPENAI_USAGE_FIELDS = {"prompt_tokens", "completion_tokens", "total_tokens", "completion_tokens_details",
                       "prompt_tokens_details"}
SAMPLES_CEILING = 8  # the served_model fixture's max_samples_ceiling
DEFAULT_MAX_TOKENS = 32  # ... and its default_max_tokens

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 9, 65, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 2.0000001]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12),
                    st.sampled_from(["", "1", "NaN", "greedy", "\u0000", "💥" * 5, "a" * 5000]))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=6)

BUDGET_KEYS = ["strategy", "max_samples", "max_completion_tokens", "max_flops", "confidence", "round_size",
               "answer_extractor", "answer_regex", "escalate_to", "score_with", "max_sampels", "temperature"]
budget_values = {
    "strategy": st.sampled_from(["greedy", "self_consistency", "adaptive_consistency", "best_of_n", "cascade",
                                 "auto", "beam", "", "GREEDY"]),
    "answer_extractor": st.sampled_from(["number", "regex", "exact", "choice", "json"]),
    "answer_regex": st.sampled_from(["(\\d+)", "(a+)+$", "[", "(?P<x>.*)", "x" * 300]),
    "escalate_to": st.sampled_from(["smollm2-test-adapter", "smollm2-135m-instruct", "gpt-4", ""]),
    "score_with": st.sampled_from(["logprob", "reward_model", "oracle"]),
    "max_samples": st.integers(-3, 12),
    "round_size": st.integers(-1, 10),
    "max_completion_tokens": st.integers(-5, 40),
    "max_flops": st.sampled_from([1, 1e3, 1e8, 1e9, 1e10, 1e12, 0, -1]),
    "confidence": st.sampled_from([0.0, 0.5, 0.9, 1.0, 1.5, -0.1]),
}
compute_budgets = st.dictionaries(
    st.sampled_from(BUDGET_KEYS),
    st.one_of(*[budget_values.get(k, junk) for k in BUDGET_KEYS], junk),
    max_size=5,
)
# vLLM's own request fields, with values meant to hurt
VLLM_EXTRAS = {
    "top_p": numbers, "top_k": numbers, "min_p": numbers, "presence_penalty": numbers,
    "frequency_penalty": numbers, "repetition_penalty": numbers, "min_tokens": st.integers(-2, 100),
    "logprobs": st.one_of(st.booleans(), st.integers(-2, 30)), "top_logprobs": st.integers(-2, 30),
    "prompt_logprobs": st.integers(-2, 30), "echo": st.booleans(), "best_of": st.integers(-1, 10),
    "use_beam_search": st.booleans(), "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "-1", "99999999", "x", "49151"]), numbers, max_size=2),
    "allowed_token_ids": st.lists(st.integers(-5, 10**9), max_size=3),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=4), max_size=5), junk),
    "stop_token_ids": st.lists(st.integers(-5, 10**9), max_size=3),
    "response_format": st.one_of(junk, st.just({"type": "json_object"}),
                                 st.just({"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}})),
    "truncate_prompt_tokens": st.integers(-3, 10**6),
    "stream_options": junk, "user": junk, "tools": junk, "tool_choice": junk,
    "structured_outputs": junk, "guided_json": junk, "guided_regex": st.sampled_from(["[", "a*", "(x"]),
}


@st.composite
def vllm_extras(draw):
    keys = draw(st.lists(st.sampled_from(sorted(VLLM_EXTRAS)), min_size=1, max_size=2, unique=True))
    return {key: draw(VLLM_EXTRAS[key]) for key in keys}


messages = st.one_of(
    junk,
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "god", ""]),
                                    "content": st.one_of(st.text(max_size=40), junk)}), max_size=3),
    st.just([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]),
    st.just([{"role": "user", "content": "x " * 3000}]),  # longer than max_model_len allows
)

# Weighted towards the hostile mutations: the benign ones (unknown field, a deleted optional
# field, stream, another served model, seeded n>1) mostly make valid requests that generate.
MUTATIONS = ["field_junk"] * 4 + ["budget"] * 4 + ["huge"] * 2 + ["messages"] * 2 + ["vllm"] * 2 + ["effort"] * 2 + [
    "unknown", "delete", "seeded_fanout", "stream", "model"]
# The effort knobs clients send (frugalray.serve.effort; vLLM's thinking budget), with hostile values too.
efforts = st.fixed_dictionaries({}, optional={
    "reasoning_effort": st.one_of(st.sampled_from(["none", "minimal", "low", "medium", "high", "xhigh", "max",
                                                   "ultra", "", "HIGH"]), junk),
    "thinking_token_budget": st.one_of(st.sampled_from([0, 1, 16, -1, 2**40]), junk),
})
FIELDS = ["model", "max_tokens", "max_completion_tokens", "n", "seed", "temperature", "stream", "timeout_s",
          "compute_budget", "messages", "prompt", "reasoning_effort", "thinking_token_budget"]


@st.composite
def hostile_requests(draw):
    kind = draw(st.sampled_from(["chat", "completions"]))
    # temperature 0 with a sampling compute_budget is a 400 naming `temperature` (no silent substitution):
    # draw both, so budgeted requests also get to generate.
    body: dict = {"model": "smollm2-135m-instruct", "max_tokens": draw(st.sampled_from([1, 2])),
                  "temperature": draw(st.sampled_from([0, 0.7]))}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": draw(st.sampled_from(["Hi", "What is 2 + 2?", "1, 2, 3,"]))}]
    else:
        body["prompt"] = draw(st.sampled_from(["1, 2, 3,", "Hello", "The capital of France is"]))
    if draw(st.integers(0, 29)) == 0:  # not a JSON object at all
        raw = draw(st.one_of(st.sampled_from([b"", b"{", b"null", b"[1,2]", b'"x"', b"\xff\xfe", b"{" * 10000,
                                                   b"[" * 100_000 + b"]" * 100_000,  # was a RecursionError: 500
                                                   b'{"model": "m", "prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"]),
                             junk.map(lambda v: json.dumps(v).encode())))
        return kind, raw
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if mutation == "field_junk":
            body[draw(st.sampled_from(FIELDS))] = draw(junk)
        elif mutation == "budget":
            body["compute_budget"] = draw(st.one_of(compute_budgets, junk))
        elif mutation == "vllm":
            body.update(draw(vllm_extras()))
        elif mutation == "effort":
            body.update(draw(efforts))
        elif mutation == "unknown":
            body[draw(st.text(min_size=1, max_size=10))] = draw(junk)
        elif mutation == "delete":
            body.pop(draw(st.sampled_from(["model", "messages", "prompt", "temperature"])), None)
        elif mutation == "messages":
            body["messages"] = draw(messages)
        elif mutation == "huge":
            body[draw(st.sampled_from(["max_tokens", "n", "max_completion_tokens", "timeout_s"]))] = draw(
                st.sampled_from([65, 10**6, 2**63, 10**100, -(10**9), 1e308]))
        elif mutation == "seeded_fanout":
            body.update(n=draw(st.integers(2, 4)), seed=draw(st.integers(-(2**63), 2**63)), temperature=0.8)
        elif mutation == "stream":
            body["stream"] = True
        elif mutation == "model":
            body["model"] = draw(st.sampled_from(["smollm2-test-adapter", "gpt-4", "", "../../etc/passwd"]))
    return kind, body


def _per_sample_cap(body: dict) -> int:
    # chat takes max_completion_tokens over max_tokens; completions only max_tokens (but the
    # adaptive strategies read either): the larger one is a safe cap for both.
    caps = [v for v in (body.get("max_completion_tokens"), body.get("max_tokens"))
            if isinstance(v, int) and not isinstance(v, bool)]
    return max(caps) if caps else DEFAULT_MAX_TOKENS


def _check_budget(body: dict, data: dict) -> None:
    """A 2xx answer never spent more than the request allowed."""
    usage = data.get("usage") or {}
    spent = usage_extension(usage)
    assert set(usage) <= OPENAI_USAGE_FIELDS | {USAGE_EXTENSION}, (body, usage)
    per_sample = _per_sample_cap(body)
    budget = body.get("compute_budget")
    if not isinstance(budget, dict) and body.get("reasoning_effort") in EFFORT_LEVELS:
        budget = {}  # the level's preset: within the server's ceilings like any budget
    if isinstance(budget, dict):
        max_samples = budget.get("max_samples") or SAMPLES_CEILING
        assert spent["samples"] <= max_samples, (body, usage)
        assert usage["completion_tokens"] <= spent["samples"] * per_sample, (body, usage)
        if budget.get("max_completion_tokens") is not None:
            assert usage["completion_tokens"] <= budget["max_completion_tokens"], (body, usage)
        if budget.get("max_flops") is not None:
            assert spent["flops"] <= budget["max_flops"], (body, usage)
        assert len(data["choices"]) == 1
    else:
        n = body.get("n", 1)
        assert len(data["choices"]) <= n
        if "completion_tokens" in usage:
            assert usage["completion_tokens"] <= n * per_sample, (body, usage)


def test_a_thousand_hostile_requests_kill_nothing(served_model):
    base = served_model["base_url"]
    headers = {"Authorization": f"Bearer {served_model['api_key']}"}
    statuses: Counter = Counter()
    bad: list = []
    with httpx.Client(headers=headers, timeout=120) as http:

        def healthy() -> bool:
            resp = http.get(base.removesuffix("/v1") + "/health")
            return resp.status_code == 200 and resp.json().get("status") == "ok"

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(hostile_requests())
        def fuzz(request):
            kind, body = request
            url = f"{base}/{'chat/completions' if kind == 'chat' else 'completions'}"
            if isinstance(body, bytes):
                resp = http.post(url, content=body, headers={"content-type": "application/json"})
            else:
                resp = http.post(url, content=json.dumps(body, allow_nan=True).encode(),
                                 headers={"content-type": "application/json"})
            statuses[resp.status_code] += 1
            sent = sum(statuses.values())
            if resp.status_code >= 500 and resp.status_code not in (503, 504):
                bad.append((body if not isinstance(body, bytes) else body[:200], resp.status_code, resp.text[:500]))
            elif resp.status_code < 300 and isinstance(body, dict) and not body.get("stream"):
                _check_budget(body, resp.json())
            elif 400 <= resp.status_code < 500:
                assert "error" in resp.json(), resp.text[:500]
            if sent % 100 == 0:
                assert healthy(), f"engine unhealthy after {sent} requests; last: {body!r:.500}"
            assert not bad, bad[:3]

        fuzz()
        print(f"\nstatuses over {sum(statuses.values())} requests: {dict(sorted(statuses.items()))}")
        assert sum(statuses.values()) >= EXAMPLES
        assert healthy()
        resp = http.post(f"{base}/chat/completions", json={
            "model": served_model["model"], "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "What is 3 + 4?"}]})
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
    assert statuses[200] > 50  # the valid ones were answered, not all turned away
