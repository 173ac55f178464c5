"""A killed replica is replaced by Serve and requests succeed again.

Runs after the other test_serve* files (pytest takes files alphabetically) and leaves the
shared app healthy: each test waits until the replacement answers before it returns.
"""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.slow


def _replica_actors(app_name: str) -> dict[str, list[str]]:
    """Live Serve replica actors of one application: deployment name -> actor names."""
    import ray

    found: dict[str, list[str]] = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):  # live named actors, from the GCS
        name = actor["name"] if actor.get("namespace") == "serve" else ""
        # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<replica id>
        if name.startswith("SERVE_REPLICA::"):
            app, deployment, _ = name.removeprefix("SERVE_REPLICA::").split("#", 2)
            if app == app_name:
                found.setdefault(deployment, []).append(name)
    return found


def _answers(served_model, timeout: float = 30) -> bool:
    try:
        resp = httpx.post(served_model["base_url"] + "/chat/completions", timeout=timeout,
                          headers={"Authorization": f"Bearer {served_model['api_key']}"},
                          json={"model": served_model["model"], "max_tokens": 2, "temperature": 0,
                                "messages": [{"role": "user", "content": "What is 3 + 4?"}]})
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 and bool(resp.json()["choices"][0]["message"]["content"])


def _healthy(served_model) -> bool:
    try:
        resp = httpx.get(served_model["base_url"].removesuffix("/v1") + "/health", timeout=30)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def _kill_and_wait(served_model, pick, deadline_s: float) -> tuple[str, str, float]:
    import ray

    before = _replica_actors(served_model["app_name"])
    deployment = pick(before)
    victim = before[deployment][0]  # one of them (the ingress may run several replicas)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    start = time.time()
    while time.time() - start < deadline_s:
        replicas = _replica_actors(served_model["app_name"]).get(deployment, [])
        new = [r for r in replicas if r not in before[deployment]]
        if (len(replicas) == len(before[deployment]) and new and victim not in replicas
                and _healthy(served_model) and _answers(served_model)):
            return victim, new[0], time.time() - start
        time.sleep(2)
    pytest.fail(f"{deployment}: no healthy replacement for {victim} within {deadline_s:.0f}s")


def test_killed_ingress_replica_is_replaced(served_model):
    assert _answers(served_model, timeout=120)
    victim, replacement, waited = _kill_and_wait(
        served_model, lambda found: next(d for d in found if d.endswith("-ingress")), deadline_s=180)
    print(f"\ningress replica {victim} -> {replacement} in {waited:.1f}s")
    assert replacement != victim


def test_killed_engine_replica_is_replaced(served_model):
    # The LLMServer replica holds the vLLM engine: Serve starts a new one (the engine loads
    # again, about a minute on CPU), and the ingress's handle routes to it.
    assert _answers(served_model, timeout=120)
    victim, replacement, waited = _kill_and_wait(
        served_model, lambda found: next(d for d in found if not d.endswith("-ingress")), deadline_s=420)
    print(f"\nengine replica {victim} -> {replacement} in {waited:.1f}s")
    assert replacement != victim
    # the adapter came back with the engine
    resp = httpx.post(served_model["base_url"] + "/completions", timeout=120,
                      headers={"Authorization": f"Bearer {served_model['api_key']}"},
                      json={"model": served_model["adapter"], "prompt": "1, 2, 3,", "max_tokens": 2,
                            "temperature": 0})
    assert resp.status_code == 200, resp.text
