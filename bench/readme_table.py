"""The benchmark table in bench/README.md, regenerated from bench/results/*.json so that it cannot drift.

    python bench/readme_table.py           # rewrite the table between the README's marker comments
    python bench/readme_table.py --check   # exit 1 with a diff when the README disagrees with the JSONs

What a benchmark measures and what counts as its cost are written here, once per benchmark (REGISTRY);
everything else (targets, measured values, met, date, commit, full or quick) is read from its JSON.
A JSON in bench/results with no entry here, or an entry with no JSON, is an error naming it:
tests/unit/test_bench_readme.py runs this in memory and fails when the committed README is stale.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from frugalray.benchmarking import target_met

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


@dataclass(frozen=True)
class Bench:
    measures: str
    cost: str
    primary: tuple[str, ...]  # headline metric(s), listed first; each must be in the JSON's metrics
    only_mode: str | None = None  # the script has a single mode (no --quick): every run is this one


REGISTRY: dict[str, Bench] = {
    "data_downstream": Bench(
        "Value of selection downstream: LoRA fine-tunes of the default model on all 400 noisy rows, a random "
        "half and frugalray's half (`strategy: auto`); held-out exact-match accuracy, mean of 3 seeds.",
        "Training FLOPs of each arm (`budget.flops`); the auto arm's selection FLOPs are reported apart.",
        ("frugalray_minus_all", "flops_ratio_frugalray_vs_all")),
    "data_noise_recall": Bench(
        "Share of injected noise (5 kinds, 20% of 1000 generated rows) each selection method removes when "
        "keeping 70% of all rows; the label-free combination is primary, methods that read the reference "
        "answers are reported beside it, random over the rows it could choose from.",
        "Kept rows over all input rows, beside the kept rows' training FLOPs over those of every row the loader "
        "accepted (QLoRA, one epoch) and the method's selection FLOPs over that training.",
        ("recall_combination_label_free", "kept_rows_fraction_combination_label_free",
         "kept_train_flops_fraction_combination_label_free", "selection_over_train_flops_combination_label_free")),
    "data_real": Bench(
        "Every scorer over real Alpaca rows: cost per 1k rows, Spearman agreement between the scores, "
        "the rows each would remove first.",
        "Wall seconds per 1k rows (actor start and model load included) and the ledger's analytic FLOPs.",
        ("perplexity_wall_s_per_1k", "perplexity_flops_per_1k")),
    "data_throughput": Bench(
        "Perplexity-scoring throughput (real tokens/s) over Alpaca: frugalray's Ray Data job vs a naive "
        "padded loop vs vLLM, and vs the machine's measured matmul limit.",
        "Wall time end to end, model load included (what a user waits for).",
        ("speedup_vs_naive",)),
    "multinode_demo": Bench(
        "Head plus two worker nodes on loopback; score and finetune submitted as Ray Jobs; how many "
        "nodes each stage's actors ran on.",
        "Cluster start and wall seconds per stage (reported, no target).",
        ("score_nodes_used", "finetune_nodes_used"), only_mode="full"),
    "serve_adaptive": Bench(
        "Adaptive self-consistency through the served endpoint vs fixed SC@16, on the QLoRA arithmetic adapter "
        "`make demo` trains (base model beside), over 60 fresh questions of its task family it never saw: "
        "samples and FLOPs saved at equal accuracy.",
        "Samples per prompt and request FLOPs from each response's `usage.frugalray` (a later round's prefix-cache "
        "hits cost no prefill); SC@k as one n=16 request.",
        ("adapter_sample_ratio_sc16_over_adaptive", "adapter_flops_ratio_sc16_over_adaptive",
         "adapter_accuracy_gap_points")),
    "serve_overhead": Bench(
        "What the frugalray ingress adds per request on identical vLLM-CPU engines: its own time (handler wall "
        "time minus engine awaits, from response headers) and the extra Serve hop (proxy -> ingress -> engine "
        "vs proxy -> engine) over >= 200 paired, interleaved short requests with a 95% interval; end-to-end "
        "throughput vs Ray Serve LLM's OpenAI app beside.",
        "Added latency (ms): the median paired difference frugal - direct and the upper end of its 95% "
        "interval; the ingress's own ms (p50/p99); requests/s ratio at concurrency 4.",
        ("added_p50_ms_upper95", "ingress_own_p50_ms")),
    "train_memory": Bench(
        "The memory planner's predicted peak vs the measured peak of real training steps, over 11 "
        "configurations (full, LoRA, QLoRA, checkpointing, 8-bit optimizers).",
        "Peak memory itself: peak RSS of a fresh process over its post-import RSS, the CPU stand-in for "
        "`torch.cuda.max_memory_allocated`.",
        ("median_abs_error",)),
    "train_throughput": Bench(
        "Training tokens/s of frugalray on Ray Train with 2 FSDP workers vs a plain single-process PEFT "
        "loop, LoRA and QLoRA.",
        "Real tokens/s of timed steps (worker start and model load reported apart as `startup_s`).",
        ("lora_ray_fsdp_2w_vs_plain",)),
    "train_value": Bench(
        "Held-out accuracy of LoRA and QLoRA fine-tunes vs the untrained base, equal steps and data "
        "(3 paired seeds, 200 questions).",
        "Training FLOPs, equal for every arm by design (`budget.flops`); step time reported.",
        ("qlora_minus_lora_abs_points",)),
    "tune_compare": Bench(
        "Sweep schedulers (FIFO, random, plateau, ASHA, marginal gain) replayed on synthetic and recorded "
        "learning curves: FLOPs until the reported best is within 1%, best loss under FLOP caps.",
        "Cumulative training FLOPs, in units R of one full trial's schedule.",
        ("synthetic_marginal_vs_asha_flops_to_1pct", "recorded_marginal_vs_asha_flops_to_1pct")),
}

# JSON files in bench/results that are inputs, not results of a benchmark.
NOT_RESULTS = {
    "recorded_curves.json": "learning curves that tune_compare replays (written by its --record)",
}


def load_results(results_dir: Path = RESULTS) -> dict[str, dict]:
    """Every result JSON by benchmark name; every disagreement with REGISTRY collected and raised at once."""
    problems, results = [], {}
    for path in sorted(results_dir.glob("*.json")):
        if path.name in NOT_RESULTS:
            continue
        name = path.stem
        if name not in REGISTRY:
            problems.append(f"{path}: no REGISTRY entry for {name!r} in bench/readme_table.py (add what it "
                            "measures and what counts as cost, or move the file out of bench/results)")
            continue
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            problems.append(f"{path}: not JSON ({err})")
            continue
        problems += check_result(name, result, path)
        results[name] = result
    for name in REGISTRY:
        if not (results_dir / f"{name}.json").exists():
            problems.append(f"REGISTRY entry {name!r} in bench/readme_table.py has no {results_dir / name}.json "
                            "(run the benchmark, or remove the entry)")
    if problems:
        raise ValueError("bench table:\n  " + "\n  ".join(problems))
    return results


def check_result(name: str, result: dict, path: Path) -> list[str]:
    problems = []
    if result.get("bench") != name:
        problems.append(f"{path}: bench is {result.get('bench')!r}, expected {name!r} (the file's name)")
    metrics, targets, met = result.get("metrics", {}), result.get("targets", {}), result.get("met", {})
    for metric in REGISTRY[name].primary:
        if metric not in metrics:
            problems.append(f"{path}: REGISTRY[{name!r}].primary names {metric!r}, not among its metrics")
    for metric, target in targets.items():
        # `met` is computed by write_result; a flag that disagrees with the number was edited by hand.
        if met.get(metric) != target_met(metrics.get(metric), target):
            problems.append(f"{path}: met[{metric!r}] is {met.get(metric)!r} but {metrics.get(metric)!r} "
                            f"{target} is {target_met(metrics.get(metric), target)}")
    return problems


def run_kind(result: dict, bench: Bench) -> str:
    """full / quick, as the JSON's config says (config.quick, or config.mode)."""
    config = result.get("config", {})
    if config.get("quick") is not None:
        return "quick" if config["quick"] else "full"
    mode = config.get("mode")
    if mode in ("full", "quick"):
        return mode
    if mode == "replay":  # train_memory re-evaluating the planner on peaks measured by earlier runs
        modes = {source.get("mode") for source in config.get("replayed_from", [])}
        return "full (replayed)" if modes == {"full"} else f"replay of {', '.join(sorted(map(str, modes)))} runs"
    if bench.only_mode:
        return f"{bench.only_mode} (its only mode)"
    return "not recorded"


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "missing" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def targets_cell(name: str, result: dict) -> str:
    """One line per target, the primary metric(s) first: `metric <= 0.55`: 0.5252 ✓."""
    metrics, targets, met = result.get("metrics", {}), result.get("targets", {}), result.get("met", {})
    primary = REGISTRY[name].primary
    order = [m for m in primary if m in targets] + [m for m in targets if m not in primary]
    lines = []
    for metric in order:
        line = f"`{metric} {targets[metric]}`: {fmt(metrics.get(metric))} {'✓' if met.get(metric) else '✗'}"
        changes = [e for e in result.get("targets_history", []) if e.get("metric") == metric]
        if changes:
            line += f" (was `{changes[-1].get('old')}`; see targets_history)"
        lines.append(f"**{line}**" if metric in primary else line)
    for metric in primary:
        if metric not in targets:
            lines.append(f"**`{metric}`: {fmt(metrics.get(metric))}** (no target)")
    return "<br>".join(lines)


def render_table(results: dict[str, dict]) -> str:
    rows = ["| Benchmark | What it measures | Cost counted | Targets: measured (primary in bold) | Met | Last run |",
            "|---|---|---|---|---|---|"]
    for name, bench in REGISTRY.items():
        result = results[name]
        targets, met = result.get("targets", {}), result.get("met", {})
        n_met = sum(bool(met.get(m)) for m in targets)
        met_cell = f"{n_met}/{len(targets)} {'✓' if n_met == len(targets) else '✗'}" if targets else "no target"
        commit = result.get("commit") or "not recorded"
        last = f"{str(result.get('date', 'not recorded'))[:10]}<br>commit {commit}<br>{run_kind(result, bench)}"
        cells = [f"[{name}]({name}.py)", bench.measures, bench.cost, targets_cell(name, result), met_cell, last]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def splice(readme: str, table: str) -> str:
    """The README with the text between the markers replaced by `table`."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"bench/README.md needs exactly one {START} followed by one {END}")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def expected_readme(readme: Path = README, results_dir: Path = RESULTS) -> str:
    return splice(readme.read_text(), render_table(load_results(results_dir)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff when the README is stale")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        new = expected_readme(args.readme, args.results_dir)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    old = args.readme.read_text()
    if args.check:
        if new == old:
            return 0
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                   f"{args.readme} (committed)", f"{args.readme} (from the JSONs)"))
        print(f"\n{args.readme} is stale: run python bench/readme_table.py", file=sys.stderr)
        return 1
    if new != old:
        args.readme.write_text(new)
        print(f"rewrote the table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
