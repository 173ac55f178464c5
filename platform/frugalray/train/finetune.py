"""finetune: LoRA / QLoRA on Ray Train under an honest FLOP ledger.

    cfg = parse_config(FinetuneConfig, {"data_path": "selected.jsonl", "max_steps": 20})
    result = run_finetune(cfg, run_dir)          # -> FinetuneResult; adapter at run_dir/adapter

The job reads top to bottom: preflight the config (files, fields, sizes: every problem is
a `ConfigError` before any Ray work), start a Ray Train `TorchTrainer` whose workers each
run `finetune_worker` (the loop in `frugalray.train.loop`), let rank 0 report the PEFT
adapter inside a Ray Train `Checkpoint`, copy it to `run_dir/adapter` for serving, and
record what the run spent in the ledger (training plus evaluation forward passes).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from frugalray.config import ConfigError, StrictModel
from frugalray.data.loaders import FieldMapping
from frugalray.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


class FinetuneConfig(StrictModel):
    model: str = DEFAULT_MODEL
    data_path: str
    # Held-out rows for the eval loss (their first `eval_rows`); without it, `eval_rows`
    # rows of data_path are held out of training (chosen by `seed`).
    eval_path: str | None = None
    # Which columns hold prompt/response; None picks prompt/response when the data has a
    # `prompt` column (frugalray's own select output), else instruction/input/response.
    fields: FieldMapping | None = None
    method: Literal["qlora", "lora"] = "qlora"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # QLoRA matmul dtype. auto: bfloat16 where matmuls are native in bf16 (CUDA, AVX512-BF16,
    # AMX), else float32: on an AVX2-only CPU bf16 compute made each step ~27x slower.
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1, description="rows per worker per step")
    seq_len: int = Field(128, ge=8, le=8192)
    num_workers: int = Field(1, ge=1, le=2)
    seed: int = 0
    eval_rows: int = Field(8, ge=0)
    # Torch threads per worker; None: this machine's cores / num_workers.
    cpu_threads: int | None = Field(None, ge=1)


class FinetuneResult(BaseModel):
    adapter_path: str
    checkpoint_path: str
    steps: int
    losses: list[float]
    first_loss: float
    final_loss: float
    eval_loss_before: float | None
    eval_loss_after: float | None
    tokens: int
    flops: float  # training + evaluation
    train_flops: float
    eval_flops: float
    wall_s: float
    step_seconds: list[float]  # rank 0's wall time per optimizer step
    trainable_params: int
    compute_dtype: str


@dataclass
class PreparedData:
    model_path: str
    train_rows: list[dict[str, str]]
    eval_rows: list[dict[str, str]]
    quarantined: int


def _fields_for(path: str, fields: FieldMapping | None) -> FieldMapping:
    if fields is not None:
        return fields
    from frugalray.data.loaders import _columns, read_rows

    columns = _columns(read_rows(path, "data_path")[:64])
    return FieldMapping.prompt_response() if "prompt" in columns else FieldMapping()


def _load(path: str, fields: FieldMapping | None, path_field: str) -> tuple[list[dict[str, str]], int]:
    from frugalray.data.loaders import load_records

    loaded = load_records(path, _fields_for(path, fields), path_field=path_field, fields_prefix="fields")
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in loaded.rows]
    return rows, len(loaded.quarantined)


def split_eval(rows: list[dict], eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold `eval_rows` rows out of training, chosen by seed (train, eval)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_rows])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order[:eval_rows]]


def preflight_finetune(cfg: FinetuneConfig, field_prefix: str = "") -> PreparedData:
    """Resolve the model and read the data, or raise one ConfigError listing every problem."""
    from frugalray.models import model_shape, resolve_model

    problems: list[str] = []
    model_path = None
    try:
        model_path = resolve_model(cfg.model, field=f"{field_prefix}model")
    except ConfigError as err:
        problems += err.problems
    if model_path is not None:
        try:
            model_shape(model_path).lora_params(cfg.lora_rank, cfg.target_modules)
        except ValueError as err:
            problems.append(f"{field_prefix}{err}")

    train_rows: list[dict[str, str]] = []
    eval_rows: list[dict[str, str]] = []
    quarantined = 0
    for path, name in ((cfg.data_path, "data_path"), (cfg.eval_path, "eval_path")):
        if path is not None and not Path(path).exists():
            problems.append(f"{field_prefix}{name}: '{path}' does not exist; point it at a .jsonl/.json/.parquet file")
    if not problems:
        try:
            train_rows, quarantined = _load(cfg.data_path, cfg.fields, f"{field_prefix}data_path")
            if cfg.eval_path is not None:
                eval_rows = _load(cfg.eval_path, cfg.fields, f"{field_prefix}eval_path")[0][: cfg.eval_rows]
            else:
                if cfg.eval_rows and len(train_rows) <= cfg.eval_rows:
                    problems.append(
                        f"{field_prefix}eval_rows: {cfg.eval_rows} held-out rows would leave no training rows "
                        f"({len(train_rows)} usable in data_path); lower eval_rows or set eval_path"
                    )
                train_rows, eval_rows = split_eval(train_rows, cfg.eval_rows, cfg.seed)
        except ConfigError as err:
            problems += [p if p.startswith(field_prefix) else f"{field_prefix}{p}" for p in err.problems]
        if not problems and not train_rows:
            problems.append(f"{field_prefix}data_path: '{cfg.data_path}' has no usable rows; check fields")
    if not problems and model_path is not None:
        problems += _check_seq_len(cfg, model_path, train_rows, field_prefix)
    if problems:
        raise ConfigError(problems)
    assert model_path is not None
    return PreparedData(model_path, train_rows, eval_rows, quarantined)


def _check_seq_len(cfg: FinetuneConfig, model_path: str, rows: list[dict], field_prefix: str) -> list[str]:
    """A seq_len that truncates every response away would train on nothing (NaN loss)."""
    from frugalray.data.formatting import IGNORE_INDEX, tokenize_example
    from frugalray.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    sample = rows[:32]
    usable = sum(
        any(t != IGNORE_INDEX for t in tokenize_example(tokenizer, r["prompt"], r["response"], cfg.seq_len)["labels"])
        for r in sample
    )
    if usable == 0:
        message = (
            f"{field_prefix}seq_len: {cfg.seq_len} tokens cut off every response in the first {len(sample)} "
            "rows (the prompt alone fills them); raise seq_len"
        )
        return [message]
    return []


def finetune_worker(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`: N steps, eval before/after, rank 0 checkpoints the adapter."""
    import tempfile

    import ray.train
    from tqdm import tqdm

    from frugalray.train.loop import LoraTrainingSession

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config["cfg"]
    session = LoraTrainingSession(
        cfg, config["model_path"], config["train_rows"], config["eval_rows"], rank, world, cfg.get("cpu_threads")
    )
    before = session.evaluate()
    losses: list[float] = []
    tokens, train_flops, step_seconds = 0, 0.0, []
    progress = tqdm(range(1, int(cfg["max_steps"]) + 1), desc="finetune", disable=rank != 0)
    for step in progress:
        started = time.time()
        stats = session.step()
        step_seconds.append(time.time() - started)
        losses.append(stats.loss)
        tokens += stats.tokens
        train_flops += stats.flops
        progress.set_postfix(loss=f"{stats.loss:.4f}", s_per_step=f"{step_seconds[-1]:.1f}")
        if step < int(cfg["max_steps"]):
            # Every rank reports each step (report is a barrier across workers).
            ray.train.report({"step": step, "loss": stats.loss, "tokens": tokens, "flops": train_flops})
    after = session.evaluate()
    metrics = {
        "step": session.steps_done,
        "loss": losses[-1],
        "losses": losses,
        "tokens": tokens,
        "flops": train_flops,
        "eval_loss_before": before.loss if before else None,
        "eval_loss_after": after.loss if after else None,
        "eval_flops": (before.flops if before else 0.0) + (after.flops if after else 0.0),
        "eval_tokens": (before.tokens if before else 0) + (after.tokens if after else 0),
        "step_seconds": step_seconds,
        "trainable_params": session.trainable_params,
        "compute_dtype": session.compute_dtype,
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            session.save_adapter(str(Path(tmp) / ADAPTER_DIR))
            (Path(tmp) / "finetune_config.json").write_text(json.dumps(cfg, indent=1, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="final")


def run_finetune(cfg: FinetuneConfig, run_dir: str | Path, ledger=None) -> FinetuneResult:
    """Fine-tune with Ray Train; return the result and write `run_dir/adapter` + a ledger record."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from frugalray.budget.ledger import ComputeLedger
    from frugalray.ray_utils import init_ray

    started = time.time()
    run_dir = Path(run_dir).resolve()
    data = preflight_finetune(cfg)
    init_ray()  # only after every check passed (a no-op when Ray is already up)
    log.info(
        "finetune %s (%s, rank %d) on %d rows, %d eval rows, %d steps x %d workers",
        cfg.model, cfg.method, cfg.lora_rank, len(data.train_rows), len(data.eval_rows), cfg.max_steps, cfg.num_workers,
    )
    trainer = TorchTrainer(
        finetune_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "model_path": data.model_path,
            "train_rows": data.train_rows,
            "eval_rows": data.eval_rows,
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(run_dir / "ray_train"), name=f"finetune-{int(started)}"),
    )
    result = trainer.fit()
    metrics = result.metrics
    if result.checkpoint is None:
        raise RuntimeError("finetune: Ray Train finished without a checkpoint; see the worker logs above")
    checkpoint_path = Path(result.checkpoint.path)
    adapter = run_dir / ADAPTER_DIR
    if adapter.exists():
        shutil.rmtree(adapter)
    shutil.copytree(checkpoint_path / ADAPTER_DIR, adapter)

    losses = [float(x) for x in metrics["losses"]]
    if not all(math.isfinite(x) for x in losses):
        log.warning("non-finite training loss: %s", losses)
    eval_flops = float(metrics["eval_flops"])
    train_flops = float(metrics["flops"])
    wall_s = time.time() - started
    out = FinetuneResult(
        adapter_path=str(adapter),
        checkpoint_path=str(checkpoint_path),
        steps=int(metrics["step"]),
        losses=losses,
        first_loss=losses[0],
        final_loss=losses[-1],
        eval_loss_before=metrics.get("eval_loss_before"),
        eval_loss_after=metrics.get("eval_loss_after"),
        tokens=int(metrics["tokens"]),
        flops=train_flops + eval_flops,
        train_flops=train_flops,
        eval_flops=eval_flops,
        wall_s=wall_s,
        step_seconds=[float(s) for s in metrics.get("step_seconds", [])],
        trainable_params=int(metrics["trainable_params"]),
        compute_dtype=str(metrics["compute_dtype"]),
    )
    step_seconds = out.step_seconds
    ledger = ledger or ComputeLedger(run_dir)
    ledger.record(
        "finetune",
        flops=out.flops,
        tokens=out.tokens + int(metrics.get("eval_tokens", 0)),
        wall_s=wall_s,
        produced={"adapter_path": out.adapter_path, "checkpoint_path": out.checkpoint_path},
        train_flops=train_flops,
        eval_flops=eval_flops,
        train_tokens=out.tokens,
        method=cfg.method,
        compute_dtype=out.compute_dtype,
        steps=out.steps,
        num_workers=cfg.num_workers,
        first_loss=out.first_loss,
        final_loss=out.final_loss,
        eval_loss_before=out.eval_loss_before,
        eval_loss_after=out.eval_loss_after,
        mean_step_s=sum(step_seconds) / len(step_seconds) if step_seconds else None,
    )
    log.info(
        "finetune done: loss %.4f -> %.4f, eval %s -> %s, %.3g FLOPs, %.0fs; adapter at %s",
        out.first_loss, out.final_loss, out.eval_loss_before, out.eval_loss_after, out.flops, wall_s, adapter,
    )
    return out
