"""Ray Job: keep scored rows under a row, token or training-FLOP budget, ranked by a score column.

    python jobs/select_data.py --config jobs/configs/select.yaml --run-dir runs/data

Reads what `jobs/score.py` wrote; pure Python on the driver (no Ray work), 0 FLOPs, except
`strategy: auto`, whose proxy fine-tunes run in this process and are costed in the ledger.
Not named `select.py`: a script's folder is first on sys.path, and a `jobs/select.py` would
shadow the standard library's `select` module for every job in this folder.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from frugalray.config import ConfigError
from frugalray.data.select import run_select
from frugalray.stages import config_from_args, job_parser


def main(argv: list[str] | None = None) -> int:
    args = job_parser("select", __doc__).parse_args(argv)  # --config, --run-dir, --set: frugalray.stages
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. Validate the config, 2. select (the input is checked inside, before anything is written).
    try:
        cfg = config_from_args("select", args)
        result = run_select(cfg, args.run_dir)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except RuntimeError as err:  # the row accounting did not add up
        print(err, file=sys.stderr)
        return 1

    # 3. Summary.
    report = json.loads(Path(result.report_path).read_text())
    chosen = f"{result.strategy} {result.score}" + (" (strategy auto's winner)" if cfg.strategy == "auto" else "")
    print(f"kept {result.kept}/{result.rows_in} rows ({result.kept_tokens} tokens) by {chosen}")
    if result.token_limit is not None:
        spent = f"; training them costs {result.train_flops:.3e} of {cfg.budget.flops:.3e} FLOPs" if cfg.budget else ""
        print(f"token budget {result.token_limit} (kept {result.kept_tokens}){spent}")
    if report.get("auto"):
        auto = report["auto"]
        print(f"auto: {auto['why']}; proxy experiment cost {auto['flops']:.3e} FLOPs")
        for c in auto["candidates"]:
            print(f"  {c['name']:<14} kept {c['kept']:>5}  eval loss {c['eval_loss']}  accuracy {c['accuracy']}"
                  + (f"  skipped: {c['skipped']}" if c["skipped"] else ""))
    # Nothing lost: run_select has already checked this equality against the scoring sidecar.
    rows_in = result.source_rows_in if result.source_rows_in is not None else result.rows_in
    print(f"rows_in = kept + dropped + quarantined: {rows_in} = {result.kept} + {result.dropped} + {result.quarantined}"
          f" (dropped by reason: {result.drop_reasons or 'none'})")
    if "noise" in report:
        dropped = {k: f"{v['dropped']}/{v['in']}" for k, v in report["noise"].items()}
        print(f"dropped by noise kind: {dropped}")
    print(f"output: {result.output_path}\nreport: {result.report_path} ({result.markdown_report_path})")
    if result.histogram_paths:
        print(f"histograms: {', '.join(result.histogram_paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
