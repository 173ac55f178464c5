"""One writer for `bench/results/<name>.json` in the format DESIGN.md fixes, so every benchmark agrees.

A target is a string like ">= 2.5" or "<= 0.2"; `met` is computed from the measured metric, never typed in.
A result records the commit it was measured at, and a target never changes silently: a change of a target
(or a target dropped) against the result already on disk needs a `targets_history` entry saying why, and
the history is carried from one result to the next.
"""

from __future__ import annotations

import json
import operator
import os
import platform as std_platform
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

_COMPARATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def parse_target(target: str) -> tuple[str, float]:
    """">= 2.5" -> (">=", 2.5)."""
    symbol, _, threshold = target.strip().partition(" ")
    if symbol not in _COMPARATORS:
        raise ValueError(f"target {target!r}: expected '<op> <number>' with op in {sorted(_COMPARATORS)}")
    try:
        return symbol, float(threshold)
    except ValueError:
        raise ValueError(f"target {target!r}: expected '<op> <number>', got {threshold.strip()!r} as the number") from None


def target_met(value: float | None, target: str) -> bool:
    """Whether `value` satisfies a target such as ">= 2.5"; a missing value never meets a target."""
    symbol, threshold = parse_target(target)
    if value is None:
        return False
    return bool(_COMPARATORS[symbol](float(value), threshold))


def same_target(a: str | None, b: str | None) -> bool:
    """Equal as targets: "<= 0.30" is "<= 0.3"; None (no target) equals only None."""
    if a is None or b is None:
        return a is b
    return parse_target(a) == parse_target(b)


def git_commit(root: str | Path = REPO_ROOT) -> str | None:
    """Short hash of HEAD, with "-dirty" when tracked files differ from it; None where git cannot say.

    bench/results is left out of the dirty check: benchmarks write there (a plot before the JSON, the
    previous benchmark's result not yet committed), and "-dirty" should mean the measuring code differs.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if changed else head


class TargetChange(BaseModel):
    """One entry of a result's `targets_history`: the target of `metric` went from `old` to `new` because `why`.

    `old` None: the target was added; `new` None: it was dropped. `commit` defaults to the run's commit.
    """

    model_config = ConfigDict(extra="forbid")

    metric: str
    old: str | None
    new: str | None
    commit: str | None = None
    why: str

    @field_validator("metric", "why")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (say which metric, and why its target changed)")
        return value

    @field_validator("old", "new")
    @classmethod
    def _a_target(cls, value: str | None) -> str | None:
        if value is not None:
            parse_target(value)
        return value

    def explains(self, metric: str, old: str | None, new: str | None) -> bool:
        return self.metric == metric and same_target(self.old, old) and same_target(self.new, new)


def unexplained_target_changes(previous: dict[str, str], targets: dict[str, str],
                               history: list[TargetChange]) -> list[tuple[str, str, str | None]]:
    """(metric, old, new) for each target of `previous` that `targets` changes or drops with no entry in
    `history` explaining it. A target for a metric `previous` had none for is an addition, not a change."""
    changes = []
    for metric, old in previous.items():
        new = targets.get(metric)
        if not same_target(old, new) and not any(entry.explains(metric, old, new) for entry in history):
            changes.append((metric, old, new))
    return changes


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


def write_plan(name: str, config: dict, out_dir: str | Path | None = None) -> dict:
    """Write `<out_dir>/<name>.json` before a benchmark's first measurement: `status: running` and its
    config (the primary configuration, everything planned). The previous result's targets and
    targets_history are kept in it, so the final `write_result` still compares against them."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    path = out / f"{name}.json"
    previous = _previous_result(path)
    planned = {"bench": name, "status": "running", "config": config,
               **{k: previous[k] for k in ("targets", "targets_history") if k in previous}}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(planned, indent=2, default=str) + "\n")
    return planned


def write_result(
    name: str,
    config: dict,
    metrics: dict,
    targets: dict[str, str],
    out_dir: str | Path | None = None,
    targets_history: list[dict] | None = None,
) -> dict:
    """Write `<out_dir>/<name>.json` (default bench/results) and return the record.

    `targets_history`: entries {"metric", "old", "new", "why"} (and optionally "commit") for targets this
    call changes against the result already at that path; they are appended to that result's history.
    Changing or dropping a target with no entry explaining it raises ValueError and overwrites nothing
    (this run's record is kept in a temporary folder the error names).
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    path = out / f"{name}.json"
    commit = git_commit()
    previous = _previous_result(path)
    history = [TargetChange.model_validate(entry) for entry in previous.get("targets_history", [])]
    for i, entry in enumerate(targets_history or []):
        change = TargetChange.model_validate(entry)
        if change.commit is None:
            change.commit = commit
        if not same_target(change.new, targets.get(change.metric)):
            raise ValueError(f"targets_history[{i}] says the target of {change.metric!r} is now {change.new!r}, "
                             f"but this call's target for it is {targets.get(change.metric)!r}: make them agree")
        # A benchmark that rewrites its result as it goes (train_memory) passes the same entry each time.
        if not any(_same_change(change, seen) for seen in history):
            history.append(change)
    result = {
        "bench": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine_facts(),
        "config": config,
        "metrics": metrics,
        "targets": targets,
        "met": {key: target_met(metrics.get(key), target) for key, target in targets.items()},
        "targets_history": [entry.model_dump() for entry in history],
    }
    text = json.dumps(result, indent=2, default=str) + "\n"
    unexplained = unexplained_target_changes(previous.get("targets", {}), targets, history)
    if unexplained:
        kept = Path(tempfile.mkdtemp(prefix=f"frugalray-{name}-")) / f"{name}.json"
        kept.write_text(text)
        lines = [f"  {metric!r}: {old!r} -> {new!r}" + (" (dropped)" if new is None else "")
                 for metric, old, new in unexplained]
        example = {"metric": unexplained[0][0], "old": unexplained[0][1], "new": unexplained[0][2],
                   "why": "<why the target changed>"}
        raise ValueError(
            f"{path}: targets changed with no targets_history entry explaining them:\n" + "\n".join(lines)
            + f"\nPass write_result(..., targets_history=[{example!r}, ...]) with one entry per change and a "
            "real why (a run that measures fewer targets, such as a quick one, should write to another "
            f"out_dir). Nothing was overwritten; this run's record is in {kept}.")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return result


def _previous_result(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the result already there is not JSON ({err}); restore it from git or "
                         "delete it before writing a new one") from None
    return previous if isinstance(previous, dict) else {}


def _same_change(a: TargetChange, b: TargetChange) -> bool:
    return a.explains(b.metric, b.old, b.new) and a.why == b.why


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
