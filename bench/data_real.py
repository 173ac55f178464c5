"""Benchmark 4, real instruction data: every scorer over Alpaca rows; cost per 1k rows (wall and
FLOPs), Spearman rank agreement between the scores, and the rows each score would remove first.

    python bench/data_real.py --quick        # 200 rows cut to 128 tokens (minutes on a busy 2-core box)
    python bench/data_real.py --rows 1000    # the full run (256 tokens)

Each scorer runs as its own `run_score` job over the same rows (one actor, the model loaded
once), so its wall time includes its actor start and model load, as a user would pay it; FLOPs
are the analytic ones the ledger records. The influence target set is 16 Alpaca rows held out of
the scored sample (the "task the user cares about" stand-in); the dynamics proxy fine-tune trains
on the scored rows. Reads ../shared/data/alpaca/alpaca_5000.json (read-only, never copied).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
SCORERS = ["heuristics", "duplicates", "perplexity", "ifd", "grand", "dynamics", "influence"]
# Score column -> which end of it a keep-70% filter removes first ("high": largest values go first).
REMOVE_END = {
    "perplexity": "high", "ifd": "high", "grand": "high", "el2n": "high", "dyn_loss_mean": "high",
    "dyn_loss_var": "high", "forgetting_events": "high", "influence": "low", "garbage_ratio": "high",
    "repetition_ratio": "high",
}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho (average ranks for ties) over the pairs where both are finite."""
    import numpy as np

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None

    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="mergesort")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # ties share their average rank
            tied = values == v
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _short(text: str, n: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 rows, max_length 128")
    parser.add_argument("--rows", type=int, default=1000, help="rows scored in the full mode")
    parser.add_argument("--scorers", default=",".join(SCORERS), help="comma-separated subset")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per row (default 256; quick 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from frugalray.benchmarking import print_table, write_result
    from frugalray.examples.generate import write_rows
    from frugalray.examples.loaders import FieldMapping
    from frugalray.data.score import ScoreConfig, run_score
    from frugalray.data.score_columns import SCORER_COLUMNS
    from frugalray.ray_utils import init_ray

    if not ALPACA.is_file():
        print(f"missing {ALPACA}", file=sys.stderr)
        return 2
    n_rows = 200 if args.quick else args.rows
    args.max_length = args.max_length or (128 if args.quick else 256)
    scorers = [s for s in args.scorers.split(",") if s]
    records = json.loads(ALPACA.read_text())
    rng = random.Random(args.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    sample = [{**records[i], "id": f"alpaca-{i}"} for i in order[:n_rows]]
    targets = [records[i] for i in order[-16:]]  # held out of the sample

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="data_real_"))
    data = write_rows(sample, work / "sample.jsonl")
    target = write_rows(targets, work / "target.jsonl")
    per_scorer: dict[str, dict] = {}
    columns: dict[str, dict[str, float]] = {}  # column -> id -> value
    texts: dict[str, dict] = {}
    quarantined = 0

    def summarize(done: bool):
        """Write bench/results/data_real.json from the scorers finished so far."""
        ids = sorted(texts)
        names = [c for c in REMOVE_END if c in columns]
        correlations = {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                rho = spearman([columns[a].get(x, math.nan) for x in ids], [columns[b].get(x, math.nan) for x in ids])
                correlations[f"spearman_{a}__{b}"] = None if rho is None else round(rho, 3)
        examples = {}
        for col in names:
            values = sorted(columns[col].items(), key=lambda kv: kv[1], reverse=REMOVE_END[col] == "high")
            examples[col] = [{"id": k, "value": round(v, 4), "instruction": _short(texts[k]["instruction"]),
                              "output": _short(texts[k]["output"])} for k, v in values[:3] if math.isfinite(v)]
        for kind in ("duplicate", "degenerate"):
            if kind in columns:
                examples[kind] = [{"id": k, "instruction": _short(texts[k]["instruction"]), "output": _short(texts[k]["output"])}
                                  for k in list(columns[kind])[:3]]

        metrics: dict = {f"{s}_wall_s_per_1k": m["wall_s_per_1k"] for s, m in per_scorer.items()}
        metrics.update({f"{s}_flops_per_1k": m["flops_per_1k"] for s, m in per_scorer.items()})
        metrics.update(correlations)
        metrics["rows_quarantined"] = quarantined
        metrics["duplicates_found"] = len(columns.get("duplicate", {}))
        metrics["degenerate_found"] = len(columns.get("degenerate", {}))
        metrics["examples"] = examples
        config = {"rows": n_rows, "quick": args.quick, "scorers": scorers, "max_length": args.max_length,
                  "seed": args.seed, "data": "alpaca_5000.json", "influence_target_rows": len(targets),
                  "note": "wall includes each scorer's actor start and model load; machine shared with other jobs"}
        config["complete"] = done
        write_result("data_real", config, metrics, targets={}, out_dir=args.out_dir)
        return correlations, examples

    for name in scorers:
        cfg = ScoreConfig(
            input_path=str(data), output_path=str(work / f"scored_{name}"), fields=FieldMapping.alpaca(),
            scorers=[name], batch_size=8, max_length=args.max_length, num_actors=1,
            dynamics={"checkpoints": [1, 2, 4], "proxy": {"batch_size": 4, "lora_rank": 4}},
            influence={"target_path": str(target), "dim": 512, "lora_rank": 4},
        )
        started = time.time()
        result = run_score(cfg, work / "run")
        wall = time.time() - started
        import pyarrow.parquet as pq

        table = pq.read_table(result.output_path).to_pylist()
        quarantined = result.rows_quarantined
        per_scorer[name] = {
            "scorer": name, "rows": result.rows_scored, "wall_s": round(wall, 1),
            "wall_s_per_1k": round(1000 * wall / result.rows_scored, 1),
            "flops_per_1k": 1000 * result.flops / result.rows_scored,
        }
        for row in table:
            texts[row["id"]] = {"instruction": row["instruction"], "input": row["input"], "output": row["output"]}
            for col in SCORER_COLUMNS[name]:
                value = row.get(col)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and col in REMOVE_END:
                    columns.setdefault(col, {})[row["id"]] = float(value)
            if name == "duplicates" and row["dup_kind"] != "none":
                columns.setdefault("duplicate", {})[row["id"]] = 1.0
            if name == "heuristics" and row["degenerate_reason"]:
                columns.setdefault("degenerate", {})[row["id"]] = 1.0
        print(f"{name}: {result.rows_scored} rows in {wall:.1f}s, {result.flops:.3g} FLOPs", flush=True)
        summarize(done=False)  # partial results survive an interrupted run

    correlations, examples = summarize(done=True)

    for col, rows in examples.items():
        print(f"\nfirst removed by {col}:")
        for r in rows:
            print(f"  {r.get('value', '')}  {r['instruction']!r} -> {r['output']!r}")
    print("\nSpearman rank correlations:")
    for key, rho in correlations.items():
        print(f"  {key[len('spearman_'):].replace('__', ' vs ')}: {rho}")
    print()
    print_table(list(per_scorer.values()), ["scorer", "rows", "wall_s", "wall_s_per_1k", "flops_per_1k"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
