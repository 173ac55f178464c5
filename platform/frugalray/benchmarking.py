"""One writer for `bench/results/<name>.json` in the format DESIGN.md fixes, so every benchmark agrees.

A target is a string like ">= 2.5" or "<= 0.2"; `met` is computed from the measured metric, never typed in.
"""

from __future__ import annotations

import json
import operator
import os
import platform as std_platform
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"

_COMPARATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def target_met(value: float | None, target: str) -> bool:
    """Whether `value` satisfies a target such as ">= 2.5"; a missing value never meets a target."""
    symbol, _, threshold = target.strip().partition(" ")
    if symbol not in _COMPARATORS:
        raise ValueError(f"target {target!r}: expected '<op> <number>' with op in {sorted(_COMPARATORS)}")
    if value is None:
        return False
    return bool(_COMPARATORS[symbol](float(value), float(threshold)))


def machine_facts() -> dict:
    gpu = None
    try:  # torch is present wherever a benchmark runs, but keep this cheap when it is not
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    # How busy the (shared) machine was over the last 1/5/15 minutes when the result was written.
    return {"cpus": os.cpu_count(), "gpu": gpu, "python": std_platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def write_result(
    name: str,
    config: dict,
    metrics: dict,
    targets: dict[str, str],
    out_dir: str | Path | None = None,
) -> dict:
    """Write `<out_dir>/<name>.json` (default bench/results) and return the record."""
    result = {
        "bench": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "config": config,
        "metrics": metrics,
        "targets": targets,
        "met": {key: target_met(metrics.get(key), target) for key, target in targets.items()},
    }
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Plain fixed-width table, printed last by every benchmark."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
