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

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, StrictModel
from frugalray.devices import (
    LocalDevices,
    Placement,
    cluster_devices,
    local_devices,
    require_cuda,
    resolve_dtype,
    resolve_placement,
    target_fast_bf16,
)
from frugalray.examples.formatting import IGNORE_INDEX, tokenize_example
from frugalray.examples.loaders import FieldMapping, _columns, load_records, read_rows
from frugalray.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, model_shape, resolve_model
from frugalray.ray_utils import init_ray, reserve_target
from frugalray.train.checkpointing import ADAPTER_DIR as CKPT_ADAPTER_DIR
from frugalray.train.checkpointing import FULL_MODEL_DIR, checkpoint_step, find_latest_checkpoint
from frugalray.train.loop import TrainingSession
from frugalray.train.memory_plan import memory_problems
from frugalray.train.spec import TrainingSpec

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


class KillWorker(StrictModel):
    """Testing: rank `rank` SIGKILLs its own process at the start of step `at_step`, once.

    The `marker` file records that it happened, so the restarted worker does not die again.
    """

    at_step: int = Field(ge=1)
    rank: int = Field(0, ge=0)
    marker: str


class FinetuneConfig(TrainingSpec):
    """A training run (`TrainingSpec`: method, LoRA, optimizer, schedule, batch, seq_len, dtype,
    device, seed) plus where its model, data and workers are. YAML keys stay flat."""

    model: str = DEFAULT_MODEL
    data_path: str
    # Held-out rows for the eval loss (their first `eval_rows`); without it, `eval_rows`
    # rows of data_path are held out of training (chosen by `seed`).
    eval_path: str | None = None
    # Which columns hold prompt/response; None picks prompt/response when the data has a
    # `prompt` column (frugalray's own select output), else instruction/input/response.
    fields: FieldMapping | None = None
    # >1 shards the model with FSDP2 across Ray Train workers (gloo on CPU, NCCL on GPU).
    num_workers: int = Field(1, ge=1)
    # Where Ray puts the workers: PACK fills as few nodes as possible (least traffic); SPREAD puts
    # them on different nodes where it can (one lost node then takes fewer workers down with it).
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    # Rows scored for the eval loss before and after training (0: no eval loss).
    eval_rows: int = Field(8, ge=0)
    # Torch threads per worker; None: this machine's cores / num_workers.
    cpu_threads: int | None = Field(None, ge=1)
    # Save a resumable checkpoint every N steps (0: only at the end).
    checkpoint_every: int = Field(0, ge=0)
    # Ray Train restarts the workers from the latest checkpoint up to this many times.
    max_failures: int = Field(0, ge=0)
    # A run directory or checkpoint directory to continue from (finished or stopped runs).
    resume_from: str | None = None
    # Also write base + adapter merged into one HF model at run_dir/merged.
    export_merged: bool = False
    # Memory per device the planner checks the config against ("24GiB"); None: what the target device has
    # (the GPU node's memory, probed there, or its accelerator type's; this host's RAM on CPU).
    device_memory: str | None = None
    # How long to wait for the cluster (its autoscaler) to provide the workers' resources before refusing.
    capacity_timeout_s: float = Field(900.0, gt=0, description=(
        "seconds to wait for the cluster (its autoscaler) to provide every worker's resources before refusing"))
    # qlora: before training, score the eval rows with the 4-bit base and with the same base
    # unquantized (loaded once more, at compute_dtype), and log what quantization costs in eval loss.
    measure_quantization_error: bool = False
    # Testing only: kill a worker process mid-run to exercise recovery.
    inject_fault: KillWorker | None = None


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
    method: str = "qlora"
    num_workers: int = 1
    fsdp: bool = False
    merged_path: str | None = None
    resumed_from: str | None = None  # checkpoint this run started from (resume_from)
    start_step: int = 0  # optimizer steps already done when this run started
    steps_file: str | None = None  # per-step records of every attempt (JSONL)
    restarts: int = 0  # worker-group restarts Ray Train made after failures
    repeated_steps: int = 0  # steps computed twice because a failure lost them
    host_ram_mb: list[dict[str, float]] = []  # per rank: RSS after loading and sharding, and its growth
    # measure_quantization_error: eval_loss_4bit, eval_loss_full, eval_loss_increase (before training)
    quantization: dict[str, float] | None = None


@dataclass
class PreparedData:
    model_path: str
    train_rows: list[dict[str, str]]
    eval_rows: list[dict[str, str]]
    quarantined: int


def _fields_for(path: str, fields: FieldMapping | None) -> FieldMapping:
    if fields is not None:
        return fields

    columns = _columns(read_rows(path, "data_path")[:64])
    return FieldMapping.prompt_response() if "prompt" in columns else FieldMapping()


def _load(path: str, fields: FieldMapping | None, path_field: str) -> tuple[list[dict[str, str]], int]:

    loaded = load_records(path, _fields_for(path, fields), path_field=path_field, fields_prefix="fields")
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in loaded.rows]
    return rows, len(loaded.quarantined)


def split_eval(rows: list[dict], eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold `eval_rows` rows out of training, chosen by seed (train, eval)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_rows])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order[:eval_rows]]


def preflight_finetune(cfg: FinetuneConfig, field_prefix: str = "", target: LocalDevices | None = None) -> PreparedData:
    """Resolve the model and read the data, or raise one ConfigError listing every problem.

    The device checks (4-bit kernels, optimizer, memory) run against `target`, the node the workers will
    run on; None: this process, except that `device: cuda` asked from a machine without CUDA (a CPU head)
    leaves them to `run_finetune`, which probes the GPU node once Ray placed it.
    """

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
    problems += resume_problems(cfg, field_prefix)
    here = target or local_devices()
    if target is not None or cfg.device != "cuda" or here.cuda:
        problems += device_problems(cfg, here, model_path if not problems else None, field_prefix=field_prefix)
    if problems:
        raise ConfigError(problems)
    assert model_path is not None
    return PreparedData(model_path, train_rows, eval_rows, quarantined)


def _check_seq_len(cfg: FinetuneConfig, model_path: str, rows: list[dict], field_prefix: str) -> list[str]:
    """A seq_len that truncates every response away would train on nothing (NaN loss)."""

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



def target_device(device: str, cuda: bool) -> str:
    return "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"


def device_problems(cfg: FinetuneConfig, node: LocalDevices, model_path: str | None, *,
                    device_memory: int | None = None, field_prefix: str = "") -> list[str]:
    """What cannot work on `node` (the target's devices): options it lacks kernels for, and, with a
    model, a run the memory planner predicts not to fit (`cfg.device_memory`, else `device_memory`, else
    what the node has)."""
    problems = option_problems(cfg, set(node.four_bit), node.cuda, field_prefix)
    if problems or model_path is None:
        return problems
    device = target_device(cfg.device, node.cuda)
    memory = cfg.device_memory or device_memory
    # The memory planner: refuse, before any worker starts, what is predicted not to fit.
    return memory_problems(cfg, model_path, num_workers=cfg.num_workers, device_memory=memory,
                           device=device, field_prefix=field_prefix)


def option_problems(cfg: FinetuneConfig, four_bit_devices: set[str], cuda: bool, field_prefix: str = "") -> list[str]:
    """Combinations of training options that cannot work here, each naming its field (pure)."""
    p = field_prefix
    problems: list[str] = []
    device = target_device(cfg.device, cuda)
    if cfg.device == "cuda" and not cuda:
        problems.append(f"{p}device: 'cuda' but the node it runs on has no CUDA device; use 'cpu' or 'auto'")
    if cfg.method == "qlora" and device not in four_bit_devices:
        problems.append(
            f"{p}method: qlora needs bitsandbytes 4-bit kernels on {device}, which this installation lacks "
            f"(has: {sorted(four_bit_devices) or 'none'}); use method 'lora' or a supported device"
        )
    if cfg.optimizer == "paged_adamw" and device != "cuda":
        problems.append(
            f"{p}optimizer: paged_adamw pages optimizer state between GPU and host memory and needs CUDA; "
            "use adamw or adamw_8bit on CPU"
        )
    if cfg.optimizer in ("adamw_8bit", "paged_adamw") and device not in four_bit_devices:
        problems.append(f"{p}optimizer: {cfg.optimizer} needs bitsandbytes on {device}; use adamw")
    if cfg.optimizer == "adamw_8bit" and cfg.num_workers > 1:
        problems.append(
            f"{p}optimizer: adamw_8bit updates plain tensors and cannot step FSDP-sharded (DTensor) "
            "parameters; use adamw with num_workers > 1, or num_workers: 1"
        )
    if cfg.length_bucketing and cfg.data_order == "as_given":
        problems.append(
            f"{p}length_bucketing: would reorder rows inside windows and break data_order 'as_given'; "
            "turn one of them off"
        )
    if cfg.export_merged and cfg.method == "full":
        problems.append(f"{p}export_merged: method 'full' already saves a complete model; drop export_merged")
    if cfg.warmup_steps > cfg.max_steps:
        problems.append(f"{p}warmup_steps: {cfg.warmup_steps} exceeds max_steps {cfg.max_steps}; lower it")
    if cfg.inject_fault is not None:
        if cfg.inject_fault.at_step > cfg.max_steps:
            problems.append(f"{p}inject_fault.at_step: beyond max_steps {cfg.max_steps}")
        if cfg.inject_fault.rank >= cfg.num_workers:
            problems.append(f"{p}inject_fault.rank: {cfg.inject_fault.rank} but only {cfg.num_workers} workers")
    return problems


def resume_problems(cfg: FinetuneConfig, field_prefix: str = "") -> list[str]:

    if cfg.resume_from is None:
        return []
    p = field_prefix
    if not Path(cfg.resume_from).exists():
        return [f"{p}resume_from: '{cfg.resume_from}' does not exist; give a finetune run directory or checkpoint"]
    found = find_latest_checkpoint(cfg.resume_from)
    if found is None:
        return [f"{p}resume_from: no checkpoint (train_state.pt) under '{cfg.resume_from}'"]
    step = checkpoint_step(found)
    if step is not None and step >= cfg.max_steps:
        return [f"{p}max_steps: the checkpoint at {found} already did {step} steps; raise max_steps above {step}"]
    return []


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def finetune_worker(config: dict[str, Any]) -> None:
    """Ray Train `train_loop_per_worker`: resume if there is a checkpoint, train, checkpoint, report."""
    import os
    import signal
    import tempfile
    import uuid

    import ray.train
    from tqdm import tqdm


    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = FinetuneConfig.model_validate(config["cfg"])  # crossed as JSON: re-validated at the door
    device = "cpu"
    if config["use_gpu"]:
        import ray.train.torch

        require_cuda(f"finetune worker {rank}", placed_for=config["resources_per_worker"])
        device = ray.train.torch.get_device()
    _import_model_code(config["model_path"], cfg.method)  # so the load growth below is weights, not code
    rss_before_load = _current_rss_mb()
    session = TrainingSession(
        cfg, config["model_path"], config["train_rows"], config["eval_rows"], rank, world,
        cfg.cpu_threads, device=device,
    )
    host_ram = _gather_host_ram(session, rss_before_load)  # per rank, right after loading + sharding
    # A restart inside this run (a worker died) resumes from Ray Train's latest checkpoint; otherwise
    # `resume_from` names where a stopped or finished run left off. (Ray Train v2 dropped
    # TorchTrainer(resume_from_checkpoint=...); the loop loads the path itself.)
    start = ray.train.get_checkpoint()
    if start is not None:
        with start.as_directory() as directory:
            session.load_checkpoint(directory)
    elif config["resume_checkpoint"]:
        session.load_checkpoint(config["resume_checkpoint"])
    extras = session.extras  # eval-before figures survive restarts inside the checkpoint
    if "eval_before" not in extras:
        before = session.evaluate() if session.steps_done == 0 else None
        extras["eval_before"] = before.loss if before else None
        extras["eval_flops"] = before.flops if before else 0.0
        extras["eval_tokens"] = before.tokens if before else 0
        quant = (session.quantization_error(config["model_path"], quantized=before)
                 if cfg.measure_quantization_error and before is not None else None)
        if quant is not None:
            extras["eval_flops"] += quant["flops"]
            extras["eval_tokens"] += quant["tokens"]
            if rank == 0:
                log.warning("quantization: eval loss %.4f with the 4-bit (NF4) base vs %.4f unquantized (%+.4f), "
                            "%s compute, %d eval rows", quant["eval_loss_4bit"], quant["eval_loss_full"],
                            quant["eval_loss_increase"], session.compute_dtype, session._eval_total)
        extras["quantization"] = quant
    attempt = uuid.uuid4().hex[:8]
    max_steps, every = cfg.max_steps, cfg.checkpoint_every
    fault = cfg.inject_fault
    progress = tqdm(range(session.steps_done + 1, max_steps + 1), desc="finetune", disable=rank != 0)
    for step in progress:
        if fault and rank == fault.rank and step == fault.at_step and not os.path.exists(fault.marker):
            Path(fault.marker).write_text(json.dumps({"step": step, "pid": os.getpid()}))
            os.kill(os.getpid(), signal.SIGKILL)  # a real process death, as an OOM kill would be
        started = time.time()
        stats = session.step()
        seconds = time.time() - started
        session.history[-1]["seconds"] = seconds
        if rank == 0:
            _append_jsonl(config["steps_path"], {"attempt": attempt, "wall_time": time.time(), **session.history[-1]})
        progress.set_postfix(loss=f"{stats.loss:.4f}", s_per_step=f"{seconds:.1f}")
        metrics = {"step": step, "loss": stats.loss, "step_tokens": stats.tokens, "step_flops": stats.flops,
                   "tokens": sum(h["tokens"] for h in session.history),
                   "flops": sum(h["flops"] for h in session.history), "step_seconds": seconds}
        if step == max_steps:
            break
        if every and step % every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                session.save_checkpoint(tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"step_{step:06d}")
        else:
            ray.train.report(metrics)  # a barrier across workers
    after = session.evaluate()
    extras["eval_after"] = after.loss if after else None
    history = session.history
    final = {
        "step": session.steps_done,
        "loss": history[-1]["loss"],
        "history": history,
        "tokens": sum(h["tokens"] for h in history),
        "flops": sum(h["flops"] for h in history),
        "eval_loss_before": extras["eval_before"],
        "eval_loss_after": extras["eval_after"],
        "eval_flops": extras["eval_flops"] + (after.flops if after else 0.0),
        "eval_tokens": extras["eval_tokens"] + (after.tokens if after else 0),
        "trainable_params": session.trainable_params,
        "compute_dtype": session.compute_dtype,
        "fsdp": session.use_fsdp,
        "host_ram_mb": host_ram,
        "quantization": extras.get("quantization"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        session.save_checkpoint(tmp)
        if rank == 0:
            (Path(tmp) / "finetune_config.json").write_text(cfg.model_dump_json(indent=1))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{session.steps_done:06d}")


def _import_model_code(model_path: str, method: str) -> None:
    """Import what loading will import (transformers' model class, PEFT, bitsandbytes): modules, no weights."""
    import contextlib

    import peft  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    # An architecture transformers does not map fails in loading itself, with transformers' own message.
    with contextlib.suppress(KeyError):
        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_path))]  # imports the class
    if method == "qlora":
        import bitsandbytes  # noqa: F401


def _current_rss_mb() -> float:
    import resource

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _gather_host_ram(session, before_load_mb: float) -> list[dict[str, float]]:
    """Every rank's RSS (MiB) after the model is loaded and sharded: peak, current, and the peak's
    growth over the RSS before loading (what loading cost this worker, imports excluded)."""
    import resource

    import torch.distributed as dist

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mine = {"rank": session.rank, "peak_mb": peak, "current_mb": _current_rss_mb(),
            "before_load_mb": before_load_mb, "load_growth_mb": peak - before_load_mb}
    if not session.distributed:
        return [mine]
    everyone: list[Any] = [None] * session.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def export_merged_model(model_path: str, adapter_path: str, out_dir: str | Path) -> str:
    """Base model (full precision) + adapter merged into one HF model directory vLLM can serve alone."""
    from peft import PeftModel


    base = load_causal_lm(model_path)
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(model_path).save_pretrained(out_dir)
    return str(out_dir)


def place_workers(cfg: FinetuneConfig, model_path: str) -> tuple[Placement, LocalDevices]:
    """Decide the workers' device from the cluster and its autoscaler, wait until Ray can place them
    (the autoscaler adds GPU nodes on demand), and check the config against the node they land on.

    Returns the placement and the target node's devices (probed there for GPU or autoscaled workers;
    this process's for CPU workers on the running nodes)."""
    placement = resolve_placement(cfg.device, count=cfg.num_workers, cluster=cluster_devices(), stage="finetune",
                                  accelerator=cfg.accelerator)
    expected = resolve_dtype(cfg.compute_dtype, placement.device, fast_bf16=target_fast_bf16(placement))
    log.info("%s (%s)", placement.describe(expected), placement.why)
    node = reserve_target(placement, timeout_s=cfg.capacity_timeout_s, strategy=cfg.placement_strategy)
    if node is None:
        return placement, local_devices()
    # A GPU probed on its node is all free before the job starts; its accelerator type's memory otherwise.
    memory = node.cuda_memory_bytes if placement.use_gpu else None
    problems = device_problems(cfg, node, model_path, device_memory=memory or placement.device_memory_bytes)
    if problems:
        raise ConfigError(problems)
    return placement, node


def run_finetune(cfg: FinetuneConfig, run_dir: str | Path, ledger=None) -> FinetuneResult:
    """Fine-tune with Ray Train; return the result and write `run_dir/adapter` + a ledger record."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    started = time.time()
    run_dir = Path(run_dir).resolve()
    data = preflight_finetune(cfg)
    init_ray()  # only after every check passed (a no-op when Ray is already up)
    placement, node = place_workers(cfg, data.model_path)
    use_gpu = placement.use_gpu
    dtype = resolve_dtype(cfg.compute_dtype, placement.device, fast_bf16=node.fast_bf16(placement.device))
    resume = find_latest_checkpoint(cfg.resume_from) if cfg.resume_from else None
    start_step = (checkpoint_step(resume) or 0) if resume else 0
    if cfg.compute_dtype == "bfloat16" and not node.fast_bf16(placement.device):
        log.warning("compute_dtype bfloat16 as asked, on a %s without native bf16: it is emulated (a 4-bit "
                    "step ran about 27x slower on CPU); compute_dtype 'auto' picks float32 there",
                    placement.device.upper())
    run_dir.mkdir(parents=True, exist_ok=True)
    steps_path = run_dir / "steps.jsonl"
    log.info(
        "finetune %s (%s, rank %d, %s) on %d rows, %d eval rows, steps %d..%d x %d workers (%s)%s",
        cfg.model, cfg.method, cfg.lora_rank, dtype, len(data.train_rows), len(data.eval_rows), start_step + 1,
        cfg.max_steps, cfg.num_workers, "FSDP2" if cfg.num_workers > 1 else "single worker",
        f", resuming from {resume}" if resume else "",
    )
    trainer = TorchTrainer(
        finetune_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "model_path": data.model_path,
            "train_rows": data.train_rows,
            "eval_rows": data.eval_rows,
            "use_gpu": use_gpu,
            "resources_per_worker": placement.ray_resources(),
            "steps_path": str(steps_path),
            "resume_checkpoint": str(resume) if resume else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu,
            resources_per_worker=placement.ray_resources(),
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            storage_path=str(run_dir / "ray_train"),
            name=f"finetune-{int(started)}",
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    metrics = result.metrics
    if result.checkpoint is None:
        raise RuntimeError("finetune: Ray Train finished without a checkpoint; see the worker logs above")
    checkpoint_path = Path(result.checkpoint.path)
    weights_dir = FULL_MODEL_DIR if cfg.method == "full" else CKPT_ADAPTER_DIR
    adapter = run_dir / (FULL_MODEL_DIR if cfg.method == "full" else ADAPTER_DIR)
    if adapter.exists():
        shutil.rmtree(adapter)
    shutil.copytree(checkpoint_path / weights_dir, adapter)
    merged_path = None
    if cfg.export_merged:
        merged_path = ray.get(
            ray.remote(num_cpus=1)(export_merged_model).remote(data.model_path, str(adapter), str(run_dir / "merged"))
        )

    history = list(metrics["history"])
    losses = [float(h["loss"]) for h in history]
    if not all(math.isfinite(x) for x in losses):
        log.warning("non-finite training loss: %s", losses)
    # What this run really spent: every step any attempt computed (lost steps included).
    executed = _executed_steps(steps_path, started)
    new_history = [h for h in history if h["step"] > start_step]
    train_flops = sum(float(r["flops"]) for r in executed) if executed else sum(h["flops"] for h in new_history)
    train_tokens = sum(int(r["tokens"]) for r in executed) if executed else sum(h["tokens"] for h in new_history)
    attempts = {r["attempt"] for r in executed}
    repeated = len(executed) - len({r["step"] for r in executed}) if executed else 0
    eval_flops = float(metrics["eval_flops"])
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
        tokens=train_tokens,
        flops=train_flops + eval_flops,
        train_flops=train_flops,
        eval_flops=eval_flops,
        wall_s=wall_s,
        step_seconds=[float(h.get("seconds", 0.0)) for h in new_history],
        trainable_params=int(metrics["trainable_params"]),
        compute_dtype=str(metrics["compute_dtype"]),
        method=cfg.method,
        num_workers=cfg.num_workers,
        fsdp=bool(metrics.get("fsdp")),
        merged_path=merged_path,
        resumed_from=str(resume) if resume else None,
        start_step=start_step,
        steps_file=str(steps_path),
        restarts=max(0, len(attempts) - 1),
        repeated_steps=repeated,
        host_ram_mb=list(metrics.get("host_ram_mb") or []),
        quantization=metrics.get("quantization"),
    )
    step_seconds = out.step_seconds
    ledger = ledger or ComputeLedger(run_dir)
    ledger.record(
        "finetune",
        flops=out.flops,
        tokens=out.tokens + int(metrics.get("eval_tokens", 0)),
        wall_s=wall_s,
        produced={"adapter_path": out.adapter_path, "checkpoint_path": out.checkpoint_path,
                  **({"merged_path": merged_path} if merged_path else {})},
        train_flops=train_flops,
        eval_flops=eval_flops,
        train_tokens=out.tokens,
        method=cfg.method,
        compute_dtype=out.compute_dtype,
        steps=out.steps,
        start_step=start_step,
        num_workers=cfg.num_workers,
        restarts=out.restarts,
        repeated_steps=out.repeated_steps,
        first_loss=out.first_loss,
        final_loss=out.final_loss,
        eval_loss_before=out.eval_loss_before,
        eval_loss_after=out.eval_loss_after,
        mean_step_s=sum(step_seconds) / len(step_seconds) if step_seconds else None,
        quantization=out.quantization,
    )
    log.info(
        "finetune done: loss %.4f -> %.4f, eval %s -> %s, %.3g FLOPs, %.0fs; adapter at %s",
        out.first_loss, out.final_loss, out.eval_loss_before, out.eval_loss_after, out.flops, wall_s, adapter,
    )
    return out


def _executed_steps(steps_path: Path, since: float) -> list[dict[str, Any]]:
    """Per-step records written by rank 0 during this run (every attempt)."""
    if not steps_path.is_file():
        return []
    rows = [json.loads(line) for line in steps_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("wall_time", since) >= since]
