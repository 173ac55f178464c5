"""Ray Job: score a dataset by a reference model's perplexity (Ray Data actor pool).

    python jobs/score.py --config jobs/configs/score.yaml --run-dir runs/data
    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/score.yaml

The default input is the built-in task set; make it first with `frugalray data generate`.
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

    # 3. Summary.
    print(
        f"scored {result.rows_scored}/{result.rows_in} rows ({result.rows_quarantined} quarantined: "
        f"{result.quarantine_reasons or 'none'}); {result.tokens} tokens, {result.flops:.3g} FLOPs, "
        f"{result.wall_s:.1f}s ({result.tokens_per_s:.0f} tokens/s); median perplexity "
        f"{result.median_perplexity if result.median_perplexity is None else round(result.median_perplexity, 3)}"
    )
    print(f"output: {result.output_path}\nquarantine: {result.quarantine_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
