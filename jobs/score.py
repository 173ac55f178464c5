"""Ray Job: score every row of a dataset (perplexity, IFD, GraNd, learning dynamics, influence,
heuristics, duplicates) on a Ray Data actor pool; malformed rows go to a quarantine file.

    python jobs/score.py --config jobs/configs/score.yaml --run-dir runs/data
    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/score.yaml

The default input is the built-in task set; make it first with `frugalray data generate`.
Killed mid-run? Run the same command again: finished output shards are kept, not rescored.
"""

from __future__ import annotations

import argparse
import logging
import sys

from frugalray.config import ConfigError, load_config
from frugalray.data.score import ScoreConfig, run_score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file of ScoreConfig fields")
    parser.add_argument("--run-dir", default="runs/data", help="where the ledger is written")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. Validate the config and the data before any Ray work.
    try:
        cfg = load_config(ScoreConfig, args.config, args.set)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    # 2. Check the data and model, then join (or start) the cluster and score (run_score does both).
    try:
        result = run_score(cfg, args.run_dir)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    # 3. Summary: every row read is either scored or quarantined (run_score checks it, too).
    print(
        f"rows_in {result.rows_in} = scored {result.rows_scored} + quarantined {result.rows_quarantined} "
        f"({result.quarantine_reasons or 'none'})"
    )
    print(
        f"scorers {', '.join(result.scorers)}: {result.rows_scored_now} rows scored now, "
        f"{result.shards_resumed}/{result.shards} shards resumed; {result.tokens} tokens; "
        f"{result.flops_now:.3g} FLOPs now ({result.flops:.3g} for the whole output); {result.wall_s:.1f}s; "
        f"median perplexity "
        f"{result.median_perplexity if result.median_perplexity is None else round(result.median_perplexity, 3)}"
    )
    print(f"output: {result.output_path}\nquarantine: {result.quarantine_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
