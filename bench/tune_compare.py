"""FIFO vs ASHA (FLOPs as time) vs the marginal-gain policy, replayed on learning curves.

    python bench/tune_compare.py            # full: 27 configs, 8 seeds (a few minutes on 2 cores)
    python bench/tune_compare.py --quick    # 9 configs, 2 seeds (seconds)

Every method runs on the same search space, the same seeds and the same observation
noise, 4 trials at a time, every chunk of FLOPs reserved from one capped pot. Reported:
- flops_to_1pct: cumulative FLOPs until the trial a method reports as best (best last
  observed metric) truly is within 1% of the best final metric of the search space
  (cap = every trial's full schedule, so FIFO can always get there);
- best_at_cap: the true loss of the reported best when the sweep ends under smaller caps.
Mean and spread over seeds. What is replayed is SYNTHETIC (seeded power laws, see
frugalray/tune/replay.py); no recorded fine-tune curves and no real sweep are in this run,
and the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as std_platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from frugalray.tune.replay import METHODS, replay, synthetic_space

HERE = Path(__file__).resolve().parent


def summarize(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": float(np.mean(finite)) if finite else None,
        "std": float(np.std(finite)) if finite else None,
        "reached": f"{len(finite)}/{len(values)}",
        "values": [v if math.isfinite(v) else None for v in values],
    }


def run(quick: bool, out: Path, plot: bool = True, methods: list[str] | None = None) -> dict:
    n_configs, seeds, cap_multiples = (9, [0, 1], [2.0]) if quick else (27, list(range(8)), [2.0, 4.0, 8.0])
    methods = methods or list(METHODS)
    started = time.time()
    flops_to = {m: [] for m in methods}  # in units of one full trial (R)
    at_cap = {m: {c: [] for c in cap_multiples} for m in methods}
    gap_at_cap = {m: {c: [] for c in cap_multiples} for m in methods}  # relative to the best final
    traces = {}
    for seed in seeds:
        space = synthetic_space(n_configs, seed)
        R = space.max_trial_flops
        best = space.best_final()
        for name in methods:
            full = replay(space, METHODS[name](space), cap=n_configs * R, seed=seed, stop_at_loss=best * 1.01)
            flops_to[name].append(full.flops_to_reach(best * 1.01) / R)
            if seed == seeds[0]:
                traces[name] = full.trace
            for c in cap_multiples:
                capped = replay(space, METHODS[name](space), cap=c * R, seed=seed)
                assert capped.spent <= c * R * (1 + 1e-12)
                at_cap[name][c].append(capped.final_true)
                gap_at_cap[name][c].append(capped.final_true / best - 1)

    metrics: dict = {}
    for name in methods:
        metrics[f"{name}_flops_to_1pct_R"] = summarize(flops_to[name])
        for c in cap_multiples:
            metrics[f"{name}_best_at_cap_{c:g}R"] = summarize(at_cap[name][c])
            metrics[f"{name}_gap_at_cap_{c:g}R"] = summarize(gap_at_cap[name][c])

    def mean_of(name):
        vals = [v for v in flops_to[name] if math.isfinite(v)]
        # A run that never reached 1% counts as the whole cap (every trial's full schedule):
        # a lower bound of what it would have needed.
        vals += [n_configs] * (len(flops_to[name]) - len(vals))
        return float(np.mean(vals))

    targets, met = {}, {}
    if "marginal" in methods:
        for base, limit in (("asha", 0.5), ("fifo", 0.2)):
            if base in methods:
                key = f"marginal_vs_{base}_flops_to_1pct"
                metrics[key] = mean_of("marginal") / mean_of(base)
                targets[key] = f"<= {limit}"
                met[key] = metrics[key] <= limit
        if "asha" in methods:
            for c in cap_multiples:
                key = f"marginal_minus_asha_best_at_cap_{c:g}R"
                metrics[key] = float(np.mean(at_cap["marginal"][c]) - np.mean(at_cap["asha"][c]))
                targets[key] = "<= 0 (min mode: marginal at least as good as ASHA)"
                met[key] = metrics[key] <= 0

    result = {
        "bench": "tune_compare",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "gpu": None, "python": std_platform.python_version()},
        "config": {
            "mode": "quick" if quick else "full",
            "curves": "synthetic: seeded power laws L(c)=floor+scale*(1+c/c0)^-b over learning_rate x lora_rank "
                      "(frugalray.tune.replay.synthetic_space), eval noise sd 0.01 + 3% spikes of +0.1",
            "recorded_real_curves": False,
            "real_sweep_on_default_model": False,
            "n_configs": n_configs,
            "seeds": seeds,
            "workers": 4,
            "unit_R": "FLOPs of one trial's full schedule (8e13); 64 reports per trial",
            "grace_flops": "R/16 for asha and marginal",
            "asha_reduction_factor": 3,
            "caps_R": cap_multiples,
            "methods": methods,
            "not_included": ["Tune plateau stopper", "random search", "recorded curves", "real sweep"],
            "wall_s": round(time.time() - started, 1),
        },
        "metrics": metrics,
        "targets": targets,
        "met": met,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_compare.json").write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        plot_traces(traces, out / "tune_compare.png", n_configs)
    return result


def plot_traces(traces: dict, path: Path, n_configs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, trace in traces.items():
        if trace:
            xs, ys = zip(*trace)
            ax.step(np.array(xs) / 8e13, ys, where="post", label=name)
    ax.set_xlabel("cumulative FLOPs (units of one full trial)")
    ax.set_ylabel("true loss of the reported best trial")
    ax.set_title(f"seed 0, {n_configs} synthetic configs, until within 1% of the best")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    m = result["metrics"]
    methods = result["config"]["methods"]
    caps = result["config"]["caps_R"]

    def cell(key):
        s = m[key]
        if s["mean"] is None:
            return f"never ({s['reached']})"
        return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['reached']})"

    header = ["method", "FLOPs to 1% [R]"] + [f"best at {c:g}R" for c in caps]
    rows = [[name, cell(f"{name}_flops_to_1pct_R")] + [cell(f"{name}_best_at_cap_{c:g}R") for c in caps]
            for name in methods]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    for key, target in result["targets"].items():
        print(f"{key}: {m[key]:.3f} (target {target}) {'MET' if result['met'][key] else 'NOT MET'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.quick, Path(args.out), plot=not args.no_plot)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
