"""Budget ladder: one sweep at the largest cap answers "what is the best config at each smaller cap?".

Every chunk a trial runs is recorded with the sweep's global FLOP clock after it settled
(`sweep_flops`), what it really cost and what it held (the upper bound reserved before it
ran). Replaying the chunks in the order their FLOPs were spent, a smaller cap C admits a
chunk only while `spent so far + its hold <= C` (the same all-or-nothing rule the budget
actor applies) and ends at the first chunk it cannot pay for. The best configuration at C
is then the best *last* metric per trial among admitted chunks (the scope `run_sweep`
reports its winner with), so the largest rung equals the sweep's own answer.

Exact or estimate:
- exact: the whole sweep fitted under C (the same run), or the scheduler's decisions do
  not depend on the cap (fifo, asha), trials ran one at a time, and the room left at the
  cut could not have paid for any chunk the sweep ran (so a real run at C would have
  stopped there too);
- estimate: the marginal scheduler (its lambda and admission read the remaining budget),
  concurrent trials (holds overlapped), a resumed sweep, or a cut where a partial chunk
  would have fitted. The reported metric is what the replayed prefix reached: a real run
  at C may have done a little better, never needed more than C.

Pure logic (no Ray); `write_ladder_report` adds the JSON, Markdown and frontier PNG.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel


@dataclass(frozen=True)
class ChunkRecord:
    trial_id: str
    config: dict
    sweep_flops: float  # the sweep's total spend right after this chunk settled
    chunk_flops: float  # what the chunk really cost
    chunk_hold: float  # what it reserved before running (>= chunk_flops)
    metric: float | None  # the metric reported after the chunk (None: not finite)


class LadderRung(BaseModel):
    cap: float
    best_config: dict[str, Any] | None
    best_metric: float | None
    best_trial: str | None
    flops_used: float
    chunks_used: int
    trials_seen: int
    status: Literal["exact", "estimate"]
    note: str


class LadderReport(BaseModel):
    metric: str
    mode: str
    scheduler: str
    flops_spent: float
    rungs: list[LadderRung]
    winner_changes: list[str]


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def budget_ladder(
    chunks: list[ChunkRecord],
    caps: list[float],
    mode: Literal["min", "max"] = "min",
    prefix_exact: bool = True,
    why_estimate: str = "",
) -> list[LadderRung]:
    """Best config and metric reachable within each cap, replaying `chunks` in spend order."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode: must be 'min' or 'max' (got {mode!r})")
    bad = [c for c in caps if not (c > 0 and math.isfinite(c))]
    if bad:
        raise ValueError(f"flop_caps: every cap must be a finite number > 0 (got {bad})")
    ordered = sorted(chunks, key=lambda ch: ch.sweep_flops)
    smallest_hold = min((ch.chunk_hold for ch in ordered), default=math.inf)
    rungs = []
    for cap in sorted(caps):
        spent, used, last = 0.0, 0, {}
        cut = False
        for ch in ordered:
            if spent + ch.chunk_hold > cap * (1 + 1e-12):
                cut = True
                break
            spent += ch.chunk_flops
            used += 1
            last[ch.trial_id] = ch
        scored = [ch for ch in last.values() if ch.metric is not None and math.isfinite(ch.metric)]
        best = None
        for ch in scored:
            if best is None or _better(ch.metric, best.metric, mode):
                best = ch
        if not cut:
            status, note = "exact", "the whole sweep fitted under this cap"
        elif not prefix_exact:
            status, note = "estimate", why_estimate or "the scheduler's decisions depend on the cap"
        elif cap - spent >= smallest_hold:
            status, note = "estimate", (f"{cap - spent:.3g} FLOPs were left at the cut: a run at this cap could have "
                                        "fitted one more chunk, so its answer may be slightly better")
        else:
            status, note = "exact", "the prefix of the sweep is what a sweep at this cap would have run"
        rungs.append(LadderRung(
            cap=float(cap), best_config=best.config if best else None, best_metric=best.metric if best else None,
            best_trial=best.trial_id if best else None, flops_used=spent, chunks_used=used,
            trials_seen=len(last), status=status, note=note,
        ))
    return rungs


def winner_changes(rungs: list[LadderRung]) -> list[str]:
    """One line per pair of neighbouring caps whose winning configuration differs."""
    lines = []
    for low, high in itertools.pairwise(rungs):
        if low.best_config != high.best_config:
            lines.append(f"the winning configuration changes between cap {low.cap:.3g} and {high.cap:.3g}: "
                         f"{low.best_config} -> {high.best_config}")
    return lines


def ladder_markdown(report: LadderReport) -> str:
    lines = [
        f"# Budget ladder ({report.metric}, {report.mode}; scheduler {report.scheduler})",
        "",
        f"One sweep spent {report.flops_spent:.4g} FLOPs; smaller caps replay its chunks in spend order.",
        "",
        f"| cap (FLOPs) | best {report.metric} | best configuration | FLOPs used | trials | answer |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.rungs:
        metric = "-" if r.best_metric is None else f"{r.best_metric:.4f}"
        lines.append(f"| {r.cap:.3g} | {metric} | {r.best_config} | {r.flops_used:.3g} | {r.trials_seen} | "
                     f"{r.status}: {r.note} |")
    lines.append("")
    if report.winner_changes:
        lines += [f"- {line}" for line in report.winner_changes]
    else:
        lines.append("- the winning configuration is the same at every cap")
    return "\n".join(lines) + "\n"


def write_ladder_report(report: LadderReport, out_dir: str | Path, chunks: list[ChunkRecord] | None = None) -> dict:
    """ladder.json, ladder.md and ladder.png (the frontier: best metric vs cap) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ladder.json", "markdown": out / "ladder.md", "png": out / "ladder.png"}
    paths["json"].write_text(report.model_dump_json(indent=2) + "\n")
    paths["markdown"].write_text(ladder_markdown(report))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if chunks:  # best-so-far (last metric per trial) along the sweep's FLOP clock
        last: dict[str, float] = {}
        xs, ys = [], []
        for ch in sorted(chunks, key=lambda c: c.sweep_flops):
            if ch.metric is not None and math.isfinite(ch.metric):
                last[ch.trial_id] = ch.metric
            if last:
                xs.append(ch.sweep_flops)
                ys.append(min(last.values()) if report.mode == "min" else max(last.values()))
        ax.step(xs, ys, where="post", color="0.6", label="best so far along the sweep")
    pts = [r for r in report.rungs if r.best_metric is not None]
    for status, marker in (("exact", "o"), ("estimate", "x")):
        sel = [r for r in pts if r.status == status]
        if sel:
            ax.plot([r.cap for r in sel], [r.best_metric for r in sel], marker, markersize=8, label=f"cap ({status})")
    for r in pts:
        ax.annotate(json.dumps(r.best_config, default=str)[:40], (r.cap, r.best_metric), fontsize=6,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("FLOP cap")
    ax.set_ylabel(f"best {report.metric}")
    ax.set_title("budget ladder: best configuration per cap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return {k: str(v) for k, v in paths.items()}
