"""`frugalray report RUN_DIR`: one Markdown report, with PNG plots, of what a run spent and got.

Everything comes from files the stages already write: `ledger.jsonl` (FLOPs, tokens and seconds
per stage), the score stage's quarantine file, the select stage's record, Ray Tune's per-trial
`progress.csv` under the run directory, and `summary.json` when the main job wrote one.
`collect_report_data` is pure file parsing (unit-tested); `write_report` adds the plots.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugalray.budget.ledger import LEDGER_FILE, ComputeLedger

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"


@dataclass
class TrialCurve:
    name: str
    config: dict[str, Any]
    flops: list[float]
    metric: list[float]
    started: float = 0.0


@dataclass
class ReportData:
    run_dir: Path
    stages: dict[str, dict[str, float]]
    total_flops: float
    total_tokens: int
    entries: int
    data_outcome: dict[str, int] = field(default_factory=dict)  # "kept", "dropped: budget", "quarantined: empty response", ...
    rows_in: int | None = None
    trials: list[TrialCurve] = field(default_factory=list)
    trial_metric: str | None = None
    finetune_curve: dict[str, list[float]] | None = None
    serving_points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stage_flops_sum(self) -> float:
        return sum(s["flops"] for s in self.stages.values())

    @property
    def totals_add_up(self) -> bool:
        return math.isclose(self.stage_flops_sum, self.total_flops, rel_tol=1e-9, abs_tol=1.0)

    @property
    def data_adds_up(self) -> bool | None:
        if self.rows_in is None or not self.data_outcome:
            return None
        return sum(self.data_outcome.values()) == self.rows_in


def _last_record(entries: list[dict], stage: str) -> dict | None:
    matching = [e for e in entries if e["stage"] == stage]
    return matching[-1] if matching else None


def _reason_label(reason: str) -> str:
    # Quarantine reasons read "empty response: the response is empty..."; the part before ':' is the kind.
    return reason.split(":", 1)[0].strip() or "unspecified"


def _data_outcome(run_dir: Path, entries: list[dict]) -> tuple[dict[str, int], int | None]:
    outcome: Counter = Counter()
    rows_in = None
    score = _last_record(entries, "score")
    if score is not None:
        rows_in = score.get("rows_in")
        quarantine_path = score.get("produced", {}).get("quarantine_path")
        reasons: Counter = Counter()
        if quarantine_path:
            path = Path(quarantine_path)
            if not path.is_absolute() and not path.exists():
                path = run_dir / path.name
            if path.exists():
                with open(path) as fh:
                    for line in fh:
                        if line.strip():
                            reasons[_reason_label(json.loads(line).get("quarantine_reason", ""))] += 1
        expected = int(score.get("rows_quarantined", sum(reasons.values())))
        if sum(reasons.values()) != expected:  # file missing or partial: keep the ledger's count, say so
            reasons = Counter({"reason file unavailable": expected})
        for reason, n in reasons.items():
            outcome[f"quarantined: {reason}"] += n
    select = _last_record(entries, "select")
    if select is not None:
        outcome["kept"] += int(select.get("kept", 0))
        drop_reasons = select.get("drop_reasons") or {}
        accounted = 0
        for reason, n in drop_reasons.items():
            outcome[f"dropped: {reason}"] += int(n)
            accounted += int(n)
        if int(select.get("dropped", 0)) > accounted:
            outcome["dropped: unspecified"] += int(select["dropped"]) - accounted
        if rows_in is None:
            rows_in = int(select.get("rows_in", 0)) + int(select.get("quarantined", 0))
    return dict(outcome), rows_in


def _float(value: str | None) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _trial_curves(run_dir: Path) -> tuple[list[TrialCurve], str | None]:
    curves: list[TrialCurve] = []
    metric_name = None
    for progress in sorted(run_dir.rglob("progress.csv")):
        with open(progress) as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "flops" not in rows[0]:
            continue
        name = next((m for m in ("eval_loss", "loss", "train_loss") if m in rows[0]), None)
        if name is None:
            continue
        metric_name = metric_name or name
        points = [(_float(r["flops"]), _float(r.get(name))) for r in rows]
        points = [(f, m) for f, m in points if f is not None and m is not None]
        if not points:
            continue
        params = progress.parent / "params.json"
        config = json.loads(params.read_text()) if params.exists() else {}
        started = _float(rows[0].get("timestamp")) or 0.0
        curves.append(TrialCurve(progress.parent.name, config, [p[0] for p in points], [p[1] for p in points],
                                 started))
    curves.sort(key=lambda c: c.started)
    return curves, metric_name


def _serving_points(entries: list[dict]) -> list[dict[str, Any]]:
    serve = _last_record(entries, "serve")
    if serve is None:
        return []
    produced = serve.get("produced", {})
    points = []
    for label in ("base", "finetuned", "budgeted"):
        accuracy = produced.get(f"accuracy_{label}")
        flops = produced.get(f"flops_per_query_{label}")
        if accuracy is not None and flops is not None:
            points.append({"label": label, "accuracy": float(accuracy), "flops_per_query": float(flops)})
    return points


def collect_report_data(run_dir: str | Path) -> ReportData:
    run_dir = Path(run_dir)
    if not (run_dir / LEDGER_FILE).exists():
        raise FileNotFoundError(f"RUN_DIR: no {LEDGER_FILE} in {run_dir}; point at a directory a frugalray stage wrote")
    ledger = ComputeLedger(run_dir)
    entries = ledger.entries()
    data_outcome, rows_in = _data_outcome(run_dir, entries)
    trials, metric = _trial_curves(run_dir)
    finetune_curve = None
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        finetune_curve = json.loads(summary_path.read_text()).get("finetune_curve")
    return ReportData(
        run_dir=run_dir,
        stages=ledger.totals_by_stage(),
        total_flops=sum(e["flops"] for e in entries),
        total_tokens=sum(int(e["tokens"]) for e in entries),
        entries=len(entries),
        data_outcome=data_outcome,
        rows_in=rows_in,
        trials=trials,
        trial_metric=metric,
        finetune_curve=finetune_curve,
        serving_points=_serving_points(entries),
    )


def sweep_frontier(trials: list[TrialCurve]) -> tuple[list[float], list[float]]:
    """The sweep's result so far (lower is better) vs FLOPs spent by the whole sweep, trials in start order.

    A trial's result is its *last* reported metric, everywhere (the sweep's best_config, the
    pipeline summary, this report): a trial that got worse after a good report ends worse. So the
    frontier at each point is the best of every trial's latest metric, and its end is the sweep's
    best trial. Trials overlap in time; ordering each trial's reports after the earlier trials is
    the serial-equivalent spend, which is what a FLOP budget counts.
    """
    spent = 0.0
    latest: dict[int, float] = {}
    xs, ys = [], []
    for index, trial in enumerate(trials):
        previous = 0.0
        for flops, metric in zip(trial.flops, trial.metric, strict=True):
            spent += max(flops - previous, 0.0)
            previous = flops
            latest[index] = metric
            xs.append(spent)
            ys.append(min(latest.values()))
    return xs, ys


def _plots(data: ReportData, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}

    def save(fig, name: str, key: str):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made[key] = name

    if data.stages:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(data.stages)
        ax.bar(names, [data.stages[n]["flops"] for n in names], color="tab:blue")
        ax.set_ylabel("FLOPs")
        ax.set_yscale("log")
        ax.set_title("FLOPs by stage")
        save(fig, "report_flops_by_stage.png", "flops")
    if data.data_outcome:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = sorted(data.data_outcome, key=lambda k: (not k.startswith("kept"), k))
        colors = ["tab:green" if k == "kept" else "tab:orange" if k.startswith("dropped") else "tab:red"
                  for k in labels]
        ax.barh(labels, [data.data_outcome[k] for k in labels], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("rows")
        ax.set_title("Data kept vs dropped, by reason")
        save(fig, "report_data.png", "data")
    if data.trials or data.finetune_curve:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if data.finetune_curve:
            ax.plot(data.finetune_curve["flops"], data.finetune_curve["loss"], color="black", lw=2,
                    label="finetune (train loss)")
        for trial in data.trials:
            ax.plot(trial.flops, trial.metric, marker=".", alpha=0.8, label=_short_config(trial.config))
        ax.set_xlabel("FLOPs")
        ax.set_ylabel("loss")
        ax.set_title(f"Loss vs FLOPs (sweep trials: {data.trial_metric})")
        ax.legend(fontsize=7)
        save(fig, "report_loss_vs_flops.png", "loss")
    if data.trials:
        xs, ys = sweep_frontier(data.trials)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.step(xs, ys, where="post")
        ax.set_xlabel("sweep FLOPs spent")
        ax.set_ylabel(f"best trial's latest {data.trial_metric}")
        ax.set_title("Sweep frontier")
        save(fig, "report_sweep_frontier.png", "frontier")
    if data.serving_points:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for p in data.serving_points:
            ax.scatter(p["flops_per_query"], p["accuracy"], s=40)
            ax.annotate(p["label"], (p["flops_per_query"], p["accuracy"]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs per query")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("Serving: accuracy vs compute")
        save(fig, "report_serving.png", "serving")
    return made


def _short_config(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items()) or "trial"


def render_markdown(data: ReportData, plots: dict[str, str]) -> str:
    lines = [f"# frugalray run report: `{data.run_dir}`", ""]
    lines += ["## Compute by stage", "", "| stage | FLOPs | share | tokens | wall s | records |",
              "|---|---:|---:|---:|---:|---:|"]
    for stage, t in data.stages.items():
        share = t["flops"] / data.total_flops if data.total_flops else 0.0
        lines.append(f"| {stage} | {t['flops']:.3e} | {share:.1%} | {int(t['tokens'])} | {t['wall_s']:.1f} | "
                     f"{int(t['records'])} |")
    lines.append(f"| **total** | **{data.total_flops:.3e}** | 100% | {data.total_tokens} | "
                 f"{sum(t['wall_s'] for t in data.stages.values()):.1f} | {data.entries} |")
    check = "OK" if data.totals_add_up else f"MISMATCH (stages sum to {data.stage_flops_sum:.6e})"
    lines += ["", f"Stage totals vs ledger total: {check}.", ""]
    if "flops" in plots:
        lines += [f"![FLOPs by stage]({plots['flops']})", ""]
    if data.data_outcome:
        lines += ["## Data", "", "| outcome | rows |", "|---|---:|"]
        for key, n in sorted(data.data_outcome.items(), key=lambda kv: (not kv[0].startswith("kept"), kv[0])):
            lines.append(f"| {key} | {n} |")
        adds = data.data_adds_up
        verdict = "adds up" if adds else "DOES NOT add up" if adds is False else "not checkable"
        lines += ["", f"rows in: {data.rows_in}; kept + dropped + quarantined = "
                      f"{sum(data.data_outcome.values())} ({verdict}).", ""]
        if "data" in plots:
            lines += [f"![data]({plots['data']})", ""]
    if "loss" in plots:
        lines += ["## Training", "", f"![loss vs FLOPs]({plots['loss']})", ""]
    if data.trials:
        xs, ys = sweep_frontier(data.trials)
        lines += ["## Sweep", "", f"{len(data.trials)} trials; serial-equivalent FLOPs {xs[-1]:.3e}; "
                  f"best trial's final {data.trial_metric} {ys[-1]:.4f} (a trial's result is its last report).", ""]
        lines += ["| trial config | last FLOPs | final metric | best report |", "|---|---:|---:|---:|"]
        for trial in data.trials:
            lines.append(f"| {_short_config(trial.config)} | {trial.flops[-1]:.3e} | {trial.metric[-1]:.4f} | "
                         f"{min(trial.metric):.4f} |")
        lines.append("")
        if "frontier" in plots:
            lines += [f"![sweep frontier]({plots['frontier']})", ""]
    if data.serving_points:
        lines += ["## Serving", "", "| model | held-out accuracy | FLOPs per query |", "|---|---:|---:|"]
        for p in data.serving_points:
            lines.append(f"| {p['label']} | {p['accuracy']:.3f} | {p['flops_per_query']:.3e} |")
        lines.append("")
        if "serving" in plots:
            lines += [f"![serving]({plots['serving']})", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, plots: bool = True) -> Path:
    data = collect_report_data(run_dir)
    made = _plots(data, data.run_dir) if plots else {}
    path = data.run_dir / REPORT_FILE
    path.write_text(render_markdown(data, made))
    log.info("report written to %s (%d plots)", path, len(made))
    return path
