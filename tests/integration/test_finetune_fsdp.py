"""FSDP2 on Ray Train follows single-process training step for step (LoRA and QLoRA).

The reference is the same `TrainingSession` run in this process without any process group
(no FSDP): one rank reading the whole global batch of 4 rows. The FSDP run has 2 Ray Train
workers (gloo) reading 2 rows each. Same data, seed, global batch and learning rate.

Tolerance: per-step |loss_fsdp - loss_single| <= 0.02 + 2% of the single loss, every step.
Float reduction order differs (sharded all-gather, summed gradients), so the curves are not
bit-identical, but a broken gradient path (stale optimizer parameters, shards summed into
the wrong rows, mean-of-means normalization) moves them apart by far more within 20 steps.
"""

from __future__ import annotations

import json
import math

import pytest
from frugalray.config import parse_config
from frugalray.train.finetune import FinetuneConfig, preflight_finetune, run_finetune

STEPS = 20
# Room for one spurious restart: on a loaded machine Ray Train 2.60 sometimes loses a fresh
# worker group at start-up ("Destroying worker since its placement group was removed") when
# a second TorchTrainer run starts right after another in the same driver. A restart before
# any step is invisible in the results; a deterministic bug still fails every attempt.
MAX_FAILURES = 2


def write_rows(path, n: int) -> str:
    with open(path, "w") as fh:
        for i in range(n):
            a, b = i % 7 + 1, i % 5 + 2
            row = {"prompt": f"What is {a} + {b}?", "response": f"{a} plus {b} is {a + b}." + " Done." * (i % 3)}
            fh.write(json.dumps(row) + "\n")
    return str(path)


def base_cfg(model_path: str, data: str, method: str, **over) -> dict:
    cfg = {
        "model": model_path,
        "data_path": data,
        "method": method,
        "lora_rank": 4,
        "lora_alpha": 8,
        "learning_rate": 3e-4,
        "max_steps": STEPS,
        "batch_size": 4,
        "seq_len": 64,
        "eval_rows": 0,
        "cpu_threads": 1,
        "compute_dtype": "float32",
    }
    cfg.update(over)
    return cfg


def single_process_losses(cfg: FinetuneConfig) -> list[float]:
    from frugalray.train.loop import TrainingSession

    data = preflight_finetune(cfg)
    # Nothing else runs while the reference does: two threads take 21 s for 20 steps instead of 30-38 s
    # with one, and the losses agree with the one-thread run to 4 decimals (measured).
    session = TrainingSession(cfg, data.model_path, data.train_rows, [], threads=2)
    return [session.step().loss for _ in range(cfg.max_steps)]


def assert_parity(single: list[float], fsdp: list[float], label: str) -> None:
    print(f"\n{label}: step  single  fsdp(2 workers)  diff")
    for i, (a, b) in enumerate(zip(single, fsdp), 1):
        print(f"{label}: {i:4d}  {a:.5f}  {b:.5f}  {b - a:+.2e}")
    assert len(fsdp) == len(single) == STEPS
    assert all(math.isfinite(x) for x in fsdp)
    # The reference learns, so parity is not two flat lines: each epoch (12 rows / batch 4 = 3 steps)
    # sees every row once whatever the shuffle, so a run that does not learn has equal epoch means
    # (up to how rows group into batches); the 6th epoch's must be at least 10% below the 1st's.
    first, last = sum(single[0:3]) / 3, sum(single[15:18]) / 3
    assert last < 0.9 * first, (label, first, last)
    for a, b in zip(single, fsdp):
        assert abs(a - b) <= 0.02 + 0.02 * abs(a), (label, single, fsdp)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_fsdp_two_workers_follow_the_single_process_curve(ray_cluster, default_model_path, tmp_path, method):
    data = write_rows(tmp_path / "train.jsonl", 12)
    single_cfg = parse_config(FinetuneConfig, base_cfg(default_model_path, data, method))
    single = single_process_losses(single_cfg)

    fsdp_cfg = parse_config(FinetuneConfig, base_cfg(default_model_path, data, method, batch_size=2, num_workers=2,
                                                            max_failures=MAX_FAILURES))
    result = run_finetune(fsdp_cfg, tmp_path / "run")
    assert result.fsdp and result.num_workers == 2
    assert_parity(single, result.losses, method)
    # FSDP-friendly loading: rank 1 never holds the full-precision model (meta init + rank 0's broadcast
    # for LoRA; rank 0's 4-bit checkpoint for QLoRA), so loading grows it far less than rank 0.
    growth = {int(r["rank"]): r["load_growth_mb"] for r in result.host_ram_mb}
    print(f"{method} load growth per rank (MiB): {growth}")
    assert growth[1] < 0.7 * growth[0], growth
    # The adapter gathered from the shards is complete and loads with PEFT.
    from safetensors.torch import load_file

    weights = load_file(f"{result.adapter_path}/adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == result.trainable_params
