"""Serving metrics on Ray's Prometheus endpoint: after a few requests, the counters moved by exactly what
the responses' usage said. Against the session's served model."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from frugalray.serve.usage import usage_extension

pytestmark = pytest.mark.slow

QUESTION = "What is 3 + 4? Reply with only the number."
LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<tags>[^}]*)\})?\s+(?P<value>\S+)")


def _metrics_urls() -> list[str]:
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]


def _totals(strategy: str) -> dict[str, float]:
    """frugalray_* counters for (strategy, tenant default) summed over nodes and replicas."""
    totals: dict[str, float] = {}
    for url in _metrics_urls():
        for line in httpx.get(url, timeout=30).text.splitlines():
            match = LINE.match(line)
            if not match or "frugalray_" not in match["name"] or match["name"].endswith(("_bucket", "_sum")):
                continue
            tags = dict(re.findall(r'(\w+)="([^"]*)"', match["tags"] or ""))
            if tags.get("strategy") != strategy or tags.get("tenant") != "default":
                continue
            name = match["name"].removeprefix("ray_").removesuffix("_total")
            totals[name] = totals.get(name, 0.0) + float(match["value"])
    return totals


def _settled(strategy: str, timeout_s: float = 90) -> dict[str, float]:
    """The counters once two reads a report interval apart agree (earlier tests' requests all exported)."""
    deadline = time.time() + timeout_s
    last = _totals(strategy)
    while time.time() < deadline:
        time.sleep(11)  # Ray exports a worker's metrics every 10 s
        now = _totals(strategy)
        if now == last:
            return now
        last = now
    return last


def test_counters_move_by_what_usage_said(served_model):
    url = served_model["base_url"] + "/chat/completions"
    headers = {"Authorization": f"Bearer {served_model['api_key']}"}
    body = {"model": served_model["model"], "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6}
    before = _settled("self_consistency")
    spent = {"requests": 0, "samples": 0, "completion_tokens": 0, "flops": 0.0}
    for seed, samples in [(1, 3), (2, 2)]:
        resp = httpx.post(url, headers=headers, timeout=180, json={
            **body, "seed": seed, "compute_budget": {"strategy": "self_consistency", "max_samples": samples}})
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        spent["requests"] += 1
        spent["samples"] += usage_extension(usage)["samples"]
        spent["completion_tokens"] += usage["completion_tokens"]
        spent["flops"] += usage_extension(usage)["flops"]
    assert spent["samples"] == 5
    deadline, after = time.time() + 90, before
    while time.time() < deadline:
        after = _totals("self_consistency")
        if after.get("frugalray_requests", 0) - before.get("frugalray_requests", 0) >= spent["requests"]:
            break
        time.sleep(3)
    moved = {name: after.get(f"frugalray_{name}", 0.0) - before.get(f"frugalray_{name}", 0.0) for name in spent}
    print(f"\nmetrics moved by {moved}; usage said {spent}")
    assert moved["requests"] == spent["requests"]
    assert moved["samples"] == spent["samples"]
    assert moved["completion_tokens"] == spent["completion_tokens"]
    assert moved["flops"] == pytest.approx(spent["flops"], rel=1e-6)
    # the per-request histogram saw them too
    assert after.get("frugalray_samples_per_request_count", 0) - before.get(
        "frugalray_samples_per_request_count", 0) == spent["requests"]
