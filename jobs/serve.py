r"""Ray Job: deploy the Serve application (Ray Serve LLM + vLLM behind the frugalray ingress).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/serve.py --config serve/config.yaml

The application outlives this driver (Serve runs detached on the cluster): the job exits
once the engine answers, printing the OpenAI base URL. `serve run serve/config.yaml` and
`frugalray serve` do the same in the foreground.
"""

from __future__ import annotations

import logging
import sys

from frugalray.config import ConfigError
from frugalray.serve.app import deploy
from frugalray.stages import config_from_args, job_parser


def main(argv: list[str] | None = None) -> int:
    args = job_parser("serve", __doc__).parse_args(argv)  # --config, --set: frugalray.stages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. Validate the application's args (model, adapters, ceilings) before any Ray work.
    try:
        cfg = config_from_args("serve", args)  # applications[0].args
        # 2. Join (or start) the cluster and deploy; returns when the engine is up.
        url = deploy(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    # 3. Summary.
    print(f"serving {cfg.model_name} and adapters {sorted(cfg.adapters)} at {url}")
    if cfg.api_key_env or cfg.api_key:
        where = f"${cfg.api_key_env}" if cfg.api_key_env else "the config's api_key"
        print(f"clients need `Authorization: Bearer <key>` (the key in {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
