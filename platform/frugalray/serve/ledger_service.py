"""The one tenant ledger every ingress replica shares: a named, detached Ray actor around
frugalray.serve.tenant_ledger (SQLite), pinned to the node that deployed the app (where `ledger_path`
lives; on Kubernetes, the head pod's persistent volume).

The actor restarts if it dies (`max_restarts=-1`) and reopens the same file, so balances survive it, an
ingress restart and a redeploy. A reservation whose request died with its replica stays charged at its
worst case; once it is older than any live request can be (`expiry_s`) it is closed that way and logged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from frugalray.serve.tenant_ledger import Refusal, Reservation, TenantLedger
from frugalray.serve.tenants import TenantBudget

log = logging.getLogger(__name__)

LEDGER_NAMESPACE = "frugalray"


def ledger_actor_name(app_name: str) -> str:
    return f"{app_name}-tenant-ledger"


class TenantLedgerService:
    """Ray actor class (made remote by `start_ledger`); one call at a time, each a SQLite transaction."""

    def __init__(self, path: str, expiry_s: float):
        self._ledger = TenantLedger(path)
        self._path = path
        self._expiry_s = expiry_s
        self._expire()
        log.info("tenant ledger open at %s", path)

    def _expire(self) -> None:
        for stale in self._ledger.expire_stale(self._expiry_s, time.time()):
            log.warning("tenant %s: reservation %d of %s (%.3g FLOPs, %d tokens) was never settled (its request "
                        "died with its replica); charged in full", stale.tenant, stale.id, stale.holder,
                        stale.flops, stale.completion_tokens)

    def reserve(self, tenant: str, flops: float, completion_tokens: int, budget: dict[str, Any] | None,
                holder: str) -> Reservation | Refusal:
        self._expire()
        return self._ledger.reserve(tenant, flops, completion_tokens,
                                    TenantBudget(**budget) if budget else None, time.time(), holder)

    def settle(self, reservation_id: int, flops: float, completion_tokens: int) -> bool:
        return self._ledger.settle(reservation_id, flops, completion_tokens, time.time())

    def spent(self, tenant: str, window_s: float) -> tuple[float, int]:
        return self._ledger.spent(tenant, time.time(), window_s)

    def path(self) -> str:
        return self._path


def start_ledger(app_name: str, path: Path, expiry_s: float):
    """The app's ledger actor: the running one if there is one, else a new one on this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    service = ray.remote(num_cpus=0, max_restarts=-1)(TenantLedgerService)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = service.options(name=ledger_actor_name(app_name), namespace=LEDGER_NAMESPACE, lifetime="detached",
                            get_if_exists=True, scheduling_strategy=here).remote(str(path), expiry_s)
    opened = ray.get(actor.path.remote(), timeout=120)  # a bad path fails here, naming it
    if opened != str(path):
        log.warning("tenant ledger of %s already running with %s (not %s); using it", app_name, opened, path)
    return actor


def stop_ledger(app_name: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(ledger_actor_name(app_name), namespace=LEDGER_NAMESPACE), no_restart=True)
    except ValueError:
        pass  # no ledger: the app had no budgeted tenant
