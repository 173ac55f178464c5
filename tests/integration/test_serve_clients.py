"""Real clients nobody here wrote: plain `curl`, and more of the official `openai` client."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from frugalray.serve.usage import usage_extension

QUESTION = "What is 3 + 4? Reply with only the number."

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")]


def _curl(url: str, body: dict | None = None, key: str | None = None, stream: bool = False) -> tuple[int, str]:
    """Run curl; return (HTTP status, response body)."""
    cmd = ["curl", "-sS", "--max-time", "180", "-w", "\n%{http_code}", url]
    if stream:
        cmd.insert(1, "-N")  # no buffering: server-sent events as they come
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    proc = subprocess.run(cmd, input=json.dumps(body) if body is not None else None, capture_output=True,
                          text=True, timeout=200, check=True)
    text, _, status = proc.stdout.rpartition("\n")
    return int(status), text


def _sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def client(served_model):
    import openai

    return openai.OpenAI(base_url=served_model["base_url"], api_key=served_model["api_key"], timeout=180,
                         max_retries=0)


def test_curl_chat_with_a_compute_budget(served_model):
    body = {"model": served_model["model"], "max_tokens": 8,
            "messages": [{"role": "user", "content": QUESTION}],
            "compute_budget": {"strategy": "self_consistency", "max_samples": 3, "answer_extractor": "number"}}
    status, text = _curl(served_model["base_url"] + "/chat/completions", body, served_model["api_key"])
    assert status == 200, text
    data = json.loads(text)
    assert data["object"] == "chat.completion" and len(data["choices"]) == 1
    usage = data["usage"]
    figures = usage_extension(usage)
    assert figures["samples"] == 3 and figures["strategy"] == "self_consistency"
    assert usage["completion_tokens"] <= 3 * 8 and figures["flops"] > 0
    # and without the key, curl sees the 401 with an OpenAI error body
    status, text = _curl(served_model["base_url"] + "/chat/completions", body)
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    status, text = _curl(served_model["base_url"] + "/models", key=served_model["api_key"])
    assert status == 200 and served_model["adapter"] in [m["id"] for m in json.loads(text)["data"]]


def test_curl_streams_a_greedy_budget(served_model):
    url = served_model["base_url"] + "/chat/completions"
    messages = [{"role": "user", "content": QUESTION}]
    body = {"model": served_model["model"], "max_tokens": 8, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}, "compute_budget": {"strategy": "greedy"}}
    status, text = _curl(url, body, served_model["api_key"], stream=True)
    assert status == 200, text
    events = _sse_events(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert streamed.strip()
    assert any(c.get("usage") for c in chunks)  # include_usage passes through
    # greedy: the same text as the unstreamed greedy budget
    status, text = _curl(url, {**body, "stream": False, "stream_options": None}, served_model["api_key"])
    assert status == 200, text
    assert json.loads(text)["choices"][0]["message"]["content"] == streamed
    # sampling strategies cannot stream (the vote needs every sample): a 400 naming the param
    status, text = _curl(url, {**body, "compute_budget": {"strategy": "self_consistency", "max_samples": 2}},
                         served_model["api_key"], stream=True)
    assert status == 400 and json.loads(text)["error"]["param"] == "stream"


def test_openai_client_streams_completions_and_greedy_budgets(client, served_model):
    stream = client.completions.create(model=served_model["model"], prompt="1, 2, 3, 4,", max_tokens=4,
                                       temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text.strip()
    chunks = list(client.chat.completions.create(
        model=served_model["adapter"], messages=[{"role": "user", "content": QUESTION}], max_tokens=6,
        stream=True, extra_body={"compute_budget": {"strategy": "greedy"}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_openai_client_n_samples_and_extra_body(client, served_model):
    resp = client.chat.completions.create(model=served_model["model"], n=3, temperature=0.9, max_tokens=4,
                                          messages=[{"role": "user", "content": QUESTION}])
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert usage_extension(resp.usage)["samples"] == 3
    resp = client.completions.create(model=served_model["model"], prompt="1, 2, 3, 4,", max_tokens=3,
                                     extra_body={"compute_budget": {"strategy": "self_consistency",
                                                                    "max_samples": 2}})
    assert len(resp.choices) == 1 and usage_extension(resp.usage)["samples"] == 2


def test_litellm_parses_usage_and_reaches_the_extension(served_model):
    """litellm (its own OpenAI-compatible provider and typed `Usage`) takes our responses unchanged."""
    import litellm

    common = {"model": f"openai/{served_model['model']}", "api_base": served_model["base_url"],
              "api_key": served_model["api_key"], "messages": [{"role": "user", "content": QUESTION}],
              "max_tokens": 8, "timeout": 180}
    plain = litellm.completion(**common, temperature=0)
    assert plain.choices[0].message.content.strip()
    assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    budgeted = litellm.completion(**common, seed=3, extra_body={"compute_budget": {"max_samples": 3}})
    usage = budgeted.usage
    assert usage.completion_tokens >= 3  # summed over the three samples, as OpenAI sums n choices
    assert usage.prompt_tokens_details is None or usage.prompt_tokens_details.cached_tokens >= 0
    # the extension survives litellm's typed Usage as an extra field
    figures = usage_extension(usage.model_dump())
    assert figures["samples"] == 3 and figures["strategy"] == "self_consistency", usage
