"""Does fine-tuning pay, and does QLoRA keep up with LoRA? Held-out accuracy at equal steps and data.

    python bench/train_value.py            # full: 3 seeds, 200 paired held-out questions, native dtype + the other at 1 seed
    python bench/train_value.py --quick    # 1 seed, 6 steps, 24 questions: proves the harness (about 2 min)

Data: the main job's verifiable tasks (1-2 digit sums, differences and comparisons, worked
responses "23 + 58 = 81"), 240 clean training rows (seed 0), 32 validation rows for the eval
loss (seed 20000) and 200 held-out questions (seed 10000) that share no instruction with either.

Training: the project's own loop (`frugalray.train.loop.TrainingSession`, in process: the same
code a Ray Train worker and a Tune trial run) with the shipped recipe: rank-8 LoRA on every
linear, lr 1e-3, batch 8, 10% warmup then linear decay, gradient clipping at 1.0. `qlora` trains
against the NF4 (double-quantized) 4-bit base, `lora` against the fp32 base; both evaluate before
training (the order that used to cut QLoRA's gradients on AVX512-BF16 CPUs). Paired seeds: seed
k gives both methods the same data order and LoRA initialisation.

Accuracy is measured as the main job serves the adapter: loaded onto the full-precision base
(transformers, fp32, greedy, 16 new tokens, exact match with `answers.is_correct`) on the same
200 questions for the base and every adapter, so differences are paired per question. FLOPs are
the training loop's (`budget.flops`, 6ND-style per real token). The plot is held-out accuracy
against training FLOPs (bench/results/train_value.png).

Targets: qlora within 3 points of lora (mean of 3 seeds; the paired 95% interval is reported),
and each at least 10 points above the untrained base. The native compute dtype is this
machine's (`auto`); the other dtype runs at one seed when it costs at most 10x the time (on an
AVX2-only CPU 4-bit bf16 is about 27x slower, so it is reported as not run there).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from frugalray.benchmarking import RESULTS_DIR, print_table, write_result
from frugalray.examples.generate import GenerateConfig, generate_tasks, make_eval_set
from frugalray.stats import paired_difference
from frugalray.train.accuracy import AdapterAccuracy, greedy_correct
from frugalray.train.spec import TrainingSpec

FAMILIES, OPERATIONS, STYLE = ["arithmetic", "compare"], ["+", "-"], "worked"
RECIPE = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": "all-linear",
          "learning_rate": 1e-3, "batch_size": 8, "seq_len": 96, "lr_scheduler": "linear",
          "max_grad_norm": 1.0, "optimizer": "adamw", "weight_decay": 0.0}
# Above this slowdown of the non-native dtype's steps, it is reported, not run.
OTHER_DTYPE_MAX_SLOWDOWN = 10.0


def train_and_score(method: str, dtype: str, seed: int, steps: int, model_path: str, train: list[dict],
                    validation: list[dict], scorer: AdapterAccuracy, checkpoints: list[int]) -> dict:
    from frugalray.train.loop import TrainingSession

    spec = TrainingSpec(**RECIPE, method=method, compute_dtype=dtype, seed=seed, max_steps=steps,
                        warmup_steps=max(1, steps // 10))
    session = TrainingSession(spec, model_path, train, validation)
    before = session.evaluate()
    started, flops, losses, curve, step_s = time.time(), 0.0, [], [], []
    for step in range(1, steps + 1):
        t0 = time.time()
        stats = session.step()
        step_s.append(time.time() - t0)
        flops += stats.flops
        losses.append(stats.loss)
        if step in checkpoints and step != steps:
            correct = scorer.of_session(session)
            curve.append({"step": step, "train_flops": flops, "accuracy": sum(correct) / len(correct)})
    after = session.evaluate()
    correct = scorer.of_session(session)
    curve.append({"step": steps, "train_flops": flops, "accuracy": sum(correct) / len(correct)})
    run = {"method": method, "compute_dtype": session.compute_dtype, "seed": seed, "steps": steps,
           "eval_loss_before": before.loss if before else None, "eval_loss_after": after.loss if after else None,
           "train_loss_first": losses[0], "train_loss_last": losses[-1], "train_flops": flops,
           "mean_step_s": sum(step_s) / len(step_s), "wall_s": time.time() - started,
           "accuracy": sum(correct) / len(correct), "correct": correct, "curve": curve}
    print(f"  {method} {session.compute_dtype} seed {seed}: eval loss {run['eval_loss_before']:.3f} -> "
          f"{run['eval_loss_after']:.3f}, train loss {losses[0]:.3f} -> {losses[-1]:.3f}, accuracy "
          f"{run['accuracy']:.3f}, {run['mean_step_s']:.2f} s/step ({run['wall_s']:.0f}s)", flush=True)
    del session
    return run


def plot(runs: list[dict], base_accuracy: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.axhline(base_accuracy, color="grey", linestyle=":", label=f"untrained base {base_accuracy:.2f}")
    for (method, dtype), marker in zip(sorted({(r["method"], r["compute_dtype"]) for r in runs}), "osd^"):
        group = [r for r in runs if r["method"] == method and r["compute_dtype"] == dtype]
        for i, r in enumerate(group):
            xs = [0.0] + [c["train_flops"] for c in r["curve"]]
            ys = [base_accuracy] + [c["accuracy"] for c in r["curve"]]
            ax.plot(xs, ys, marker=marker, alpha=0.75, label=f"{method} ({dtype})" if i == 0 else None,
                    color={"qlora": "tab:blue", "lora": "tab:orange"}[method],
                    linestyle="-" if i == 0 or len(group) == 1 else "--")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"held-out accuracy (n={len(runs[0]['correct'])}, greedy)")
    ax.set_title("fine-tuning value: QLoRA vs LoRA, equal steps and data")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool) -> dict:
    import torch

    from frugalray.devices import has_fast_bf16
    from frugalray.models import DEFAULT_MODEL, resolve_model

    started = time.time()
    seeds = [0] if quick else [0, 1, 2]
    steps = 6 if quick else 40
    n_heldout = 24 if quick else 200
    model_path = resolve_model(DEFAULT_MODEL)
    rows = generate_tasks(GenerateConfig(n_rows=240, families=FAMILIES, operations=OPERATIONS, max_digits=2,
                                         response_style=STYLE, seed=0))
    train = [{"prompt": r["instruction"], "response": r["response"]} for r in rows]
    seen = {r["instruction"] for r in rows}
    validation_rows = make_eval_set(32, seed=20000, families=FAMILIES, operations=OPERATIONS,
                                    exclude_instructions=seen, response_style=STYLE)
    validation = [{"prompt": r["instruction"], "response": r["response"]} for r in validation_rows]
    heldout = make_eval_set(n_heldout, seed=10000, families=FAMILIES, operations=OPERATIONS,
                            exclude_instructions=seen | {r["instruction"] for r in validation_rows},
                            response_style=STYLE)
    torch.set_num_threads(os.cpu_count() or 1)
    scorer = AdapterAccuracy(model_path, heldout)
    base_correct = scorer.of_base()
    base_accuracy = sum(base_correct) / len(base_correct)
    # Context for the paired base: the same questions with the suffix the base needs to answer briefly
    # ("... Reply with only the number."); untold, it often explains at length and is cut at 16 tokens.
    told = make_eval_set(n_heldout, seed=10000, families=FAMILIES, operations=OPERATIONS,
                         exclude_instructions=seen | {r["instruction"] for r in validation_rows})
    told_correct = greedy_correct(scorer.base, scorer.tokenizer, told)
    base_told_accuracy = sum(told_correct) / len(told_correct)
    print(f"untrained base: accuracy {base_accuracy:.3f} on {len(heldout)} held-out questions "
          f"({base_told_accuracy:.3f} when told to reply with only the number)", flush=True)

    native = "bfloat16" if has_fast_bf16() else "float32"
    other = "float32" if native == "bfloat16" else "bfloat16"
    checkpoints = [steps // 4, steps // 2, steps]
    runs = []
    for seed in seeds:
        for method in ("qlora", "lora"):
            runs.append(train_and_score(method, native, seed, steps, model_path, train, validation, scorer,
                                        checkpoints))
    # The other dtype at one seed, when its steps cost at most 10x: measured on 2 steps first.
    other_runs, other_skipped = [], {}
    for method in ("qlora", "lora"):
        probe_native = next(r["mean_step_s"] for r in runs if r["method"] == method)
        from frugalray.train.loop import TrainingSession

        probe = TrainingSession(TrainingSpec(**RECIPE, method=method, compute_dtype=other, seed=0, max_steps=2),
                                model_path, train, [])
        t0 = time.time()
        probe.step()
        probe.step()
        probe_s = (time.time() - t0) / 2
        del probe
        slowdown = probe_s / probe_native
        if slowdown > OTHER_DTYPE_MAX_SLOWDOWN:
            other_skipped[method] = (f"not run: {other} steps took {probe_s:.1f}s vs {probe_native:.2f}s "
                                     f"native ({slowdown:.0f}x > {OTHER_DTYPE_MAX_SLOWDOWN:.0f}x)")
            print(f"  {method} {other}: {other_skipped[method]}", flush=True)
            continue
        other_runs.append(train_and_score(method, other, seeds[0], steps, model_path, train, validation, scorer,
                                          checkpoints))

    def of(method: str, dtype: str = native) -> list[dict]:
        return [r for r in runs + other_runs if r["method"] == method and r["compute_dtype"] == dtype]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    q, lo = of("qlora"), of("lora")
    # Per question, the seed-mean of each method's correctness: paired over the same 200 questions.
    q_mean = [mean([r["correct"][i] for r in q]) for i in range(len(heldout))]
    l_mean = [mean([r["correct"][i] for r in lo]) for i in range(len(heldout))]
    q_vs_l = paired_difference(q_mean, l_mean)
    q_vs_base = paired_difference(q_mean, base_correct)
    l_vs_base = paired_difference(l_mean, base_correct)
    metrics = {
        "accuracy_base": base_accuracy,
        "accuracy_base_told_reply_with_number": base_told_accuracy,
        "qlora_minus_base_told_points": 100 * (mean([r["accuracy"] for r in q]) - base_told_accuracy),
        "accuracy_qlora": mean([r["accuracy"] for r in q]),
        "accuracy_lora": mean([r["accuracy"] for r in lo]),
        "qlora_minus_lora_points": 100 * q_vs_l.diff,
        "qlora_minus_lora_ci95_points": [100 * q_vs_l.ci_low, 100 * q_vs_l.ci_high],
        "qlora_minus_lora_abs_points": abs(100 * q_vs_l.diff),
        "qlora_minus_base_points": 100 * q_vs_base.diff,
        "qlora_minus_base_ci95_points": [100 * q_vs_base.ci_low, 100 * q_vs_base.ci_high],
        "lora_minus_base_points": 100 * l_vs_base.diff,
        "lora_minus_base_ci95_points": [100 * l_vs_base.ci_low, 100 * l_vs_base.ci_high],
        "per_seed_qlora_minus_lora_points": [100 * (a["accuracy"] - b["accuracy"]) for a, b in zip(q, lo)],
        "eval_loss_base": mean([r["eval_loss_before"] for r in lo]),
        "eval_loss_base_nf4": mean([r["eval_loss_before"] for r in q]),
        "eval_loss_qlora": mean([r["eval_loss_after"] for r in q]),
        "eval_loss_lora": mean([r["eval_loss_after"] for r in lo]),
        "train_flops_per_run": mean([r["train_flops"] for r in q]),
        "mean_step_s_qlora": mean([r["mean_step_s"] for r in q]),
        "mean_step_s_lora": mean([r["mean_step_s"] for r in lo]),
        "native_dtype": native,
        "other_dtype": other,
    }
    for method in ("qlora", "lora"):
        done = of(method, other)
        metrics[f"accuracy_{method}_{other}_seed0"] = done[0]["accuracy"] if done else None
        metrics[f"eval_loss_{method}_{other}_seed0"] = done[0]["eval_loss_after"] if done else None
        if method in other_skipped:
            metrics[f"{method}_{other}_note"] = other_skipped[method]
    png = RESULTS_DIR / ("train_value_quick.png" if quick else "train_value.png")
    plot(runs + other_runs, base_accuracy, png)
    config = {"quick": quick, "seeds": seeds, "steps": steps, "train_rows": len(train), "validation_rows": len(validation),
              "heldout_questions": len(heldout), "recipe": RECIPE, "families": FAMILIES, "response_style": STYLE,
              "model": DEFAULT_MODEL, "plot": str(png), "wall_s": round(time.time() - started, 1),
              "runs": [{k: v for k, v in r.items() if k != "correct"} for r in runs + other_runs]}
    targets = {"qlora_minus_lora_abs_points": "<= 3", "qlora_minus_base_points": ">= 10",
               "lora_minus_base_points": ">= 10"}
    result = write_result("train_value_quick" if quick else "train_value", config, metrics, targets)
    table = [{"arm": "base (untrained)", "dtype": "-", "seeds": "-", "accuracy": base_accuracy,
              "vs base (points, 95% CI)": "-", "eval loss": metrics["eval_loss_base"]}]
    for method, diff in (("qlora", q_vs_base), ("lora", l_vs_base)):
        group = of(method)
        table.append({"arm": method, "dtype": native, "seeds": len(group), "accuracy": mean([r["accuracy"] for r in group]),
                      "vs base (points, 95% CI)": diff.describe(),
                      "eval loss": mean([r["eval_loss_after"] for r in group])})
    for r in other_runs:
        table.append({"arm": r["method"], "dtype": r["compute_dtype"], "seeds": 1, "accuracy": r["accuracy"],
                      "vs base (points, 95% CI)": "-", "eval loss": r["eval_loss_after"]})
    print(f"\nqlora - lora: {q_vs_l.describe()}; per seed {metrics['per_seed_qlora_minus_lora_points']}")
    print(f"{time.time() - started:.0f}s; plot {png}; met {result['met']}")
    print_table(table, ["arm", "dtype", "seeds", "accuracy", "vs base (points, 95% CI)", "eval loss"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 steps, 24 questions (harness check)")
    args = parser.parse_args(argv)
    run(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
