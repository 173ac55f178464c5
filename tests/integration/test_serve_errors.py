"""Error codes of the served model: 401 without the key, 503 + Retry-After on a full queue,
504 (never a hang) past a deadline. All against the session's real Serve app (`served_model`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."
QUESTION = "What is 3 + 4? Reply with only the number."

pytestmark = pytest.mark.slow


def _root(served_model) -> str:
    return served_model["base_url"].removesuffix("/v1")


def _auth(served_model) -> dict[str, str]:
    return {"Authorization": f"Bearer {served_model['api_key']}"}


def _chat_body(served_model, content=QUESTION, **kw):
    return {"model": served_model["model"], "messages": [{"role": "user", "content": content}], **kw}


def _healthy_and_answering(served_model) -> None:
    health = httpx.get(_root(served_model) + "/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    resp = httpx.post(served_model["base_url"] + "/chat/completions", headers=_auth(served_model), timeout=120,
                      json=_chat_body(served_model, max_tokens=4, temperature=0))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"]


def test_api_key_is_required_when_configured(served_model):
    import openai

    base = served_model["base_url"]
    body = _chat_body(served_model, max_tokens=2, temperature=0)
    # no header, a wrong key, a non-bearer scheme with the right key: 401 with an OpenAI error body
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {served_model['api_key']}"}):
        resp = httpx.post(base + "/chat/completions", json=body, headers=headers, timeout=60)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["type"] == "authentication_error"
    assert httpx.get(base + "/models", timeout=60).status_code == 401
    assert httpx.post(base + "/completions", json={"prompt": "1, 2,", "max_tokens": 1}, timeout=60).status_code == 401
    # the official client maps it to AuthenticationError
    wrong = openai.OpenAI(base_url=base, api_key="not-the-key", timeout=60, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(**body)
    # the right key works; health stays open for load balancers
    assert httpx.get(base + "/models", headers=_auth(served_model), timeout=60).status_code == 200
    assert httpx.get(_root(served_model) + "/health", timeout=60).status_code == 200
    # the key is not what the replica holds, nor part of the config's repr
    assert served_model["api_key"] not in repr(served_model["config"])


def test_full_queue_answers_503_with_retry_after(served_model):
    # Seeded requests run one at a time in the ingress (the engine guard), so each holds an
    # ingress slot while the ones before it generate: ingress_max_ongoing_requests are taken,
    # max_queued_requests wait in the proxy, and the rest must be turned away at once by Serve's proxy.
    # Each request must outlast the spread of the arrivals: with the fp32 engine a 4-token request
    # took 0.5 s, about as long as 16 threads took to send theirs, and nothing was ever queued.
    # Four seeded samples of 16 tokens (run one after another) hold a slot for seconds.
    cfg = served_model["config"]
    total = cfg.ingress_max_ongoing_requests + cfg.max_queued_requests + 6
    url = served_model["base_url"] + "/chat/completions"
    client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=total))  # one client: no per-thread set-up

    def send(i: int):
        body = _chat_body(served_model, LONG_PROMPT, max_tokens=16, temperature=0.9, seed=i, n=4)
        start = time.time()
        resp = client.post(url, json=body, headers=_auth(served_model))
        return resp.status_code, resp.headers.get("retry-after"), time.time() - start, resp.text

    with client, ThreadPoolExecutor(max_workers=total) as pool:
        results = list(pool.map(send, range(total)))
    statuses = [r[0] for r in results]
    print(f"\nstatuses: {statuses}")
    assert set(statuses) <= {200, 503}, results
    rejected = [r for r in results if r[0] == 503]
    assert rejected, f"no request was turned away: {statuses}"
    assert statuses.count(200) >= cfg.ingress_max_ongoing_requests
    for _, retry_after, elapsed, _text in rejected:
        assert retry_after == str(int(cfg.retry_after_s))
        assert elapsed < 30  # rejected up front, not after waiting
    _healthy_and_answering(served_model)


def test_deadline_gives_504_not_a_hang(served_model):
    url = served_model["base_url"] + "/chat/completions"
    # eight seeded samples run one after another: far more than half a second of work
    body = _chat_body(served_model, LONG_PROMPT, max_tokens=48, temperature=0.9, seed=3, n=8, timeout_s=0.5)
    start = time.time()
    resp = httpx.post(url, json=body, headers=_auth(served_model), timeout=120)
    elapsed = time.time() - start
    assert resp.status_code == 504, resp.text
    err = resp.json()["error"]
    assert err["type"] == "timeout_error" and err["code"] == "timeout"
    assert elapsed < 15, elapsed
    # an adaptive strategy too (its rounds are cancelled)
    budget = {"strategy": "adaptive_consistency", "max_samples": 8, "round_size": 1, "confidence": 1.0,
              "answer_extractor": "exact"}
    resp = httpx.post(url, headers=_auth(served_model), timeout=120,
                      json=_chat_body(served_model, LONG_PROMPT, max_tokens=48, seed=5, timeout_s=0.5,
                                      compute_budget=budget))
    assert resp.status_code == 504, resp.text
    # a deadline beyond the operator's is a 400 naming the param
    ceiling = served_model["config"].request_timeout_s
    resp = httpx.post(url, headers=_auth(served_model), timeout=60,
                      json=_chat_body(served_model, max_tokens=2, timeout_s=ceiling + 1))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "timeout_s"
    # the engine and the ingress are fine afterwards (the seeded lock was released)
    _healthy_and_answering(served_model)
    resp = httpx.post(url, headers=_auth(served_model), timeout=120,
                      json=_chat_body(served_model, LONG_PROMPT, max_tokens=2, seed=1, n=2, timeout_s=60))
    assert resp.status_code == 200, resp.text


def test_streaming_past_its_deadline_ends_with_a_timeout(served_model):
    url = served_model["base_url"] + "/chat/completions"
    body = _chat_body(served_model, LONG_PROMPT, max_tokens=64, temperature=0, stream=True, timeout_s=0.3,
                      stream_options={"include_usage": True})
    start = time.time()
    with httpx.stream("POST", url, json=body, headers=_auth(served_model), timeout=120) as resp:
        text = resp.read().decode()
        status = resp.status_code
    elapsed = time.time() - start
    assert elapsed < 15
    if status == 504:  # the deadline passed before the first chunk
        assert '"timeout_error"' in text
    else:
        assert status == 200
        usage_lines = [line for line in text.splitlines() if '"usage"' in line and '"completion_tokens"' in line]
        finished = any('"completion_tokens": 64' in line or '"completion_tokens":64' in line
                       for line in usage_lines)
        # either the stream was cut with a timeout event, or (a very fast engine) it finished in time
        assert '"timeout_error"' in text or finished or '"finish_reason":"stop"' in text.replace(" ", ""), text[-2000:]
        assert text.rstrip().endswith("data: [DONE]")
    _healthy_and_answering(served_model)
