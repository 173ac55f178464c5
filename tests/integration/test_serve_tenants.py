"""Tenant budgets on the session's served model: keys map to tenants, a request reserves its worst case
from one SQLite-backed ledger shared by both ingress replicas, and settles what it spent.

Each budgeted tenant of conftest.TENANT_BUDGETS is spent by one test here (budgets are per hour).
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import TENANT_BUDGETS
from frugalray.serve.usage import usage_extension

pytestmark = pytest.mark.slow

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."
QUESTION = "What is 3 + 4? Reply with only the number."


def _post(served_model, tenant: str | None, client: httpx.Client | None = None, **body):
    key = served_model["api_key"] if tenant is None else served_model["tenant_keys"][tenant]
    request = {"model": served_model["model"], "messages": [{"role": "user", "content": QUESTION}], **body}
    return (client or httpx).post(served_model["base_url"] + "/chat/completions", json=request, timeout=300,
                                  headers={"Authorization": f"Bearer {key}"})


def _ledger():
    import ray

    from frugalray.serve.ledger_service import LEDGER_NAMESPACE

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == LEDGER_NAMESPACE and a["name"].endswith("-tenant-ledger")]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace=LEDGER_NAMESPACE)


def _spent(tenant: str) -> tuple[float, int]:
    import ray

    return tuple(ray.get(_ledger().spent.remote(tenant, 3600.0), timeout=60))


def _holders(served_model, tenant: str) -> set[str]:
    with sqlite3.connect(f"file:{served_model['config'].ledger_path}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT DISTINCT holder FROM spend WHERE tenant = ?", (tenant,))}


def test_a_tenant_over_its_balance_gets_429_with_retry_after_and_others_are_unaffected(served_model):
    limit = TENANT_BUDGETS["tiny"]["completion_tokens"]
    spent = 0
    for _ in range(limit):  # 8-token requests until the next one's worst case no longer fits
        resp = _post(served_model, "tiny", max_tokens=8, temperature=0, messages=[{"role": "user",
                                                                                 "content": LONG_PROMPT}])
        if resp.status_code == 429:
            break
        assert resp.status_code == 200, resp.text
        spent += resp.json()["usage"]["completion_tokens"]
    assert resp.status_code == 429, "the balance never ran out"
    assert spent + 8 > limit >= spent
    retry_after = int(resp.headers["retry-after"])
    assert 0 < retry_after <= 3600
    assert int(resp.headers["x-frugalray-budget-remaining-completion-tokens"]) == limit - spent
    assert resp.json()["error"]["code"] == "tenant_budget_exhausted"
    # a request whose worst case exceeds the whole budget: waiting cannot help, so a 400
    resp = _post(served_model, "tiny", max_tokens=64, n=2)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "over_tenant_budget", resp.text
    # the ledger agrees with what the responses said, and other tenants are served as before
    assert _spent("tiny")[1] == spent
    assert _post(served_model, None, max_tokens=4, temperature=0).status_code == 200
    assert _post(served_model, "burst", max_tokens=4, temperature=0).status_code == 200


def test_concurrent_requests_across_two_replicas_never_spend_more_than_the_balance(served_model):
    balance = TENANT_BUDGETS["burst"]["flops"]
    before = _spent("burst")[0]
    budget = {"strategy": "adaptive_consistency", "max_samples": 4, "round_size": 2, "confidence": 1.0}
    cfg = served_model["config"]
    slots = cfg.ingress_replicas * cfg.ingress_max_ongoing_requests  # as many at once as both replicas take
    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=slots)) as client, \
            ThreadPoolExecutor(max_workers=slots) as pool:
        results = list(pool.map(lambda i: _post(served_model, "burst", client, max_tokens=8, seed=i,
                                                compute_budget=budget), range(40)))
    statuses = [r.status_code for r in results]
    print(f"\nstatuses: { {s: statuses.count(s) for s in set(statuses)} }")
    assert set(statuses) <= {200, 429, 503}, [r.text for r in results if r.status_code not in (200, 429, 503)][:2]
    assert 429 in statuses and 200 in statuses
    used = before + sum(usage_extension(r.json()["usage"])["flops"] for r in results if r.status_code == 200)
    ledger = _spent("burst")[0]
    print(f"usage FLOPs {used:.4g}, ledger {ledger:.4g}, balance {balance:.4g}")
    assert used <= balance
    assert ledger == pytest.approx(used, rel=1e-9)  # every request settled at what its usage said
    assert len(_holders(served_model, "burst")) == served_model["config"].ingress_replicas


def test_a_replica_killed_mid_burst_loses_no_spend_and_the_ledger_survives_its_own_restart(served_model):
    import ray

    balance = TENANT_BUDGETS["crash"]["flops"]
    budget = {"strategy": "self_consistency", "max_samples": 4}

    def send(i: int):
        try:
            return _post(served_model, "crash", max_tokens=16, temperature=0.9, seed=i, compute_budget=budget,
                         messages=[{"role": "user", "content": LONG_PROMPT}])
        except httpx.HTTPError as err:  # the connection to the killed replica may drop
            return err

    # Serve names replica actors SERVE_REPLICA::<app>#<deployment>#<replica id> (namespace "serve"); the GCS
    # lists the live ones (the state API would ask whichever dashboard this process last saw)
    prefix = f"SERVE_REPLICA::{served_model['app_name']}#{served_model['app_name']}-ingress#"
    ingress = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a.get("namespace") == "serve" and a["name"].startswith(prefix)]
    assert len(ingress) == served_model["config"].ingress_replicas, ingress
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(send, i) for i in range(16)]
        time.sleep(3)  # requests are in flight on both replicas
        ray.kill(ray.get_actor(ingress[0], namespace="serve"), no_restart=False)
        results = [f.result() for f in futures]
    answered = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
    lost = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code in (200, 429))]
    print(f"\n{len(answered)} answered, {len(lost)} lost with the replica")
    used = sum(usage_extension(r.json()["usage"])["flops"] for r in answered)
    ledger = _spent("crash")[0]
    # the dead replica's reservations stay charged at their worst case: the ledger holds at least what was served
    assert used <= ledger <= balance
    # the ledger actor restarts from its file with the same balances
    ray.kill(_ledger(), no_restart=False)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            assert _spent("crash")[0] == pytest.approx(ledger)
            break
        except ray.exceptions.RayActorError:
            time.sleep(1)
    else:
        pytest.fail("the tenant ledger did not come back")
    # Serve replaced the killed replica; the server answers
    deadline = time.time() + 120
    while _post(served_model, None, max_tokens=4, temperature=0).status_code != 200 and time.time() < deadline:
        time.sleep(2)
    assert _post(served_model, None, max_tokens=4, temperature=0).status_code == 200
