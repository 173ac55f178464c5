"""A shared FLOP cap for a sweep: reserve before spending, so the sum never exceeds the cap.

`FlopReservations` is the pure arithmetic (unit-tested without Ray). `FlopBudget` is a
small Ray actor wrapping it so that concurrent trials draw from one pot: an actor runs
one method call at a time, so check-and-reserve is atomic across trials.

A trial reserves an *upper bound* of what its next chunk can cost (padded batch x seq_len,
plus the evaluation that follows), then settles: it records what it really spent and hands
back the unspent rest, so later chunks can use it. Invariant: spent <= reserved <= cap, at
every moment and under any interleaving (`reserved` counts settled spend plus open holds).
"""

from __future__ import annotations

import math


class FlopReservations:
    def __init__(self, cap: float):
        if not (cap > 0 and math.isfinite(cap)):
            raise ValueError(f"flop_cap: must be a finite number > 0 (got {cap!r})")
        self.cap = float(cap)
        self.reserved = 0.0
        self.spent = 0.0
        self.released = 0.0  # reserved but not spent, handed back by settle()
        self.refused = 0  # reservation requests turned down

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

    def snapshot(self) -> dict[str, float]:
        return {
            "cap": self.cap, "reserved": self.reserved, "spent": self.spent,
            "remaining": self.remaining, "released": self.released, "refused": self.refused,
        }


class FlopBudget:
    """Ray actor class (decorated with `ray.remote` by `create_flop_budget`)."""

    def __init__(self, cap: float):
        self._state = FlopReservations(cap)

    def reserve(self, flops: float) -> bool:
        return self._state.reserve(flops)

    def reserve_steps(self, step_flops: float, max_steps: int, overhead: float = 0.0) -> int:
        return self._state.reserve_steps(step_flops, max_steps, overhead)

    def settle(self, reserved: float, spent: float) -> None:
        self._state.settle(reserved, spent)

    def spent(self) -> float:
        return self._state.spent

    def remaining(self) -> float:
        return self._state.remaining

    def snapshot(self) -> dict[str, float]:
        return self._state.snapshot()


def create_flop_budget(cap: float, name: str):
    """A named FlopBudget actor (0 CPUs: it only does arithmetic) that trials find with `ray.get_actor`."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_concurrency=1)(FlopBudget)
    return actor_cls.options(name=name, lifetime=None).remote(cap)
