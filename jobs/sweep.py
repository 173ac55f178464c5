"""Ray Job: a Ray Tune hyperparameter sweep whose trials share one FLOP cap that is never exceeded.

    python jobs/sweep.py --config jobs/configs/sweep.yaml --run-dir runs/sweep
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep.yaml

Each trial trains in chunks and reserves each chunk's FLOPs (an upper bound) from a shared
budget first; a trial whose reservation is refused stops and says it was stopped by the cap.
"""

from __future__ import annotations

import argparse
import logging
import sys

from frugalray.config import ConfigError, load_config
from frugalray.ray_utils import init_ray
from frugalray.tune.sweep import SweepConfig, preflight_sweep, run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file of SweepConfig fields")
    parser.add_argument("--run-dir", default="runs/sweep", help="where Tune results and the ledger go")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. Validate the config, the data and the cap (it must pay for one step) before any Ray work.
    try:
        cfg = load_config(SweepConfig, args.config, args.set)
        _, _, min_trial_flops = preflight_sweep(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"flop_cap {cfg.flop_cap:.3g} FLOPs; the cheapest trial chunk costs at most {min_trial_flops:.3g}")

    # 2. Join (or start) the cluster, then search.
    init_ray()
    result = run_sweep(cfg, args.run_dir)

    # 3. Summary: one line per trial, then the winner and the spend against the cap.
    for t in result.trials:
        metric = "n/a" if t.metric is None else f"{t.metric:.4f}"
        flag = " (stopped by the cap)" if t.stopped_by_cap else ""
        error = f" ERROR: {t.error}" if t.error else ""
        print(f"  {t.config}: {cfg.metric} {metric} after {t.steps} steps, {t.flops:.3g} FLOPs{flag}{error}")
    print(
        f"best {cfg.metric} {result.best_metric} with {result.best_config}; spent {result.flops_spent:.3g} "
        f"of the {result.flop_cap:.3g} FLOP cap in {result.wall_s:.1f}s (held {result.flops_reserved:.3g} "
        f"in upper-bound reservations, {result.flops_released:.3g} of them handed back unspent)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
