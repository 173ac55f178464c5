"""A shared FLOP cap for a sweep: reserve before spending, so the sum never exceeds the cap.

`FlopReservations` is the pure arithmetic (unit-tested without Ray). `SweepFlopBudget` is a
small Ray actor wrapping it so that concurrent trials draw from one pot: an actor runs
one method call at a time, so check-and-reserve is atomic across trials.

A trial reserves an *upper bound* of what its next chunk can cost (padded batch x seq_len,
plus the evaluation that follows), then settles: it records what it really spent and hands
back the unspent rest, so later chunks can use it. Invariant: spent <= reserved <= cap, at
every moment and under any interleaving (`reserved` counts settled spend plus open holds).

Restart safety: with a `journal` path, the actor appends every grant and settle to a JSON
lines file *before* answering (write-ahead). A resumed sweep rebuilds the pot from it with
`FlopReservations.from_journal`: settled spend counts as spent, and holds that were open
when the driver died are charged in full (their chunk may have run partly; its real cost
is unknown but never above the hold), so the resumed sweep can never push the total past
the cap and never counts a settled chunk twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class FlopReservations:
    def __init__(self, cap: float):
        if not (cap > 0 and math.isfinite(cap)):
            raise ValueError(f"flop_cap: must be a finite number > 0 (got {cap!r})")
        self.cap = float(cap)
        self.reserved = 0.0
        self.spent = 0.0
        self.released = 0.0  # reserved but not spent, handed back by settle()
        self.refused = 0  # reservation requests turned down
        self.charged_at_restart = 0.0  # open holds charged in full when a sweep resumed

    @property
    def remaining(self) -> float:
        return self.cap - self.reserved

    def reserve(self, flops: float) -> bool:
        """Take `flops` from the cap if they fit entirely; all or nothing."""
        if not (flops >= 0 and math.isfinite(flops)):
            raise ValueError(f"reserve: flops must be finite and >= 0 (got {flops!r})")
        if self.reserved + flops > self.cap:
            self.refused += 1
            return False
        self.reserved += flops
        return True

    def reserve_steps(self, step_flops: float, max_steps: int, overhead: float = 0.0) -> int:
        """Reserve the most steps k <= max_steps with k * step_flops + overhead within the cap; 0: none fit."""
        if not (step_flops > 0 and math.isfinite(step_flops)) or overhead < 0 or max_steps < 0:
            raise ValueError("reserve_steps: need step_flops > 0, overhead >= 0, max_steps >= 0")
        room = self.remaining - overhead
        steps = min(max_steps, math.floor(room / step_flops)) if room > 0 else 0
        # Float rounding must never let a grant overshoot the cap.
        while steps > 0 and self.reserved + steps * step_flops + overhead > self.cap:
            steps -= 1
        if steps <= 0:
            self.refused += 1
            return 0
        self.reserved += steps * step_flops + overhead
        return steps

    def settle(self, reserved: float, spent: float) -> None:
        """Close a hold of `reserved` FLOPs that really cost `spent`; the rest returns to the pot.

        Spending more than was held means the upper bound undercounts: an error, never hidden.
        """
        if not (math.isfinite(spent) and math.isfinite(reserved) and 0 <= spent and 0 <= reserved):
            raise ValueError(f"settle: need finite reserved, spent >= 0 (got {reserved!r}, {spent!r})")
        if spent > reserved * (1 + 1e-9):
            raise ValueError(
                f"settle: spent {spent:.4g} FLOPs > the {reserved:.4g} reserved for it; "
                "the reservation bound undercounts"
            )
        if reserved > self.reserved - self.spent + 1e-9 * self.cap:
            raise ValueError(f"settle: {reserved:.4g} FLOPs were never reserved")
        unused = max(0.0, reserved - spent)
        self.reserved -= unused
        self.released += unused
        self.spent += min(spent, reserved)

    def charge_open_holds(self) -> float:
        """Close every open hold as fully spent (the driver died mid-chunk); returns what was charged."""
        open_holds = max(0.0, self.reserved - self.spent)
        self.spent += open_holds
        self.charged_at_restart += open_holds
        return open_holds

    def snapshot(self) -> dict[str, float]:
        return {
            "cap": self.cap, "reserved": self.reserved, "spent": self.spent,
            "remaining": self.remaining, "released": self.released, "refused": self.refused,
            "charged_at_restart": self.charged_at_restart,
        }

    @classmethod
    def from_journal(cls, cap: float, events: list[dict]) -> FlopReservations:
        """Rebuild the pot from journal events, then charge holds left open by a dead driver.

        Events: {"op": "reserve", "flops"}, {"op": "settle", "reserved", "spent"},
        {"op": "restart"} (a resume closed the open holds at that point). A refused request
        writes nothing. Replaying the same journal twice gives the same state.
        """
        state = cls(cap)
        for event in events:
            op = event.get("op")
            if op == "reserve":
                state.reserved += float(event["flops"])
            elif op == "settle":
                state.settle(float(event["reserved"]), float(event["spent"]))
            elif op == "restart":
                state.charge_open_holds()
            elif op != "open":
                raise ValueError(f"flop budget journal: unknown event {event!r}")
        state.charge_open_holds()
        if state.reserved > state.cap * (1 + 1e-9):
            raise ValueError(f"flop budget journal: {state.reserved:.4g} FLOPs held > cap {state.cap:.4g}")
        return state


def read_journal(path: str | Path) -> list[dict]:
    """Events of a budget journal; a torn last line (the actor died while writing it) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    events = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return events


class SweepFlopBudget:
    """Ray actor class (decorated with `ray.remote` by `create_flop_budget`).

    With `journal`, the state is first rebuilt from the file (a resumed sweep) and every
    change is appended to it before the caller hears the answer.
    """

    def __init__(self, cap: float, journal: str | None = None):
        self._journal = Path(journal) if journal else None
        events = read_journal(self._journal) if self._journal else []
        self._state = FlopReservations.from_journal(cap, events) if events else FlopReservations(cap)
        if events:
            self._write({"op": "restart", "charged": self._state.charged_at_restart})
        elif self._journal:
            self._write({"op": "open", "cap": float(cap)})

    def _write(self, event: dict) -> None:
        if self._journal is None:
            return
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self._journal, "a") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def reserve(self, flops: float) -> bool:
        ok = self._state.reserve(flops)
        if ok:
            self._write({"op": "reserve", "flops": float(flops)})
        return ok

    def reserve_steps(self, step_flops: float, max_steps: int, overhead: float = 0.0) -> int:
        steps = self._state.reserve_steps(step_flops, max_steps, overhead)
        if steps:
            self._write({"op": "reserve", "flops": steps * step_flops + overhead})
        return steps

    def settle(self, reserved: float, spent: float, tag: str = "") -> float:
        """Settle a hold; returns the sweep's total spend after it (the global FLOP clock)."""
        self._state.settle(reserved, spent)
        self._write({"op": "settle", "reserved": float(reserved), "spent": float(spent), "tag": tag})
        return self._state.spent

    def spent(self) -> float:
        return self._state.spent

    def remaining(self) -> float:
        return self._state.remaining

    def snapshot(self) -> dict[str, float]:
        return self._state.snapshot()


def create_flop_budget(cap: float, name: str, journal: str | Path | None = None):
    """A named SweepFlopBudget actor (0 CPUs: it only does arithmetic) that trials find with `ray.get_actor`.

    With a journal it is pinned to the driver's node, where the run directory lives.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(SweepFlopBudget)
    options = {"name": name, "lifetime": None}
    if journal is not None:
        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return actor_cls.options(**options).remote(cap, str(journal) if journal is not None else None)
