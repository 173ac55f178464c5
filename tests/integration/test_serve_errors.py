"""Error codes of the served model: 401 without the key, 503 + Retry-After on a full queue,
504 (never a hang) past a deadline. All against the session's real Serve app (`served_model`)."""

from __future__ import annotations

import json
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
    slots = cfg.ingress_replicas * cfg.ingress_max_ongoing_requests
    total = slots + cfg.max_queued_requests + 6
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
    assert statuses.count(200) >= slots
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
    # 64 greedy tokens of a story take this CPU engine longer than 0.3 s: the deadline passes, one way or the other.
    if status == 504:  # the deadline passed before the first chunk
        assert json.loads(text)["error"]["type"] == "timeout_error", text
    else:
        # Headers were sent: the stream is cut with a timeout event, its last one before [DONE].
        assert status == 200
        events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", text[-2000:]
        assert json.loads(events[-2])["error"]["code"] == "timeout", text[-2000:]
    _healthy_and_answering(served_model)


def test_hostile_bodies_get_400_and_413_and_the_server_keeps_answering(served_model):
    url = served_model["base_url"] + "/chat/completions"
    headers = {**_auth(served_model), "Content-Type": "application/json"}
    # What a new user tried: 100,000 nested brackets was a RecursionError inside the ingress (HTTP 500).
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(url, content=deep, headers=headers, timeout=60)
    assert resp.status_code == 400, resp.text
    assert "deeper than" in resp.json()["error"]["message"]
    # Over the operator's max_request_body_bytes: 413, whether announced by Content-Length...
    limit = served_model["config"].max_request_body_bytes
    big = b'{"prompt": "' + b"x" * limit + b'", "max_tokens": 1}'
    resp = httpx.post(served_model["base_url"] + "/completions", content=big, headers=headers, timeout=60)
    assert resp.status_code == 413, resp.text
    assert "max_request_body_bytes" in resp.json()["error"]["message"]

    # ... or streamed in chunks without a length (refused once the limit is passed).
    def chunks():
        yield big[: len(big) // 2]
        yield big[len(big) // 2:]

    resp = httpx.post(served_model["base_url"] + "/completions", content=chunks(), headers=headers, timeout=60)
    assert resp.status_code == 413, resp.text
    _healthy_and_answering(served_model)


def _vllm_queue_gauges() -> float | None:
    """vLLM's own num_requests_running + num_requests_waiting, as Ray's Prometheus endpoint shows them."""
    import ray

    total, seen = 0.0, False
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30).text
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name.endswith(("num_requests_running", "num_requests_waiting")) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
                seen = True
    return total if seen else None


def test_a_timed_out_request_frees_the_engine(served_model, engine_handle):
    import threading

    url = served_model["base_url"] + "/chat/completions"
    # eight 64-token samples in one engine request: many seconds of decoding here, far past a 1 s deadline
    body = _chat_body(served_model, LONG_PROMPT, max_tokens=64, temperature=0.9, timeout_s=1.0,
                      compute_budget={"strategy": "self_consistency", "max_samples": 8})
    assert engine_handle.unfinished_requests.remote().result(timeout_s=60) == 0  # idle, and the handle warm
    # A replica's first request sets up its handle to the engine (seconds here, and no deadline fires while it
    # does): warm both ingress replicas so the 1 s deadline below is spent on decoding.
    for _ in range(4 * served_model["config"].ingress_replicas):
        _healthy_and_answering(served_model)
    done: dict = {}
    sender = threading.Thread(target=lambda: done.update(resp=httpx.post(url, json=body, headers=_auth(served_model),
                                                                          timeout=120)))
    sender.start()
    busy = 0
    while sender.is_alive():
        busy = max(busy, engine_handle.unfinished_requests.remote().result(timeout_s=30))
    sender.join()
    assert done["resp"].status_code == 504, done["resp"].text
    print(f"\nengine held up to {busy} request(s) while it ran")
    assert busy >= 1, "the engine never held the request: nothing was measured"
    # After the 504 the engine's work is aborted, not left running: its queue is empty within seconds.
    deadline = time.time() + 2
    while (left := engine_handle.unfinished_requests.remote().result(timeout_s=30)) and time.time() < deadline:
        time.sleep(0.1)
    assert left == 0, f"{left} request(s) still in the engine 2 s after the 504"
    # vLLM's own gauges say so too (Ray exports a replica's metrics every 10 s, hence the longer wait).
    deadline = time.time() + 45
    while (gauges := _vllm_queue_gauges()) != 0 and time.time() < deadline:
        time.sleep(2)
    assert gauges == 0, f"vLLM num_requests_running + waiting = {gauges} after the 504"
    _healthy_and_answering(served_model)
