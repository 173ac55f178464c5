"""FIFO, random search, Tune's plateau stopper, ASHA (FLOPs as time) and the marginal-gain policy, side by side.

    python bench/tune_compare.py --quick     # replays only, few seeds (a minute)
    python bench/tune_compare.py             # replays: synthetic 8 seeds, recorded 32 seeds (minutes)
    python bench/tune_compare.py --record    # first run a real sweep on the default model that
                                             # records learning curves (bench/results/recorded_curves.json)
    python bench/tune_compare.py --real      # also: real fifo / asha / marginal sweeps under one cap
    python bench/tune_compare.py --real quick  # ... with 3 configs x 3 reports each

Three suites, all methods on the same search space, seeds and observation noise:
- synthetic: seeded power-law curves (frugalray.tune.replay.synthetic_space);
- recorded: eval-loss curves recorded from the project's own LoRA fine-tunes of the default
  model (`--record` makes them once); each seed reorders the configs and redraws eval noise
  of the measured size, so many repetitions are cheap and deterministic;
- real: one real sweep per scheduler (fifo, asha, marginal) on the default model under the
  same FLOP cap (slow on 2 cores; one run each, so no spread).

Replays run 4 trials at a time, every chunk reserved from one capped pot. Reported, mean and
spread over seeds: flops_to_1pct (cumulative FLOPs until the trial a method reports as best
is truly within 1% of the best final metric of the space; cap = every trial's full schedule,
in units R of one full trial) and best_at_cap (true loss of the reported best when the sweep
ends under smaller caps). Targets: marginal <= 0.5x ASHA's and <= 0.2x FIFO's FLOPs to 1%;
best-at-cap no worse than ASHA's at every cap.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from frugalray.benchmarking import print_table, write_result
from frugalray.tune.replay import (
    METHODS,
    grace_flops,
    oracle_flops_to_reach,
    recorded_space,
    replay,
    synthetic_space,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RECORDED = RESULTS / "recorded_curves.json"
ALL_METHODS = ["fifo", "random", "plateau", "asha", "marginal", "marginal_nopause"]


def summarize(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "std": float(np.std(finite)) if finite else None,
        "reached": f"{len(finite)}/{len(values)}",
        "values": [v if math.isfinite(v) else None for v in values],
    }


def replay_suite(suite: str, spaces: list, seeds: list[int], methods: list[str], cap_multiples: list[float]):
    """Every method on every (space, seed): FLOPs to within 1% of the best final, best at each cap."""
    flops_to = {m: [] for m in methods}  # in units of one full trial (R)
    oracle, screen_oracle = [], []
    at_cap = {m: {c: [] for c in cap_multiples} for m in methods}
    traces = {}
    n_configs = len(spaces[0].curves)
    for space, seed in zip(spaces, seeds):
        R = space.max_trial_flops
        best = space.best_final()
        # Lower bounds: an oracle training only the right config, and one that must first try every
        # config for the grace period (what any method that cannot see the future pays at least).
        oracle.append(oracle_flops_to_reach(space, best * 1.01) / R)
        screen_oracle.append(oracle[-1] + len(space.curves) * grace_flops(space) / R)
        for name in methods:
            full = replay(space, METHODS[name](space, seed), cap=n_configs * R, seed=seed, stop_at_loss=best * 1.01)
            flops_to[name].append(full.flops_to_reach(best * 1.01) / R)
            if seed == seeds[0]:
                traces[name] = [(c / R, v) for c, v in full.trace]
            for c in cap_multiples:
                capped = replay(space, METHODS[name](space, seed), cap=c * R, seed=seed)
                assert capped.spent <= c * R * (1 + 1e-12)
                at_cap[name][c].append(capped.final_true)

    metrics: dict = {f"{suite}_oracle_flops_to_1pct_R": summarize(oracle),
                     f"{suite}_screen_then_commit_oracle_flops_to_1pct_R": summarize(screen_oracle)}
    for name in methods:
        metrics[f"{suite}_{name}_flops_to_1pct_R"] = summarize(flops_to[name])
        for c in cap_multiples:
            metrics[f"{suite}_{name}_best_at_cap_{c:g}R"] = summarize(at_cap[name][c])

    def mean_of(name):
        vals = [v for v in flops_to[name] if math.isfinite(v)]
        # A run that never got within 1% counts as the whole cap (every trial's full schedule):
        # a lower bound of what it would have needed.
        vals += [n_configs] * (len(flops_to[name]) - len(vals))
        return float(np.mean(vals))

    targets = {}
    if "marginal" in methods:
        for base, limit in (("asha", 0.5), ("fifo", 0.2)):
            if base in methods:
                key = f"{suite}_marginal_vs_{base}_flops_to_1pct"
                metrics[key] = mean_of("marginal") / mean_of(base)
                targets[key] = f"<= {limit}"
        if "asha" in methods:
            for c in cap_multiples:
                key = f"{suite}_marginal_minus_asha_best_at_cap_{c:g}R"
                metrics[key] = float(np.mean(at_cap["marginal"][c]) - np.mean(at_cap["asha"][c]))
                targets[key] = "<= 0"  # min mode: marginal at least as good as ASHA
    return metrics, targets, traces


# -- recording real curves and real sweeps ----------------------------------------------------


def _fair_workers() -> None:
    """Ray starts its workers at niceness 15; on a shared, overloaded box that starves the trials of the
    bench's own local cluster behind every un-niced process. Workers at 0 compete like the driver does."""
    import os

    os.environ.setdefault("RAY_worker_niceness", "0")


def _tiny_data(path: Path, n_rows: int) -> str:
    from frugalray.examples.generate import GenerateConfig, generate_tasks, write_rows

    rows = generate_tasks(GenerateConfig(n_rows=n_rows, seed=0, output_path=str(path)))
    return str(write_rows(rows, path))


def _sweep_config(data_path: str, search_space: dict, reports: int, cap: float, scheduler: str = "fifo",
                  flop_caps: list[float] | None = None, batch_size: int = 4, eval_rows: int = 8,
                  steps_per_report: int = 1):
    from frugalray.config import parse_config
    from frugalray.tune.sweep import SweepConfig

    return parse_config(SweepConfig, {
        "flop_caps": flop_caps,
        "finetune": {"model": "smollm2-135m-instruct", "data_path": data_path, "method": "lora",
                     "lora_rank": 8, "batch_size": batch_size, "seq_len": 64, "eval_rows": eval_rows,
                     "seed": 0, "cpu_threads": 2},
        "search_space": search_space,
        "steps_per_report": steps_per_report,
        "max_steps_per_trial": reports * steps_per_report,
        "flop_cap": cap,
        "scheduler": scheduler,
        "metric": "eval_loss",
        "mode": "min",
    })


# 10 configs whose curves cross (low rates start slow, high rates start fast and level off higher),
# 16 reports of 2 steps each, eval loss on 16 held-out rows: enough reports for a curve fit to
# see a trend through the eval noise (the first recording, 4 configs x 8 one-step reports on
# 4 eval rows, was mostly noise).
RECORD_SPACE = {"learning_rate": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], "lora_rank": [4, 16]}
RECORD = {"rows": 256, "reports": 16, "steps_per_report": 2, "batch_size": 4, "eval_rows": 16}


def record_curves(out: Path, quick: bool) -> dict:
    """A real FIFO sweep (no cap pressure) on the default model; every trial's eval-loss curve is saved."""
    from frugalray.tune.sweep import run_sweep

    _fair_workers()
    work = Path("runs/bench_tune_record").resolve()
    setup = {**RECORD, "rows": 64, "reports": 4} if quick else RECORD
    data = _tiny_data(work / "tasks.jsonl", setup["rows"])
    space = {"learning_rate": [1e-4, 3e-3]} if quick else RECORD_SPACE
    reports = setup["reports"]
    cfg = _sweep_config(data, space, reports, cap=1e18, batch_size=setup["batch_size"], eval_rows=setup["eval_rows"],
                        steps_per_report=setup["steps_per_report"])
    started = time.time()
    result = run_sweep(cfg, work / "sweep")
    curves = [{"config": h["config"], "flops": h["flops"], "losses": h["metric"], "train_losses": h["train_loss"],
               "tokens": h["tokens"]} for h in result.histories if all(m is not None for m in h["metric"])]
    recording = {
        "source": "frugalray.tune.sweep.run_sweep (fifo) on the default model smollm2-135m-instruct, LoRA, "
                  f"generated arithmetic tasks ({setup['rows']} rows, {setup['eval_rows']} held out), batch "
                  f"{setup['batch_size']}; one report = {setup['steps_per_report']} steps + eval",
        "finetune": cfg.finetune.model_dump(mode="json"),
        "search_space": space,
        "reports_per_trial": reports,
        "wall_s": round(time.time() - started, 1),
        "curves": curves,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recording, indent=1) + "\n")
    return recording


def curves_from_tune_results(experiment_dir: Path, reports: int, out: Path, note: str) -> dict:
    """Recorded curves straight from a recording sweep's Tune result files (trials that finished their schedule).

    For a recording sweep that had to be stopped before every config ran (time on a shared box):
    each trial's result.json holds every report it made, so finished trials are kept whole.
    """
    curves = []
    for result_file in sorted(experiment_dir.glob("*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if len(rows) < reports or any(not math.isfinite(r.get("eval_loss", math.nan)) for r in rows[:reports]):
            continue
        rows = rows[:reports]
        curves.append({"config": rows[0]["config"], "flops": [r["flops"] for r in rows],
                       "losses": [r["eval_loss"] for r in rows], "train_losses": [r["train_loss"] for r in rows],
                       "tokens": [r["tokens"] for r in rows]})
    recording = {"source": f"Tune results under {experiment_dir}: {note}", "reports_per_trial": reports,
                 "curves": curves}
    out.write_text(json.dumps(recording, indent=1) + "\n")
    return recording


def real_sweeps(quick: bool) -> tuple[dict, dict]:
    """fifo / asha / marginal, one real sweep each, same space and cap: FLOPs to within 1% and best at the cap."""
    from frugalray.tune.sweep import run_sweep

    _fair_workers()
    work = Path("runs/bench_tune_real").resolve()
    data = _tiny_data(work / "tasks.jsonl", 96)
    space = {"learning_rate": [1e-5, 3e-4, 3e-3]} if quick else {"learning_rate": [1e-5, 1e-4, 1e-3, 3e-3]}
    reports = 3 if quick else 6
    probe = _sweep_config(data, space, reports, cap=1e18)
    from frugalray.tune.sweep import preflight_sweep, trial_cost_bounds

    d, shape, _ = preflight_sweep(probe)
    step, ev = trial_cost_bounds(probe.finetune, shape, len(d.eval_rows))
    full_trial_bound = reports * (step + ev)
    cap = 0.5 * len(space["learning_rate"]) * full_trial_bound  # half of what FIFO would hold for every trial
    runs = {}
    for scheduler in ("fifo", "asha", "marginal"):
        # FIFO's run also answers a budget ladder (exact for fifo: its decisions ignore the cap).
        caps = [cap / 4, cap / 2, cap] if scheduler == "fifo" else None
        cfg = _sweep_config(data, space, reports, cap, scheduler, flop_caps=caps)
        runs[scheduler] = run_sweep(cfg, work / scheduler)
    best_final = min(r.best_metric for r in runs.values() if r.best_metric is not None)
    metrics = {"real_cap_flops": cap, "real_best_final_any_method": best_final}
    for name, r in runs.items():
        last: dict[str, float] = {}
        reached = math.inf
        events = sorted(((sf, h["trial_id"], m) for h in r.histories for sf, m in zip(h["sweep_flops"], h["metric"])),
                        key=lambda e: e[0])
        for sf, tid, m in events:
            if m is not None:
                last[tid] = m
            if last and min(last.values()) <= best_final * 1.01:
                reached = sf
                break
        metrics[f"real_{name}_best_at_cap"] = r.best_metric
        metrics[f"real_{name}_flops_spent"] = r.flops_spent
        metrics[f"real_{name}_flops_to_1pct"] = reached if math.isfinite(reached) else None
        metrics[f"real_{name}_trials"] = len(r.trials)
        metrics[f"real_{name}_wall_s"] = round(r.wall_s, 1)
    ladder = runs["fifo"].ladder
    if ladder is not None:
        for i, rung in enumerate(ladder.rungs):
            metrics[f"real_fifo_ladder_{i}"] = {"cap": rung.cap, "best_metric": rung.best_metric,
                                                "best_config": rung.best_config, "status": rung.status}
        metrics["real_fifo_ladder_winner_changes"] = ladder.winner_changes
        metrics["real_fifo_scaling"] = runs["fifo"].scaling
    config = {"space": space, "reports_per_trial": reports, "cap_flops": cap,
              "ladder_reports": {k: v for k, v in runs["fifo"].reports.items() if k.startswith("ladder")},
              "note": "one run per scheduler (no spread); metric is eval loss on 8 held-out rows"}
    return metrics, config


# -- the benchmark ---------------------------------------------------------------------------


def run(quick: bool, out: Path, plot: bool = True, methods: list[str] | None = None,
        recorded: Path | None = RECORDED, real: str | None = None) -> dict:
    methods = methods or ALL_METHODS
    started = time.time()
    metrics, targets, traces = {}, {}, {}
    config: dict = {"mode": "quick" if quick else "full", "methods": methods, "workers": 4,
                    "unit_R": "FLOPs of one trial's full schedule",
                    "grace_flops": "max(R/16, 2 reports) for asha and marginal",
                    "asha_reduction_factor": 3, "plateau": "TrialPlateauStopper defaults: std 0.01, 4 results, grace 4",
                    "random": "as many draws (with replacement) as the space has configs"}

    n_syn, syn_seeds, syn_caps = (9, [0, 1], [2.0]) if quick else (27, list(range(8)), [2.0, 4.0, 8.0])
    spaces = [synthetic_space(n_syn, seed) for seed in syn_seeds]
    m, t, traces["synthetic"] = replay_suite("synthetic", spaces, syn_seeds, methods, syn_caps)
    metrics.update(m)
    targets.update(t)
    config["synthetic"] = {"curves": "seeded power laws L(c)=floor+scale*(1+c/c0)^-b over learning_rate x lora_rank, "
                                     "eval noise sd 0.01 + 3% spikes of +0.1; 64 reports per trial",
                           "n_configs": n_syn, "seeds": syn_seeds, "caps_R": syn_caps}

    config["recorded_real_curves"] = bool(recorded and recorded.exists())
    if config["recorded_real_curves"]:
        recording = json.loads(recorded.read_text())
        rec_seeds = list(range(4 if quick else 32))
        spaces = [recorded_space(recording, seed) for seed in rec_seeds]
        n_rec = len(spaces[0].curves)
        rec_caps = [c for c in (1.5, 3.0, 6.0) if c < n_rec]
        m, t, traces["recorded"] = replay_suite("recorded", spaces, rec_seeds, methods, rec_caps)
        metrics.update(m)
        targets.update(t)
        config["recorded"] = {"file": str(recorded.relative_to(HERE.parent)) if recorded.is_relative_to(HERE.parent)
                              else str(recorded), "n_configs": n_rec, "seeds": len(rec_seeds), "caps_R": rec_caps,
                              "reports_per_trial": round(spaces[0].max_trial_flops / spaces[0].chunk_flops),
                              "added_eval_noise_sd": spaces[0].noise, "source": recording.get("source")}
    config["real_sweep_on_default_model"] = real or False
    if real:
        m, config["real"] = real_sweeps(real == "quick")
        metrics.update(m)
        for base in ("asha", "fifo"):
            mine, theirs = metrics.get("real_marginal_flops_to_1pct"), metrics.get(f"real_{base}_flops_to_1pct")
            metrics[f"real_marginal_vs_{base}_flops_to_1pct"] = mine / theirs if mine and theirs else None
    config["wall_s"] = round(time.time() - started, 1)
    result = write_result("tune_compare", config, metrics, targets, out_dir=out)
    if plot:
        plot_traces(traces, out / "tune_compare.png")
    return result


def plot_traces(traces: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(6.5 * len(traces), 4), squeeze=False)
    for ax, (suite, by_method) in zip(axes[0], traces.items()):
        for name, trace in by_method.items():
            if trace:
                xs, ys = zip(*trace)
                ax.step(xs, ys, where="post", label=name)
        ax.set_xlabel("cumulative FLOPs (units of one full trial)")
        ax.set_ylabel("true loss of the reported best trial")
        ax.set_title(f"{suite} curves, first seed, until within 1% of the best")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_rows(result: dict) -> tuple[list[dict], list[str]]:
    m, cfg = result["metrics"], result["config"]

    def cell(key):
        s = m.get(key)
        if s is None:
            return None
        if s["mean"] is None:
            return f"never ({s['reached']})"
        return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['reached']})"

    rows, columns = [], ["suite", "method", "FLOPs to 1% [R]"]
    for suite in ("synthetic", "recorded"):
        if suite not in cfg:
            continue
        caps = cfg[suite]["caps_R"]
        for c in caps:
            if f"best at {c:g}R" not in columns:
                columns.append(f"best at {c:g}R")
        for name in cfg["methods"]:
            row = {"suite": suite, "method": name, "FLOPs to 1% [R]": cell(f"{suite}_{name}_flops_to_1pct_R")}
            row.update({f"best at {c:g}R": cell(f"{suite}_{name}_best_at_cap_{c:g}R") for c in caps})
            rows.append(row)
    return rows, columns


def print_report(result: dict) -> None:
    rows, columns = table_rows(result)
    m = result["metrics"]
    if result["config"].get("real_sweep_on_default_model"):
        print("real sweeps on the default model (one run each):")
        for name in ("fifo", "asha", "marginal"):
            print(f"  {name}: best eval_loss at cap {m[f'real_{name}_best_at_cap']}, FLOPs to within 1% "
                  f"{m[f'real_{name}_flops_to_1pct']}, spent {m[f'real_{name}_flops_spent']:.3g} "
                  f"of {m['real_cap_flops']:.3g}")
    for key, target in result["targets"].items():
        print(f"{key}: {m[key]:.3f} (target {target}) {'MET' if result['met'][key] else 'NOT MET'}")
    print_table(rows, columns)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--record", action="store_true", help="run a real sweep to (re)record the learning curves first")
    ap.add_argument("--real", nargs="?", const="full", choices=["quick", "full"], default=None,
                    help="also run real fifo / asha / marginal sweeps (quick: 3 configs x 3 reports)")
    args = ap.parse_args(argv)
    if args.record:
        record_curves(Path(args.out) / "recorded_curves.json", args.quick)
    result = run(args.quick, Path(args.out), plot=not args.no_plot, recorded=Path(args.out) / "recorded_curves.json",
                 real=args.real)
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
