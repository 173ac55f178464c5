"""Ray Job: score every row of a dataset (perplexity, IFD, GraNd, learning dynamics, influence,
heuristics, duplicates) on a Ray Data actor pool; malformed rows go to a quarantine file.

    python jobs/score.py --config jobs/configs/score.yaml --run-dir runs/data
    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/score.yaml

The default input is the built-in task set; make it first with `frugalray data generate`.
Killed mid-run? Run the same command again: finished output shards are kept, not rescored.
"""

from __future__ import annotations

import logging
import sys

from frugalray.config import ConfigError
from frugalray.data.score import run_score
from frugalray.stages import config_from_args, job_parser


def main(argv: list[str] | None = None) -> int:
    args = job_parser("score", __doc__).parse_args(argv)  # --config, --run-dir, --set: frugalray.stages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. Validate the config and the data before any Ray work.
    try:
        cfg = config_from_args("score", args)
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
