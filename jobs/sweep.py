"""Ray Job: a Ray Tune hyperparameter sweep whose trials share one FLOP cap that is never exceeded.

    python jobs/sweep.py --config jobs/configs/sweep.yaml --run-dir runs/sweep
    python jobs/sweep.py --config jobs/configs/sweep.yaml --run-dir runs/sweep --flop-caps 1e12,2e12,3e12
    python jobs/sweep.py --resume runs/sweep          # after the driver was killed
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep.yaml

Each trial trains in chunks and reserves each chunk's FLOPs (an upper bound) from a shared
budget first; a trial whose reservation is refused stops and says it was stopped by the cap.
The budget journals every hold in the run directory, so a resumed sweep never exceeds the cap.
"""

from __future__ import annotations

import logging
import sys

from frugalray.config import ConfigError
from frugalray.stages import job_parser, sweep_command


def main(argv: list[str] | None = None) -> int:
    # --config, --run-dir, --set, --resume and --flop-caps (frugalray.stages)
    args = job_parser("sweep", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1-2. Validate config, data and caps before any Ray work (run_sweep does it first), then
    # join (or start) the cluster and search; or resume the sweep a dead driver left behind.
    try:
        result = sweep_command(args.config, args.run_dir, args.overrides, args.resume, args.flop_caps)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    # 3. Summary: one line per trial, then the winner, the spend against the cap and the reports.
    for t in result.trials:
        metric = "n/a" if t.metric is None else f"{t.metric:.4f}"
        flag = " (stopped by the cap)" if t.stopped_by_cap else ""
        error = f" ERROR: {t.error}" if t.error else ""
        print(f"  {t.config}: {result.metric} {metric} after {t.steps} steps, {t.flops:.3g} FLOPs{flag}{error}")
    print(
        f"best {result.metric} {result.best_metric} with {result.best_config}; spent {result.flops_spent:.3g} "
        f"of the {result.flop_cap:.3g} FLOP cap in {result.wall_s:.1f}s (held {result.flops_reserved:.3g} "
        f"in upper-bound reservations, {result.flops_released:.3g} of them handed back unspent)"
    )
    if result.resumed:
        print(f"resumed: {result.flops_charged_at_restart:.3g} FLOPs of chunks the dead driver left open were charged in full")
    if result.stopped_by_fit:
        print(f"the scaling fit ended the sweep early: {result.stopped_by_fit}")
    if result.ladder is not None:
        for rung in result.ladder.rungs:
            print(f"  cap {rung.cap:.3g}: best {rung.best_metric} with {rung.best_config} ({rung.status})")
        for line in result.ladder.winner_changes or ["the winning configuration is the same at every cap"]:
            print(f"  {line}")
    for name, path in result.reports.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
