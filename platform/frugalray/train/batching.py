"""Which rows each worker trains on at each step: a pure, seeded function of the step number.

Every rank computes the same global order from (seed, epoch), so no rank needs to be told
what the others read, and a checkpoint only has to remember how many steps were done to
resume the data stream exactly where it stopped.

    plan = BatchPlan(n_rows=100, micro_batch=2, accum_steps=2, world_size=2, seed=0)
    plan.micro_batches(step=5, rank=1)   # -> [[row, row], [row, row]]: this rank's micro-batches

Orders:
- `shuffle`: a fresh seeded permutation each epoch (what training usually wants);
- `as_given`: the file's order, e.g. a curriculum written by data selection (never reshuffled).
`length_bucketed` groups rows of similar token length into the same micro-batch (less padding)
inside windows of a few global batches, so the coarse order above is kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Sequence

DataOrder = Literal["shuffle", "as_given"]
# Length bucketing sorts inside windows of this many global batches.
BUCKET_WINDOW_BATCHES = 8


@dataclass
class BatchPlan:
    n_rows: int
    micro_batch: int  # rows per worker per forward/backward
    accum_steps: int = 1  # micro-batches per worker per optimizer step
    world_size: int = 1
    seed: int = 0
    order: DataOrder = "shuffle"
    lengths: Sequence[int] | None = None  # token lengths; given -> length-bucketed batches
    _epochs: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.n_rows < 1:
            raise ValueError("BatchPlan needs at least one row")
        if self.lengths is not None and len(self.lengths) != self.n_rows:
            raise ValueError("lengths must give one length per row")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        order = list(range(self.n_rows))
        if self.order == "shuffle":
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        if self.lengths is not None:
            order = self._bucket(order, epoch)
        self._epochs = {epoch: order}  # keep one epoch: steps advance monotonically
        return order

    def _bucket(self, order: list[int], epoch: int) -> list[int]:
        """Sort windows of rows by length, cut them into micro-batches, keep coarse order."""
        assert self.lengths is not None
        window = self.global_batch * BUCKET_WINDOW_BATCHES
        out: list[int] = []
        rng = random.Random(f"{self.seed}:{epoch}:buckets")
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: (self.lengths[i], i))
            micro = [chunk[j : j + self.micro_batch] for j in range(0, len(chunk), self.micro_batch)]
            if self.order == "shuffle":
                rng.shuffle(micro)  # which bucket comes first must not always be the shortest
            out.extend(i for mb in micro for i in mb)
        return out

    def global_indices(self, step: int) -> list[int]:
        """Row indices of global batch `step` (0-based), reading epochs back to back."""
        start = step * self.global_batch
        indices: list[int] = []
        while len(indices) < self.global_batch:
            epoch, offset = divmod(start + len(indices), self.n_rows)
            take = min(self.global_batch - len(indices), self.n_rows - offset)
            indices.extend(self.epoch_order(epoch)[offset : offset + take])
        return indices

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's `accum_steps` micro-batches of step `step` (contiguous slices of the global batch)."""
        rows = self.global_indices(step)
        out = []
        for a in range(self.accum_steps):
            slot = a * self.world_size + rank
            out.append(rows[slot * self.micro_batch : (slot + 1) * self.micro_batch])
        return out

    def epoch_of(self, step: int) -> int:
        return (step * self.global_batch) // self.n_rows
