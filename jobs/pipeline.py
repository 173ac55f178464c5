"""Ray Job entrypoint for the main job: generate -> score -> select -> sweep -> finetune -> serve.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config jobs/configs/pipeline_small.yaml

Inside a submitted job, $RAY_ADDRESS points at the cluster and the pipeline joins it;
run directly (`python jobs/pipeline.py --config ...`) it starts a local Ray cluster.
"""

from __future__ import annotations

import argparse
import logging
import sys

from frugalray.config import ConfigError, load_config
from frugalray.pipeline import PipelineConfig, run_pipeline, summary_exit_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (jobs/configs/pipeline.yaml)")
    parser.add_argument("--run-dir", default=None, help="overrides run_dir from the config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 1. validate everything before any Ray work
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        # 2-4. run the stages, print the summary, write summary.json and the ledger
        summary = run_pipeline(cfg, run_dir=args.run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return summary_exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
