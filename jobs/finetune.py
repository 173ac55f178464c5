"""Ray Job: full / LoRA / QLoRA fine-tuning with Ray Train (FSDP2 for num_workers > 1).

    python jobs/finetune.py --config jobs/configs/finetune.yaml --run-dir runs/finetune
    python jobs/finetune.py --config jobs/configs/finetune.yaml --set num_workers=2 --set checkpoint_every=5
    python jobs/finetune.py --config jobs/configs/finetune.yaml --resume-from runs/finetune --set max_steps=40
    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune.yaml

The adapter lands in <run-dir>/adapter (the full model in <run-dir>/model for method: full);
resumable checkpoints (adapter, optimizer, LR schedule, data position, RNG) under
<run-dir>/ray_train; every step's loss/tokens/FLOPs in <run-dir>/steps.jsonl.

The default data is the select job's output (runs/data/selected.jsonl); run jobs/score.py
and jobs/select_data.py first, or point data_path at any .jsonl/.json/.parquet dataset.
"""

from __future__ import annotations

import logging
import sys

from frugalray.config import ConfigError
from frugalray.ray_utils import init_ray
from frugalray.stages import config_from_args, job_parser
from frugalray.train.finetune import preflight_finetune, run_finetune


def main(argv: list[str] | None = None) -> int:
    # --config, --run-dir, --set and --resume-from (frugalray.stages)
    args = job_parser("finetune", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. Validate the config, the model and the data before any Ray work.
    try:
        cfg = config_from_args("finetune", args)  # --resume-from sets resume_from
        preflight_finetune(cfg)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2

    # 2. Join (or start) the cluster, then train.
    init_ray()
    result = run_finetune(cfg, args.run_dir)

    # 3. Summary.
    mean_step = sum(result.step_seconds) / len(result.step_seconds) if result.step_seconds else float("nan")
    print(
        f"finetuned {cfg.model} ({cfg.method}, rank {cfg.lora_rank}) for {result.steps} steps: "
        f"train loss {result.first_loss:.4f} -> {result.final_loss:.4f}, eval loss "
        f"{result.eval_loss_before} -> {result.eval_loss_after}; {result.tokens} tokens, "
        f"{result.flops:.3g} FLOPs, {result.wall_s:.1f}s ({mean_step:.2f} s/step)"
    )
    if result.restarts or result.start_step:
        print(f"resumed at step {result.start_step}; {result.restarts} restart(s), {result.repeated_steps} step(s) redone")
    print(f"adapter: {result.adapter_path}\ncheckpoint: {result.checkpoint_path}")
    if result.merged_path:
        print(f"merged model: {result.merged_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
