"""ComputeLedger: one append-only JSON-lines file per run that every stage writes to.

Each record says which stage spent how many FLOPs on how many tokens in how many
seconds, and what it produced. The file is the source of truth for a run's cost;
`totals_by_stage()` is what summaries and reports print.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.jsonl"


class ComputeLedger:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER_FILE

    def record(
        self,
        stage: str,
        flops: float,
        tokens: int = 0,
        wall_s: float = 0.0,
        produced: dict[str, Any] | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        if flops < 0 or tokens < 0 or wall_s < 0:
            raise ValueError(f"ledger record for {stage!r}: flops, tokens and wall_s must be >= 0")
        entry = {
            "time": time.time(),
            "stage": stage,
            "flops": float(flops),
            "tokens": int(tokens),
            "wall_s": round(float(wall_s), 3),
            "produced": produced or {},
            **details,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(entry, default=str) + "\n"
        # Trials and jobs may append concurrently; a lock keeps lines whole.
        with open(self.path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line)
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def totals_by_stage(self) -> dict[str, dict[str, float]]:
        totals: dict[str, dict[str, float]] = defaultdict(lambda: {"flops": 0.0, "tokens": 0, "wall_s": 0.0, "records": 0})
        for e in self.entries():
            t = totals[e["stage"]]
            t["flops"] += e["flops"]
            t["tokens"] += e["tokens"]
            t["wall_s"] += e["wall_s"]
            t["records"] += 1
        return dict(totals)

    def total_flops(self) -> float:
        return sum(e["flops"] for e in self.entries())
