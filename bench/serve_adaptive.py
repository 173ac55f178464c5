"""Adaptive test-time compute through the served endpoint, on the model we train: accuracy vs samples and FLOPs.

    make demo                                 # once: trains the arithmetic adapter under runs/pipeline
    python bench/serve_adaptive.py --quick    # 6 prompts of another seed: proves the harness (minutes)
    python bench/serve_adaptive.py            # the full run the targets refer to (~40 min on 2 cores)

One local Ray cluster (8 logical CPUs), one frugalray Serve app serving SmolLM2-135M-Instruct and
the QLoRA adapter `make demo` trained on arithmetic (`--run-dir`, or `--adapter`), the official
`openai` client. The prompts are fresh held-out questions of the adapter's own task family
(`make_eval_set` with the run's generate settings and a seed of this bench's), none of them in the
run's training, held-out or validation sets. Every prompt is asked of the adapter and of the base
model (the base figures stand beside the adapter's; the targets are on the adapter).

Before the first request the result JSON is written with `status: running`, the primary
configuration and the whole prompt list; every planned prompt runs, and the final JSON reports
`planned`, `run` and `failed` with the reasons.

Per prompt and served model:
1. POOL: one plain request with n=16, no seed, logprobs on. The server answers self_consistency
   with max_samples=k by exactly this (one n=k request, majority vote with
   `frugalray.serve.stopping.majority_vote`), so fixed self-consistency SC@1/4/8/16 is the vote
   over the first k pooled samples, and its FLOPs are `request_flops` of those samples with one
   shared prefill (with the adapter's LoRA term), the server's own formula.
2. GREEDY: compute_budget strategy greedy (one T=0 decode).
3. SERVER adaptive runs (the real thing): compute_budget strategy adaptive_consistency and auto at
   several confidences; samples, FLOPs, answer and stopped_early come from the response's
   `usage.frugalray`. FLOPs follow the server's rule: a request pays its prompt once, and a later
   round pays only the prompt tokens vLLM did not serve from its prefix cache (`cached_tokens`).
   These draw fresh samples, so their accuracy differs from SC@16's by sampling noise as well as
   by the stopping rule.
4. SIM (an extra, clearly labelled column): the same stopping policies
   (`frugalray.serve.stopping`) replayed on the pooled samples in order. Paired with SC@16
   (same samples), so its accuracy gap isolates the stopping rule; its FLOPs charge every
   round's prefill (no cache: an upper bound).

Scoring: the answer the server's vote uses (the `number` extractor) against the gold answer
normalized the same way. Primary configuration (fixed before any full run): adaptive_consistency
at confidence 0.95, round size 2, temperature 0.7 (the server's default), on the adapter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from frugalray.examples.answers import extract_answer
from frugalray.serve.samples import samples_from_choices
from frugalray.serve.stopping import Limits, RoundPlan, Sample, majority_vote, make_policy, run_policy
from frugalray.serve.usage import request_flops, usage_extension

log = logging.getLogger("bench.serve_adaptive")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL_NAME = "smollm2-135m-instruct"
ADAPTER_NAME = "arith"
POOL_SIZE = 16
SC_KS = (1, 4, 8, 16)
PRIMARY = "adaptive_consistency@0.95/r2"
PRIMARY_TEMPERATURE = 0.7
# Fresh questions: neither the run's training rows nor its held-out/validation seeds (10000, 10001).
HELDOUT_SEED = 20000
# The server's default deadline (request_timeout_s, 300 s) is for interactive clients; on a loaded
# 2-core machine a 16-sample adaptive request can need longer, and a benchmark wants its answer.
LONG_DEADLINE: dict[str, Any] = {"request_timeout_s": 3600.0}


# --- a private Ray cluster (never `ray stop`: other engineers share this machine) -----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_head(env: dict[str, str], num_cpus: int):
    """One `ray start --head --block` in its own session; returns (proc, log file, address, stop)."""
    gcs_port = free_port()
    log_file = open(f"/tmp/frugalray-bench-ray-{gcs_port}.log", "w")  # noqa: SIM115 - closed in stop()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(gcs_port), "--num-cpus", str(num_cpus),
         "--include-dashboard", "false",
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
         "--disable-usage-stats"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )

    def stop() -> None:
        from frugalray.local_cluster import stop_ray_nodes

        stop_ray_nodes([proc])  # vLLM's engine processes can outlive the raylet: the whole session goes
        log_file.close()

    return proc, log_file, f"127.0.0.1:{gcs_port}", stop


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = 8, worker_niceness: int | None = 0) -> Iterator[str]:
    """`ray start --head` on loopback with free ports (as tests/conftest.py); this process joins it.

    8 logical CPUs on 2 cores: Serve's ingress is never scheduled behind the engine otherwise.
    Ray starts its workers at nice 15 by default (`RAY_worker_niceness`); on a busy shared machine
    the engine then starves behind every un-niced process, while the benchmark's own client (this
    process, nice 0) does not. A benchmark runs its workers at `worker_niceness` (default 0, like
    the client; None keeps Ray's default). Everything started here is stopped on exit (also on
    SIGTERM), and nothing else.
    """
    import ray

    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if worker_niceness is not None:
        env["RAY_worker_niceness"] = str(worker_niceness)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
    for attempt in range(1, 4):  # a loaded machine sometimes times out a head's startup: retry
        proc, log_file, address, stop = _start_head(env, num_cpus)
        deadline = time.time() + 300
        # Joining a head that is still starting fails in odd ways on a loaded machine: wait for it.
        while "Ray runtime started" not in Path(log_file.name).read_text():
            if proc.poll() is not None or time.time() > deadline:
                break
            time.sleep(2)
        else:
            break
        stop()
        log.warning("`ray start --head` did not come up (attempt %d, exit %s); see %s",
                    attempt, proc.returncode, log_file.name)
    else:
        raise RuntimeError("`ray start --head` failed 3 times; the machine is too loaded")
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except Exception as err:
            if proc.poll() is not None or time.time() > deadline:
                stop()
                raise RuntimeError(f"could not join `ray start --head` at {address} (exit {proc.returncode}, "
                                   f"log {log_file.name}): {err}") from err
            time.sleep(2)
    # after ray.init, which installs a SIGTERM handler of its own that aborts without cleanup
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield address
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception as err:  # noqa: BLE001 - stopping the cluster ends Serve anyway
            log.warning("serve.shutdown failed: %s", err)
        ray.shutdown()
        stop()
        signal.signal(signal.SIGTERM, previous)


# --- prompts ------------------------------------------------------------------------------


def trained_run(run_dir: Path) -> tuple[dict[str, Any], set[str]]:
    """The pipeline run's generate settings and every instruction it trained, validated or evaluated on."""
    config_file = run_dir / "pipeline_config.json"
    if not config_file.is_file():
        raise SystemExit(f"--run-dir: {config_file} not found; run `make demo` first (it trains the arithmetic "
                         "adapter this bench serves), or point --run-dir at a finished pipeline run")
    generate = json.loads(config_file.read_text())["generate"]
    seen: set[str] = set()
    for name in ("tasks.jsonl", "heldout.jsonl", "validation.jsonl"):
        path = run_dir / "data" / name
        if path.is_file():
            seen |= {json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()}
    return generate, seen


def fresh_heldout_rows(n: int, generate: dict[str, Any], exclude: set[str], seed: int = HELDOUT_SEED
                       ) -> list[dict[str, Any]]:
    """`n` questions of the trained task family (same families, digits, operations, reply style),
    none of them among `exclude` (the run's training, held-out and validation instructions)."""
    from frugalray.examples.generate import make_eval_set

    rows = make_eval_set(n, seed=seed, families=generate["families"], max_digits=generate["max_digits"],
                         operations=generate["operations"], exclude_instructions=exclude,
                         response_style=generate.get("response_style", "number"))
    leaked = [r["instruction"] for r in rows if r["instruction"] in exclude]
    if leaked:  # make_eval_set repeats only when the question space is exhausted
        raise SystemExit(f"--n-prompts: only {n - len(leaked)} unseen questions exist for these settings; ask for fewer")
    return [{"id": r["id"], "dataset": "arithmetic", "difficulty": r["difficulty"], "family": r["family"],
             "prompt": r["instruction"], "gold": extract_answer(r["answer"], "number")} for r in rows]


def for_models(rows: list[dict[str, Any]], models: dict[str, str], temperature: float) -> list[dict[str, Any]]:
    """Each row once per served model ({label: served name}); `dataset` becomes the table's group,
    e.g. `adapter@T0.7`, and `task` keeps the generator's dataset name."""
    return [dict(row, task=row["dataset"], dataset=f"{label}@T{temperature:g}", model=served,
                 temperature=temperature) for row in rows for label, served in models.items()]


# --- pure analysis (unit-tested in tests/unit/test_bench_serve.py) -------------------------


def method_name(strategy: str, confidence: float, round_size: int) -> str:
    return f"{strategy}@{confidence:g}/r{round_size}"


def self_consistency_at(pool: list[Sample], k: int) -> tuple[str | None, int]:
    """SC@k from a pooled draw: the server's majority vote over the first k samples."""
    if len(pool) < k:
        raise ValueError(f"SC@{k} needs {k} pooled samples, got {len(pool)}")
    winner, _, _ = majority_vote([s.answer for s in pool[:k]])
    return winner, k


def replay_policy(strategy: str, pool: list[Sample], confidence: float, round_size: int, max_tokens: int,
                  flops_of: Callable[[list[int], int], float] | None = None):
    """Run a stopping policy on pooled samples, drawn in order (the SIM column)."""
    policy = make_policy(strategy, Limits(max_samples=len(pool), max_tokens=max_tokens), flops_of,
                         confidence=confidence, round_size=round_size)
    cursor = 0

    def draw(plan: RoundPlan) -> list[Sample]:
        nonlocal cursor
        # A greedy round (cascade) cannot be served from sampled draws.
        if plan.greedy:
            raise ValueError("replay_policy: greedy rounds cannot be replayed from sampled draws")
        got = pool[cursor:cursor + plan.n]
        cursor += len(got)
        return got

    return run_policy(policy, draw)


def pooled_outcomes(record: dict[str, Any], shape, sim_configs: list[tuple[str, float, int]],
                    max_tokens: int, lora_params: int = 0) -> dict[str, dict[str, Any]]:
    """SC@k and SIM policies from one prompt's pool: {method: {answer, samples, flops}}.

    SC@k is one engine request (its prompt paid once); SIM charges every round's prefill (no cache)."""
    pool = [Sample(**s) for s in record["pool"]]
    prompt_tokens = record["prompt_tokens"]

    def flops_of(completions: list[int], passes: int) -> float:
        return request_flops(shape, prompt_tokens, completions, lora_params, passes) if shape is not None else 0.0

    out: dict[str, dict[str, Any]] = {}
    for k in SC_KS:
        if k > len(pool):
            continue
        answer, used = self_consistency_at(pool, k)
        out[f"SC@{k}"] = {"answer": answer, "samples": used,
                          "flops": flops_of([s.completion_tokens for s in pool[:k]], 1)}
    for strategy, confidence, round_size in sim_configs:
        outcome = replay_policy(strategy, pool, confidence, round_size, max_tokens, flops_of)
        out["sim:" + method_name(strategy, confidence, round_size)] = {
            "answer": outcome.answer, "samples": outcome.samples,
            "flops": flops_of([s.completion_tokens for s in pool[:outcome.samples]], outcome.rounds),
        }
    return out


def summarize(records: list[dict[str, Any]], source_of: Callable[[str], str]) -> list[dict[str, Any]]:
    """One row per (dataset, method): accuracy, mean samples, mean FLOPs over prompts.

    Each record has `dataset`, `gold` and `methods` {name: {answer, samples, flops}}.
    """
    table: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        for name, res in rec["methods"].items():
            table.setdefault((rec["dataset"], name), []).append(
                {"correct": res["answer"] is not None and res["answer"] == rec["gold"],
                 "samples": res["samples"], "flops": res["flops"],
                 "stopped_early": res.get("stopped_early")})
    rows = []
    for (dataset, name), items in table.items():
        early = [i["stopped_early"] for i in items if i["stopped_early"] is not None]
        rows.append({
            "dataset": dataset, "method": name, "source": source_of(name), "n": len(items),
            "accuracy": sum(i["correct"] for i in items) / len(items),
            "mean_samples": sum(i["samples"] for i in items) / len(items),
            "mean_flops": sum(i["flops"] for i in items) / len(items),
            "stopped_early": (sum(early) / len(early)) if early else None,
        })
    return rows


def compare_to_sc16(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add sample_ratio (SC@16 mean samples / the method's) and acc_gap_pts (SC@16 - method, points)."""
    ref = {r["dataset"]: r for r in rows if r["method"] == "SC@16"}
    for row in rows:
        base = ref.get(row["dataset"])
        if base is None or row["mean_samples"] <= 0:
            row["sample_ratio"], row["flops_ratio"], row["acc_gap_pts"] = None, None, None
            continue
        row["sample_ratio"] = base["mean_samples"] / row["mean_samples"]
        row["flops_ratio"] = base["mean_flops"] / row["mean_flops"] if row["mean_flops"] > 0 else None
        row["acc_gap_pts"] = 100.0 * (base["accuracy"] - row["accuracy"])
    return rows


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of (name, cost, accuracy) points no other point beats (<= cost, >= accuracy, one strictly)."""
    front = []
    for name, cost, acc in points:
        dominated = any(c <= cost and a >= acc and (c < cost or a > acc) for n, c, a in points if n != name)
        if not dominated:
            front.append(name)
    return front


def by_difficulty(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Mean samples and accuracy per difficulty level (does the server spend more on hard prompts?)."""
    rows = []
    levels = sorted({r["difficulty"] for r in records if r["difficulty"] is not None})
    for level in levels:
        recs = [r for r in records if r["difficulty"] == level]
        for name in methods:
            got = [r["methods"][name] for r in recs if name in r["methods"]]
            if got:
                rows.append({"difficulty": level, "method": name, "n": len(got),
                             "accuracy": sum(g["answer"] == r["gold"] and g["answer"] is not None
                                             for g, r in zip(got, recs)) / len(got),
                             "mean_samples": sum(g["samples"] for g in got) / len(got)})
    return rows


# --- talking to the server ---------------------------------------------------------------


def pooled_request(client, model: str, prompt: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """n=16 samples in one request (no seed): the pool every fixed-k SC is computed from."""
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], n=POOL_SIZE,
        max_tokens=max_tokens, temperature=temperature, logprobs=True,
    ).model_dump()
    choices = sorted(resp["choices"], key=lambda c: c["index"])
    samples = samples_from_choices(choices, [resp["usage"]["completion_tokens"]], "number")
    return {"pool": [{"answer": s.answer, "completion_tokens": s.completion_tokens, "mean_logprob": s.mean_logprob}
                     for s in samples],
            "prompt_tokens": resp["usage"]["prompt_tokens"], "server_flops": usage_extension(resp["usage"]).get("flops"),
            "pool_cached_tokens": resp["usage"]["prompt_tokens_details"]["cached_tokens"]}


def budgeted_request(client, model: str, prompt: str, max_tokens: int, temperature: float, budget: dict[str, Any]
                     ) -> dict[str, Any]:
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=temperature, extra_body={"compute_budget": {"answer_extractor": "number", **budget}},
    ).model_dump()
    usage = usage_extension(resp["usage"])  # frugalray's figures (OpenAI's fields stay at the top)
    text = resp["choices"][0]["message"]["content"]
    answer = usage.get("answer", extract_answer(text, "number"))
    return {"answer": answer, "samples": usage["samples"], "flops": usage["flops"],
            "stopped_early": usage.get("stopped_early"), "stop_reason": usage.get("stop_reason"),
            "confidence": usage.get("confidence"), "rounds": usage.get("rounds"),
            "cached_prompt_tokens": usage.get("cached_prompt_tokens")}


def prompt_jobs(row: dict[str, Any], server_configs: list[tuple[str, float, int]]) -> list[tuple[str, dict | None]]:
    """Every server request one prompt needs, as independent jobs (they run concurrently)."""
    jobs: list[tuple[str, dict | None]] = [("pool", None), ("greedy", {"strategy": "greedy"})]
    for strategy, confidence, round_size in server_configs:
        jobs.append((method_name(strategy, confidence, round_size),
                     {"strategy": strategy, "max_samples": POOL_SIZE, "confidence": confidence,
                      "round_size": round_size}))
    return jobs


def run_job(client, row: dict[str, Any], max_tokens: int, name: str, budget: dict | None) -> dict[str, Any]:
    if budget is None:
        return pooled_request(client, row["model"], row["prompt"], max_tokens, row["temperature"])
    return budgeted_request(client, row["model"], row["prompt"], max_tokens, row["temperature"], budget)


def run_all(client, rows: list[dict[str, Any]], server_configs: list[tuple[str, float, int]],
            args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every prompt's jobs; start no new prompt after `args.time_budget_s`.

    Returns (prompts whose every request succeeded, prompts with a failed request).

    Every request of every prompt is its own job, so the engine batches whatever is in flight and an
    adaptive run's rounds (sequential by nature) overlap with other prompts' work.
    """
    from tqdm import tqdm

    deadline = time.time() + args.time_budget_s if args.time_budget_s else math.inf
    pool = ThreadPoolExecutor(max_workers=args.concurrency)
    pending: dict[Any, tuple[dict[str, Any], str]] = {}
    open_jobs: dict[int, int] = {}
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    queue = list(enumerate(rows))
    bar = tqdm(total=len(rows), desc="prompts")
    try:
        while queue or pending:
            # keep the engine fed: start the next prompt while fewer jobs than workers are in flight
            while queue and len(pending) < args.concurrency and time.time() < deadline:
                i, row = queue.pop(0)
                tokens = args.max_tokens
                rec = dict(row, max_tokens=tokens, methods={})
                jobs = prompt_jobs(rec, server_configs)
                open_jobs[i] = len(jobs)
                for name, budget in jobs:
                    pending[pool.submit(run_job, client, rec, tokens, name, budget)] = (i, rec, name)
            if time.time() >= deadline and queue:
                log.warning("time budget reached: %d prompts not started", len(queue))
                queue = []
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i, rec, name = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as err:  # noqa: BLE001 - a failed request drops its prompt, counted
                    log.warning("prompt %s, %s failed: %s", rec["id"], name, err)
                    rec.setdefault("errors", []).append(f"{name}: {type(err).__name__}: {err}"[:300])
                    result = {}
                if name == "pool":
                    rec.update(result)
                else:
                    rec["methods"][name] = result
                open_jobs[i] -= 1
                if open_jobs[i] == 0:
                    (failed if rec.get("errors") else done).append(rec)
                    bar.update(1)
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
    return done, failed


def source_of(name: str) -> str:
    if name.startswith("sim:"):
        return "SIM on pool"
    if name.startswith("SC@"):
        return "server n=16 pool"
    return "server"


# --- the plot -----------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
    style = {"server n=16 pool": ("o-", "tab:blue"), "server": ("s", "tab:red"), "SIM on pool": ("x", "tab:gray")}
    for i, dataset in enumerate(datasets):
        sub = [r for r in rows if r["dataset"] == dataset]
        for j, (xkey, xlabel) in enumerate((("mean_samples", "mean samples per prompt"),
                                            ("mean_flops", "mean forward FLOPs per prompt"))):
            ax = axes[i][j]
            for source, (marker, color) in style.items():
                pts = sorted((r for r in sub if r["source"] == source and r["method"] != "greedy"),
                             key=lambda r: r[xkey])
                if source == "server n=16 pool":
                    ax.plot([r[xkey] for r in pts], [100 * r["accuracy"] for r in pts], marker, color=color,
                            label="fixed self-consistency SC@k (k=1,4,8,16)")
                else:
                    ax.plot([r[xkey] for r in pts], [100 * r["accuracy"] for r in pts], marker, color=color,
                            linestyle="none", label=f"{source}: adaptive / auto")
                for r in pts:
                    if source != "SIM on pool":
                        ax.annotate(r["method"].replace("adaptive_consistency", "AC"), (r[xkey], 100 * r["accuracy"]),
                                    fontsize=7, xytext=(3, 3), textcoords="offset points")
            greedy = [r for r in sub if r["method"] == "greedy"]
            if greedy:
                ax.plot([greedy[0][xkey]], [100 * greedy[0]["accuracy"]], "^", color="tab:green", label="greedy")
            front = pareto_front([(r["method"], r[xkey], r["accuracy"]) for r in sub if r["source"] != "SIM on pool"])
            pts = sorted((r for r in sub if r["method"] in front), key=lambda r: r[xkey])
            ax.step([r[xkey] for r in pts], [100 * r["accuracy"] for r in pts], where="post", color="black",
                    alpha=0.3, label="Pareto front (served)")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy (%)")
            ax.set_title(f"{dataset} (n={sub[0]['n']})")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M on vLLM-CPU through the frugalray endpoint: accuracy vs compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------


TARGETS_HISTORY = [
    {"metric": "sample_ratio_sc16_over_adaptive_T0.3", "old": ">= 3", "new": None,
     "why": "issue 22 moves the headline to the fine-tuned arithmetic adapter at the server's temperature 0.7; "
            "0.3 was added for the base model, whose answers at 0.7 rarely settle. The base model now runs at "
            "0.7 only, beside the adapter, with its T0.7 targets kept"},
    {"metric": "accuracy_gap_points_T0.3", "old": "<= 1", "new": None,
     "why": "as sample_ratio_sc16_over_adaptive_T0.3"},
    {"metric": "adapter_sample_ratio_sc16_over_adaptive", "old": None, "new": ">= 3",
     "why": "issue 22: target at the primary configuration on the fine-tuned adapter"},
    {"metric": "adapter_flops_ratio_sc16_over_adaptive", "old": None, "new": ">= 2",
     "why": "issue 22: cost ratios stand beside count ratios; FLOPs with the cached_tokens rule"},
    {"metric": "adapter_accuracy_gap_points", "old": None, "new": "<= 1",
     "why": "issue 22: SC@16's accuracy within 1 point"},
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import hashlib

    import openai

    from frugalray.benchmarking import print_table, write_plan, write_result
    from frugalray.models import DEFAULT_MODEL, engine_dtype_default, model_shape, resolve_model
    from frugalray.serve.app import deploy, shutdown_app
    from frugalray.serve.config import ServeConfig, preflight

    quick = args.quick
    run_dir = Path(args.run_dir)
    adapter_dir = Path(args.adapter) if args.adapter else run_dir / "finetune" / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(f"--adapter: no PEFT adapter at {adapter_dir}; run `make demo` first or pass --adapter")
    generate, seen = trained_run(run_dir)
    n_prompts = args.n_prompts if args.n_prompts is not None else (6 if quick else 60)
    # a quick run asks other questions (seed + 1), so the full run's prompts stay unseen until it runs
    prompts = fresh_heldout_rows(n_prompts, generate, seen, seed=HELDOUT_SEED + (1 if quick else 0))
    confidences = [0.95] if quick else [0.8, 0.9, 0.95]
    server_configs = [("adaptive_consistency", c, 2) for c in confidences]
    server_configs += [("auto", 0.95, 2)]
    sim_configs = [("adaptive_consistency", c, r) for c in (0.8, 0.9, 0.95, 0.99) for r in (1, 2, 4)]
    sim_configs += [("auto", c, 2) for c in (0.8, 0.9, 0.95, 0.99)]
    model_path = resolve_model(DEFAULT_MODEL)
    shape = model_shape(model_path)
    models = {"adapter": ADAPTER_NAME, "base": MODEL_NAME}
    rows = for_models(prompts, models, args.temperature)
    adapter_weights = next(p for p in (adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin")
                           if p.is_file())
    config = {
        "quick": quick, "model": MODEL_NAME, "engine": "vLLM-CPU via Ray Serve LLM, frugalray ingress",
        "adapter": {"served_as": ADAPTER_NAME, "path": str(adapter_dir),
                    "sha256": hashlib.sha256(adapter_weights.read_bytes()).hexdigest(),
                    "trained_by": f"`make demo` ({run_dir}/pipeline_config.json)"},
        "prompts_from": {"generator": "frugalray.examples.generate.make_eval_set", "seed": HELDOUT_SEED + quick,
                         **{k: generate.get(k) for k in ("families", "max_digits", "operations", "response_style")},
                         "excluded": f"{len(seen)} instructions of the run's training, held-out and validation sets"},
        "primary": {"model": "adapter", "strategy": "adaptive_consistency", "confidence": 0.95, "round_size": 2,
                    "temperature": args.temperature, "method": PRIMARY, "max_samples": POOL_SIZE},
        "max_tokens": args.max_tokens, "pool_size": POOL_SIZE, "temperature": args.temperature,
        "server_configs": [method_name(*c) for c in server_configs],
        "sim_configs": [method_name(*c) for c in sim_configs], "concurrency": args.concurrency,
        "stop_rule": "beta (server default)", "engine_dtype": engine_dtype_default(),
        "engine_reserved_cpus": args.engine_reserved_cpus, "ray_worker_niceness": args.worker_niceness,
        "flops_rule": "server usage: a request pays its prompt once; a later round pays only the prompt tokens "
                      "vLLM did not serve from its prefix cache. SC@k: one n=16 engine request (prompt once). "
                      "SIM: every round's prefill charged (no cache), an upper bound",
        "planned": {"prompts": n_prompts, "models": list(models), "requests_per_prompt_and_model":
                    2 + len(server_configs), "requests": len(rows) * (2 + len(server_configs))},
        "prompts": [{k: r[k] for k in ("id", "prompt", "gold", "difficulty", "family")} for r in prompts],
        "notes": "SC@k = server majority vote over the first k of one n=16 server draw per prompt; "
                 "server rows draw their own samples through compute_budget; sim rows replay the stopping "
                 "policy on the pooled draw. Shared 2-core machine: machine.load_average says how busy it was.",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plan(args.name, config, out_dir)  # before the first request
    started = time.time()
    cfg = ServeConfig(model=model_path, model_name=MODEL_NAME, adapters={ADAPTER_NAME: str(adapter_dir)},
                      app_name="bench-adaptive", route_prefix="/", http_port=free_port(),
                      max_samples_ceiling=POOL_SIZE, max_tokens_ceiling=args.max_tokens,
                      default_max_tokens=args.max_tokens, max_model_len=1024, kv_cache_gib=1,
                      engine_reserved_cpus=args.engine_reserved_cpus, **LONG_DEADLINE)
    lora_of = {MODEL_NAME: 0, **{name: info.lora_params for name, info in preflight(cfg).adapters.items()}}
    with local_ray_cluster(worker_niceness=args.worker_niceness):
        base_url = deploy(cfg)
        startup_s = time.time() - started
        log.warning("served at %s after %.0fs", base_url, startup_s)
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=900, max_retries=0)
        measure_start = time.time()
        records, failed = run_all(client, rows, server_configs, args)
        measure_s = time.time() - measure_start
        shutdown_app(cfg.app_name)
    for rec in records:
        rec["methods"].update(pooled_outcomes(rec, shape, sim_configs, rec["max_tokens"], lora_of[rec["model"]]))

    table = compare_to_sc16(summarize(records, source_of))
    order = {"SC@1": 0, "SC@4": 1, "SC@8": 2, "SC@16": 3, "greedy": 4}
    table.sort(key=lambda r: (not r["dataset"].startswith("adapter"), r["dataset"], r["source"] == "SIM on pool",
                              order.get(r["method"], 10), r["method"]))
    groups = {label: f"{label}@T{args.temperature:g}" for label in models}
    difficulty_rows = [
        {"dataset": group, **row}
        for group in groups.values()
        for row in by_difficulty([r for r in records if r["dataset"] == group],
                                 ["greedy", "SC@16", *[method_name(*c) for c in server_configs]])
    ]
    plot(table, out_dir / f"{args.name}.png")

    def row_of(dataset: str, method: str) -> dict[str, Any] | None:
        return next((r for r in table if r["dataset"] == dataset and r["method"] == method), None)

    metrics: dict[str, Any] = {}
    for label, group in groups.items():
        primary, sc16 = row_of(group, PRIMARY), row_of(group, "SC@16")
        sim_primary = row_of(group, "sim:" + PRIMARY)
        metrics.update({
            f"{label}_sc16_accuracy": sc16 and sc16["accuracy"],
            f"{label}_greedy_accuracy": (g := row_of(group, "greedy")) and g["accuracy"],
            f"{label}_adaptive_accuracy": primary and primary["accuracy"],
            f"{label}_adaptive_mean_samples": primary and primary["mean_samples"],
            f"{label}_sample_ratio_sc16_over_adaptive": primary and primary["sample_ratio"],
            f"{label}_flops_ratio_sc16_over_adaptive": primary and primary["flops_ratio"],
            f"{label}_accuracy_gap_points": primary and primary["acc_gap_pts"],
            f"{label}_adaptive_stopped_early": primary and primary["stopped_early"],
            f"{label}_sim_sample_ratio_sc16_over_adaptive": sim_primary and sim_primary["sample_ratio"],
            f"{label}_sim_accuracy_gap_points": sim_primary and sim_primary["acc_gap_pts"],
        })
    # The base model's figures under the keys its earlier targets used (T0.7: the temperature both ran at).
    metrics["sample_ratio_sc16_over_adaptive_T0.7"] = metrics["base_sample_ratio_sc16_over_adaptive"]
    metrics["accuracy_gap_points_T0.7"] = metrics["base_accuracy_gap_points"]
    targets = {"adapter_sample_ratio_sc16_over_adaptive": ">= 3", "adapter_flops_ratio_sc16_over_adaptive": ">= 2",
               "adapter_accuracy_gap_points": "<= 1",
               "sample_ratio_sc16_over_adaptive_T0.7": ">= 3", "accuracy_gap_points_T0.7": "<= 1"}
    cached = [m.get("cached_prompt_tokens") or 0 for r in records for name, m in r["methods"].items()
              if name in {method_name(*c) for c in server_configs}]
    metrics.update({
        "planned": {"prompts": n_prompts, "prompt_model_pairs": len(rows)},
        "run": {"prompt_model_pairs": len(records), "failed": len(failed),
                "not_started": len(rows) - len(records) - len(failed)},
        "not_run_reasons": sorted({e for r in failed for e in r["errors"]})[:20]
        + (["time budget (--time-budget-s) reached"] if len(rows) > len(records) + len(failed) else []),
        "prompts_completed": dict(sorted(Counter(r["dataset"] for r in records).items())),
        "adaptive_cached_prompt_tokens": {"total": sum(cached), "requests_with_hits": sum(c > 0 for c in cached),
                                          "requests": len(cached)},
        "startup_s": round(startup_s, 1), "measure_s": round(measure_s, 1),
        "table": table, "by_difficulty": difficulty_rows,
    })
    result = write_result(args.name, config, metrics, targets=targets, out_dir=out_dir,
                          **({"targets_history": TARGETS_HISTORY} if not quick else {}))
    (out_dir / f"{args.name}_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"\nserve_adaptive: {len(records)} of {len(rows)} prompt x model pairs in {measure_s:.0f}s after a "
          f"{startup_s:.0f}s startup ({len(failed)} failed); primary {PRIMARY} on the adapter: {result['met']}")
    print("\nper difficulty (served):")
    print_table(difficulty_rows, ["dataset", "difficulty", "method", "n", "accuracy", "mean_samples"])
    print()
    print_table(table, ["dataset", "method", "source", "n", "accuracy", "mean_samples", "mean_flops",
                        "sample_ratio", "flops_ratio", "acc_gap_pts", "stopped_early"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 prompts of another seed: proves the harness")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "pipeline"),
                        help="the `make demo` run whose adapter is served and whose questions are excluded")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory (default <run-dir>/finetune/adapter)")
    parser.add_argument("--n-prompts", type=int, default=None, help="held-out questions (default 6 quick, 60 full)")
    parser.add_argument("--temperature", type=float, default=PRIMARY_TEMPERATURE,
                        help="sampling temperature of every sampled request (the server's default, 0.7)")
    parser.add_argument("--max-tokens", type=int, default=16, help="per sample (the pipeline's held-out eval uses 16)")
    parser.add_argument("--concurrency", type=int, default=16, help="server requests in flight")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no new prompt after this many seconds of measuring (default: none; every "
                             "planned prompt runs, and any not started are reported with this reason)")
    parser.add_argument("--engine-reserved-cpus", type=int, default=0,
                        help="cores vLLM keeps for its scheduler (default 0 here: the model gets both of 2 cores; "
                             "this bench measures samples and accuracy, not latency)")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="nice value of Ray's workers (Ray's default is 15: starved on a busy machine)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--name", default="serve_adaptive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args)


if __name__ == "__main__":
    main()
