r"""Ray Job entrypoint for the main job: generate -> score -> select -> sweep -> finetune -> serve.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/pipeline_small.yaml

Inside a submitted job, $RAY_ADDRESS points at the cluster and the pipeline joins it;
run directly (`python jobs/pipeline.py --config ...`) it starts a local Ray cluster.
"""

from __future__ import annotations

import logging
import sys

from frugalray.config import ConfigError
from frugalray.pipeline import run_pipeline, summary_exit_code
from frugalray.stages import config_from_args, job_parser


def main(argv: list[str] | None = None) -> int:
    args = job_parser("pipeline", __doc__).parse_args(argv)  # --config, --run-dir, --set: frugalray.stages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 1. validate everything before any Ray work
    try:
        cfg = config_from_args("pipeline", args)
        # 2-4. run the stages, print the summary, write summary.json and the ledger
        summary = run_pipeline(cfg, run_dir=args.run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return summary_exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
