"""sweep: a Ray Tune hyperparameter search whose total FLOPs never exceed `flop_cap`.

    cfg = parse_config(SweepConfig, {"finetune": {...}, "search_space": {"learning_rate": [1e-4, 1e-3]},
                                     "flop_cap": 5e13, "max_steps_per_trial": 8})
    result = run_sweep(cfg, run_dir)             # -> SweepResult

Each trial runs the finetune training loop in-process (`TrainingSession`) on its own
`FinetuneConfig`: the finetune section with the searched values set (`trial_spec`). Before each
chunk of `steps_per_report` steps it reserves, from one shared `SweepFlopBudget` actor, an
upper bound of that chunk's FLOPs plus the evaluation after it; when the reservation is
refused (or only partly granted), the trial stops and says so (`stopped_by_cap`). After the
chunk it settles: the real FLOPs stay charged and the unspent part of the hold goes back.
Open holds plus settled spend never exceed the cap, and no chunk spends more than it held,
so the cap is a promise, not a target.

Pause: under the marginal scheduler (`pause_trials`, default on) every report but a trial's
last carries a checkpoint of its training state, so the scheduler can PAUSE a trial whose
gain per FLOP fell behind and Tune resumes it later from that report (its steps, FLOPs and
data position continue; nothing is recomputed).

Restore: the run directory keeps `sweep_state.json` (the config, the Tune experiment) and
the budget actor's write-ahead journal. `resume_sweep(run_dir)` (`frugalray sweep --resume
RUN_DIR`) rebuilds the pot from the journal (holds left open by the dead driver are charged
in full), restores Tune's experiment with `Tuner.restore` and the same trainable and
scheduler, and records ONE ledger entry for the whole sweep, whatever the restarts.

Devices: the trials' device comes from `finetune.device` (and `finetune.accelerator`) and the
cluster, its autoscaler's node types included (`sweep_placement`, for `max_concurrent_trials` trials
at once). Each trial asks Tune for one CPU, plus one GPU (and `accelerator_type:X`) on GPU
(`trial_resources`); a GPU trial checks that CUDA is there before it reserves a FLOP or loads a model.
The sweep waits for GPU or autoscaled nodes (saying so) up to `finetune.capacity_timeout_s`.

Budget ladder: with `flop_caps`, the sweep runs once at the largest cap and `tune/ladder.py`
replays its chunks in spend order to answer every smaller cap (ladder.json / .md / .png).
Every sweep also fits its compute frontier (`tune/scaling.py`, scaling.json).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from frugalray.budget.flops import train_flops_per_token
from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, StrictModel, parse_config
from frugalray.devices import (
    ACCELERATOR_PREFIX,
    ClusterDevices,
    Placement,
    cluster_devices,
    require_cuda,
    resolve_dtype,
    resolve_placement,
    target_fast_bf16,
)
from frugalray.models import model_shape
from frugalray.ray_utils import init_ray, reserve_target
from frugalray.train.finetune import FinetuneConfig, preflight_finetune
from frugalray.train.loop import (
    TrainingSession,
    default_threads,
    eval_flops_upper_bound,
    train_step_flops_upper_bound,
)
from frugalray.tune.budget import create_flop_budget
from frugalray.tune.ladder import (
    ChunkRecord,
    LadderReport,
    budget_ladder,
    winner_changes,
    write_ladder_report,
)
from frugalray.tune.scaling import fit_scaling

log = logging.getLogger(__name__)

# FinetuneConfig fields a sweep may vary. Others (model, data, seq_len, method) define the
# problem being tuned, not a hyperparameter of it.
SEARCHABLE_KEYS = ("learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "batch_size", "seed")


class SweepConfig(StrictModel):
    finetune: FinetuneConfig
    search_space: dict[str, list[Any]] = Field(default_factory=lambda: {"learning_rate": [1e-4, 1e-3]})
    # grid: every combination, each `num_samples` times; random: `num_samples` random picks.
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)
    # The sweep never spends more. With `flop_caps` it defaults to the largest of them.
    flop_cap: float = Field(gt=0)
    # Budget ladder: answer the best config at each of these caps from one sweep at the largest.
    flop_caps: list[float] | None = None
    # Stop the whole sweep once no remaining option is predicted (from the learning-curve fits)
    # to improve the best metric by this much (metric units); None: off.
    sweep_stop_gain: float | None = Field(None, gt=0)
    steps_per_report: int = Field(2, ge=1)
    max_steps_per_trial: int = Field(8, ge=1)
    metric: Literal["eval_loss", "train_loss"] = "eval_loss"
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int = Field(1, ge=1)
    # fifo: every trial runs its schedule until the cap refuses it (what the sweep always did);
    # asha: Tune's ASHA with FLOPs as time_attr; marginal: MarginalGainScheduler (tune/marginal.py).
    scheduler: Literal["fifo", "asha", "marginal"] = "fifo"
    # FLOPs a trial may spend before asha / marginal may stop it; None: two report chunks
    # (steps_per_report steps + an evaluation, at the costliest config's upper bound).
    grace_period_flops: float | None = Field(None, gt=0)
    # marginal: a trial stops when its expected gain per FLOP falls below this rate (metric
    # units per FLOP), or, with "auto", below the best rate available elsewhere.
    stop_rate: float | Literal["auto"] = "auto"
    # marginal: PAUSE a trial instead of stopping it (each report then checkpoints the trial's
    # adapter, optimizer and data position), so FLOPs left over later can resume it where it
    # stopped, and trials run one at a time still get screened before one is trained out.
    pause_trials: bool = True
    asha_reduction_factor: float = Field(3.0, gt=1)

    @model_validator(mode="before")
    @classmethod
    def _cap_from_ladder(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("flop_cap") is None and data.get("flop_caps"):
            caps = data["flop_caps"]
            if isinstance(caps, list) and caps and all(isinstance(c, (int, float)) for c in caps):
                data = {**data, "flop_cap": max(caps)}
        return data

    @field_validator("flop_caps")
    @classmethod
    def _caps_positive(cls, caps: list[float] | None) -> list[float] | None:
        if caps is None:
            return None
        if not caps:
            raise ValueError("give at least one cap, e.g. [1e13, 3e13, 1e14], or leave it out")
        bad = [c for c in caps if not (c > 0 and math.isfinite(c))]
        if bad:
            raise ValueError(f"every cap must be a finite number of FLOPs > 0 (got {bad})")
        return sorted({float(c) for c in caps})

    @model_validator(mode="after")
    def _ladder_within_cap(self) -> SweepConfig:
        if self.flop_caps and max(self.flop_caps) > self.flop_cap:
            raise ValueError(
                f"flop_caps: the largest cap {max(self.flop_caps):.4g} exceeds flop_cap {self.flop_cap:.4g}; "
                "the ladder is read from one sweep at flop_cap: drop flop_cap or raise it to the largest cap"
            )
        return self

    @field_validator("stop_rate")
    @classmethod
    def _rate_not_negative(cls, rate: float | str) -> float | str:
        if rate != "auto" and rate < 0:
            raise ValueError("must be 'auto' or a number >= 0 (metric units per FLOP)")
        return rate

    @field_validator("search_space")
    @classmethod
    def _known_keys(cls, space: dict[str, list[Any]]) -> dict[str, list[Any]]:
        unknown = [k for k in space if k not in SEARCHABLE_KEYS]
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown}; searchable keys are {list(SEARCHABLE_KEYS)}"
            )
        empty = [k for k, values in space.items() if not values]
        if empty:
            raise ValueError(f"{empty}: give at least one value to try")
        return space


class TrialSummary(BaseModel):
    config: dict[str, Any]
    metric: float | None
    train_loss: float | None
    flops: float
    reserved_flops: float
    tokens: int
    steps: int
    stopped_by_cap: bool
    error: str | None = None
    trial_id: str | None = None


class SweepResult(BaseModel):
    best_config: dict[str, Any] | None
    best_metric: float | None
    metric: str
    mode: str
    flops_spent: float
    # Upper-bound holds taken over the sweep; their sum may pass the cap because unspent
    # parts (flops_released) return to the pot and are held again. Open holds + spend <= cap.
    flops_reserved: float
    flops_released: float
    flop_cap: float
    min_trial_flops: float
    trials: list[TrialSummary]
    wall_s: float
    sweep_id: str = ""
    resumed: bool = False
    # Holds left open by a killed driver, charged in full at resume (their real cost is unknown).
    flops_charged_at_restart: float = 0.0
    ladder: Any = None  # LadderReport when flop_caps was given
    scaling: dict | None = None  # fit_scaling's report
    stopped_by_fit: str | None = None  # why the fit-based rule ended the sweep early
    reports: dict[str, str] = Field(default_factory=dict)  # name -> path of written reports
    # Per trial, every report in order: step, flops, tokens, sweep_flops (the sweep's FLOP clock),
    # chunk_flops, chunk_reserved, train_loss, metric. Also written to histories.json.
    histories: list[dict] = Field(default_factory=list)


def trial_configs(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the search space (what a grid search runs once per sample)."""
    keys = list(cfg.search_space)
    return [dict(zip(keys, values)) for values in itertools.product(*(cfg.search_space[k] for k in keys))]


def trial_spec(base: FinetuneConfig, searched: dict[str, Any], **values: Any) -> FinetuneConfig:
    """One trial's typed config: the finetune section with the searched values (and `values`) set,
    validated (a value the search space holds but the config refuses raises pydantic's error)."""
    return base.with_values(**searched, **values)


def trial_cost_bounds(cfg: FinetuneConfig, shape, eval_rows: int) -> tuple[float, float]:
    """(upper bound of one training step, upper bound of one evaluation) for a trial config."""

    lora = shape.lora_params(cfg.lora_rank, cfg.target_modules)
    # A step is grad_accum_steps micro-batches, each recomputing its forward under checkpointing:
    # leaving either out would reserve less than the step spends, and the budget refuses to settle.
    step = train_step_flops_upper_bound(shape, cfg.batch_size, cfg.seq_len, cfg.method, lora,
                                        accum_steps=cfg.grad_accum_steps,
                                        gradient_checkpointing=cfg.gradient_checkpointing)
    return step, eval_flops_upper_bound(shape, eval_rows, cfg.seq_len, lora)


def preflight_sweep(cfg: SweepConfig):
    """Check everything that can be checked before Ray; returns (PreparedData, shape, min trial FLOPs)."""

    problems: list[str] = []
    variants = []
    for combo in trial_configs(cfg):
        try:
            variants.append(trial_spec(cfg.finetune, combo))
        except Exception as err:  # noqa: BLE001 - pydantic's message names the bad value
            problems.append(f"search_space: {combo} is not a valid finetune config ({err.errors()[0]['msg']})")
    if cfg.finetune.warmup_steps > cfg.max_steps_per_trial:
        problems.append(f"finetune.warmup_steps: {cfg.finetune.warmup_steps} exceeds max_steps_per_trial "
                        f"{cfg.max_steps_per_trial} (a trial's schedule spans the trial); lower it")
    if cfg.metric == "eval_loss" and cfg.finetune.eval_rows == 0:
        problems.append("finetune.eval_rows: metric 'eval_loss' needs held-out rows; set eval_rows > 0")
    if problems:
        raise ConfigError(problems)
    data = preflight_finetune(cfg.finetune, field_prefix="finetune.")
    shape = model_shape(data.model_path)
    costs = [sum(trial_cost_bounds(v, shape, len(data.eval_rows))) for v in variants]
    min_cost = min(costs)
    if cfg.flop_cap < min_cost:
        message = (
            f"flop_cap: {cfg.flop_cap:.4g} FLOPs cannot pay for even one training step plus its evaluation "
            f"of the cheapest trial ({min_cost:.4g} FLOPs at batch_size x seq_len upper bound); "
            f"raise flop_cap to at least {min_cost:.4g}"
        )
        raise ConfigError([message])
    if cfg.flop_caps and min(cfg.flop_caps) < min_cost:
        raise ConfigError([
            (f"flop_caps: {min(cfg.flop_caps):.4g} FLOPs cannot pay for one training step plus its evaluation of "
             f"the cheapest trial ({min_cost:.4g}); drop it or raise it to at least {min_cost:.4g}")
        ])
    if cfg.scheduler != "fifo":
        grace, _ = scheduler_flops(cfg, shape, len(data.eval_rows))
        if grace > cfg.flop_cap:
            field = "grace_period_flops" if cfg.grace_period_flops is not None else "flop_cap"
            message = (
                f"{field}: the {cfg.scheduler} scheduler's grace period ({grace:.4g} FLOPs) exceeds "
                f"flop_cap ({cfg.flop_cap:.4g}); no trial could finish it. Raise flop_cap to at least "
                f"{grace:.4g} or lower grace_period_flops"
            )
            raise ConfigError([message])
    return data, shape, min_cost


def scheduler_flops(cfg: SweepConfig, shape, eval_rows: int) -> tuple[float, float]:
    """(grace period, max FLOPs of one trial) in FLOPs, from the costliest config's upper bounds."""
    chunks = math.ceil(cfg.max_steps_per_trial / cfg.steps_per_report)
    grace_default, max_trial = 0.0, 0.0
    for combo in trial_configs(cfg):
        step, evaluation = trial_cost_bounds(trial_spec(cfg.finetune, combo), shape, eval_rows)
        chunk = min(cfg.steps_per_report, cfg.max_steps_per_trial) * step + evaluation
        grace_default = max(grace_default, min(2, chunks) * chunk)
        max_trial = max(max_trial, cfg.max_steps_per_trial * step + chunks * evaluation)
    grace = cfg.grace_period_flops if cfg.grace_period_flops is not None else grace_default
    return grace, max(max_trial, grace)


def _pauses_trials(cfg: SweepConfig) -> bool:
    """Trials checkpoint at every report and the marginal scheduler may pause them."""
    return cfg.scheduler == "marginal" and cfg.pause_trials


def make_scheduler(cfg: SweepConfig, shape, eval_rows: int):
    """The Tune scheduler that `cfg.scheduler` names (None: Tune's default FIFO)."""
    if cfg.scheduler == "fifo":
        return None
    grace, max_trial = scheduler_flops(cfg, shape, eval_rows)
    if cfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="flops", max_t=max_trial, grace_period=grace,
                             reduction_factor=cfg.asha_reduction_factor)
    from frugalray.tune.scheduler import MarginalGainScheduler

    return MarginalGainScheduler(flop_cap=cfg.flop_cap, grace_flops=grace, max_trial_flops=max_trial,
                                 stop_rate=cfg.stop_rate, time_attr="flops", pausable=cfg.pause_trials,
                                 max_running=cfg.max_concurrent_trials if cfg.pause_trials else None)


def sweep_placement(cfg: SweepConfig, cluster: ClusterDevices) -> Placement:
    """CPU or GPU for `max_concurrent_trials` trials at once, from `finetune.device` and the cluster (pure);
    ConfigError naming the field when the cluster can never give them."""
    ft = cfg.finetune
    return resolve_placement(ft.device, count=cfg.max_concurrent_trials, cluster=cluster, stage="sweep",
                             accelerator=ft.accelerator, device_field="finetune.device",
                             accelerator_field="finetune.accelerator", count_field="max_concurrent_trials")


def trial_resources(placement: Placement) -> dict[str, float]:
    """What one trial asks Tune for (`tune.with_resources`): {"cpu": 1} on CPU, as always; on GPU
    also {"gpu": 1} and the accelerator type as the custom resource Ray names GPU models with."""
    resources = {"cpu": placement.per_worker.get("CPU", 1.0)}
    if placement.use_gpu:
        resources["gpu"] = placement.per_worker.get("GPU", 1.0)
    if placement.accelerator:
        resources[f"{ACCELERATOR_PREFIX}{placement.accelerator}"] = 0.001
    return resources


def sweep_trial(
    config: dict[str, Any],
    base: dict[str, Any],
    model_path: str,
    train_rows: list[dict[str, str]],
    eval_rows: list[dict[str, str]],
    budget_name: str,
    steps_per_report: int,
    max_steps: int,
    threads: int,
    checkpoint_reports: bool = False,
    device: str = "cpu",
    placed_for: dict[str, float] | None = None,
) -> None:
    """Tune function trainable: train in reserved chunks, report after each, stop at the cap.

    `checkpoint_reports`: every report that is not the trial's last carries a checkpoint (adapter,
    optimizer, LR schedule, data position, RNG and the trial's FLOP/token counters), so a scheduler
    may PAUSE the trial there and Tune resumes it later exactly where it stopped.
    `device`: "cuda" for a trial placed on a GPU (`placed_for`: what it was placed with).
    """
    import ray
    from ray import tune

    if device == "cuda":  # before any FLOP is reserved: a GPU node without CUDA must not train on its CPU
        require_cuda("sweep trial", placed_for=placed_for)

    # `base` crossed to the trial as JSON: re-validated at the door. The trial's LR schedule
    # (warmup, decay) spans the trial's own length.
    trial_cfg = trial_spec(FinetuneConfig.model_validate(base), config, max_steps=max_steps)
    budget = ray.get_actor(budget_name)
    shape = model_shape(model_path)
    step_bound, eval_bound = trial_cost_bounds(trial_cfg, shape, len(eval_rows))
    steps, flops, reserved, tokens = 0, 0.0, 0.0, 0
    last_result = {"eval_loss": math.inf, "train_loss": math.inf}
    paused_at = tune.get_checkpoint()  # set when Tune resumes a paused trial
    if paused_at is not None:
        with paused_at.as_directory() as directory:
            counters = json.loads((Path(directory) / TRIAL_COUNTERS_FILE).read_text())
        steps, flops, reserved, tokens = (int(counters["steps"]), float(counters["flops"]),
                                          float(counters["reserved"]), int(counters["tokens"]))
        last_result = counters["result"]
    try:
        # Refuse early, before paying to load the model, when not even one chunk fits. A resumed trial
        # repeats its last metrics (its final result stays its real one), with nothing trained.
        granted = ray.get(budget.reserve_steps.remote(step_bound, min(steps_per_report, max_steps - steps), eval_bound))
        if granted == 0:
            tune.report({**last_result, "step": steps, "flops": flops, "reserved_flops": reserved, "tokens": tokens,
                         "stopped_by_cap": True, "chunk_flops": 0.0, "chunk_reserved": 0.0,
                         "sweep_flops": ray.get(budget.spent.remote()), "final": True})
            return
        session = TrainingSession(trial_cfg, model_path, train_rows, eval_rows, threads=threads,
                                  device=device if device != "cpu" else None)
        if paused_at is not None:
            with paused_at.as_directory() as directory:
                session.load_checkpoint(directory)
            if session.steps_done != steps:
                raise RuntimeError(f"paused checkpoint is at step {session.steps_done}, its counters at {steps}")
        while True:
            wanted = min(steps_per_report, max_steps - steps)
            held = granted * step_bound + eval_bound
            chunk_flops, losses = 0.0, []
            for _ in range(granted):
                stats = session.step()
                chunk_flops += stats.flops
                tokens += stats.tokens
                losses.append(stats.loss)
            steps += granted
            evaluation = session.evaluate()
            if evaluation is not None:
                chunk_flops += evaluation.flops
                tokens += evaluation.tokens
            # Hand back what the padded upper bound over-reserved, so other chunks can use it.
            # The answer is the sweep's total spend: the global FLOP clock the budget ladder replays.
            sweep_flops = ray.get(budget.settle.remote(held, chunk_flops, f"{tune.get_context().get_trial_id()}:{steps}"))
            reserved += held
            flops += chunk_flops
            stopped_by_cap = granted < wanted
            train_loss = sum(losses) / len(losses)
            result = {
                "step": steps,
                "flops": flops,
                "reserved_flops": reserved,
                "tokens": tokens,
                "train_loss": train_loss,
                "eval_loss": evaluation.loss if evaluation is not None else math.inf,
                "stopped_by_cap": stopped_by_cap,
                "chunk_flops": chunk_flops,
                "chunk_reserved": held,
                "sweep_flops": sweep_flops,
                # The trial's last report: it ends by itself after it (a scheduler must not pause it there).
                "final": False,
            }
            if steps >= max_steps or stopped_by_cap:
                tune.report({**result, "final": True})
                return
            # Report before reserving the next chunk: a scheduler that stops or pauses the trial at this
            # report ends it there, and a hold taken first would stay charged against the cap, unspent.
            # The probe only labels the report; the reservation after it is what the cap enforces.
            if ray.get(budget.remaining.remote()) < step_bound + eval_bound:
                tune.report({**result, "stopped_by_cap": True, "final": True})
                return
            if checkpoint_reports:
                tune.report(result, checkpoint=_pause_checkpoint(session, result))
            else:
                tune.report(result)
            wanted = min(steps_per_report, max_steps - steps)
            granted = ray.get(budget.reserve_steps.remote(step_bound, wanted, eval_bound))
            if granted == 0:  # another trial took the rest since the probe: say so in one more report
                tune.report({**result, "stopped_by_cap": True, "final": True})
                return
    finally:
        # A trial that ends by itself leaves no scratch behind (a paused one keeps it until resumed).
        shutil.rmtree(_pause_scratch(), ignore_errors=True)


TRIAL_COUNTERS_FILE = "sweep_trial.json"


def _pause_scratch(trial_id: str | None = None) -> Path:
    from ray import tune

    return Path(tempfile.gettempdir()) / "frugalray-sweep-pause" / (trial_id or tune.get_context().get_trial_id())


def _pause_checkpoint(session, result: dict[str, Any]):
    """The trial's full training state in a local scratch folder (one per trial, rewritten at each
    report: Tune copies it into the experiment's storage when the report is made)."""
    from ray import tune

    directory = _pause_scratch()
    shutil.rmtree(directory, ignore_errors=True)
    session.save_checkpoint(str(directory))
    (directory / TRIAL_COUNTERS_FILE).write_text(json.dumps({
        "steps": result["step"], "flops": result["flops"], "reserved": result["reserved_flops"],
        "tokens": result["tokens"], "result": {k: result[k] for k in ("eval_loss", "train_loss")}}))
    return tune.Checkpoint.from_directory(str(directory))


def _finite_or_none(x: Any) -> float | None:
    """A reported number as a float; None for a missing, non-numeric or infinite/NaN one."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


STATE_FILE = "sweep_state.json"
FIT_STOP_FILE = "stopped_by_fit.txt"  # written by FitStopper when the fit ends the sweep


def _sweep_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    if not path.exists():
        raise ConfigError([(f"resume: '{run_dir}' holds no {STATE_FILE}; pass the run directory of a sweep "
                            "that was started (frugalray sweep --config ... --run-dir RUN_DIR)")])
    return json.loads(path.read_text())


def resume_sweep(run_dir: str | Path, ledger=None, flop_caps: list[float] | None = None) -> SweepResult:
    """Continue a sweep whose driver died: same config, same Tune experiment, the budget rebuilt from its journal."""

    run_dir = Path(run_dir).resolve()
    state = _sweep_state(run_dir)
    raw = state["config"]
    if flop_caps:
        raw = {**raw, "flop_caps": flop_caps}
    cfg = parse_config(SweepConfig, raw, str(run_dir / STATE_FILE))
    return run_sweep(cfg, run_dir, ledger, resume=True)


def _trainable(cfg: SweepConfig, data, budget_name: str, placement: Placement):
    from ray import tune


    return tune.with_resources(
        tune.with_parameters(
            sweep_trial,
            base=cfg.finetune.model_dump(mode="json"),
            model_path=data.model_path,
            train_rows=data.train_rows,
            eval_rows=data.eval_rows,
            budget_name=budget_name,
            steps_per_report=cfg.steps_per_report,
            max_steps=cfg.max_steps_per_trial,
            threads=cfg.finetune.cpu_threads or default_threads(cfg.max_concurrent_trials),
            checkpoint_reports=_pauses_trials(cfg),
            device=placement.device,
            placed_for=placement.ray_resources(),
        ),
        trial_resources(placement),
    )


def place_trials(cfg: SweepConfig) -> Placement:
    """Decide the trials' device (Ray up), wait for GPU or autoscaled nodes, check CUDA is on them, log it."""
    placement = sweep_placement(cfg, cluster_devices())
    # A GPU node without CUDA is refused once here: every trial would fail the same way, and Tune
    # would report a sweep of errored trials.
    reserve_target(placement, timeout_s=cfg.finetune.capacity_timeout_s)
    dtype = resolve_dtype(cfg.finetune.compute_dtype, placement.device, fast_bf16=target_fast_bf16(placement))
    log.info("%s (%s)", placement.describe(dtype), placement.why)
    return placement


def _trial_histories(grid, cfg: SweepConfig) -> list[dict]:
    """Every report of every trial, in order: what the ladder replays and the scaling fit uses."""
    histories = []
    for r in grid:
        df = r.metrics_dataframe
        if df is None or len(df) == 0 or "sweep_flops" not in df:
            continue
        rows = df.to_dict("records")
        histories.append({
            "trial_id": str((r.metrics or {}).get("trial_id", "")),
            "config": {k: v for k, v in (r.config or {}).items() if k in cfg.search_space},
            **{key: [float(row.get(key, math.nan)) for row in rows]
               for key in ("step", "flops", "tokens", "sweep_flops", "chunk_flops", "chunk_reserved", "train_loss")},
            "metric": [_finite_or_none(row.get(cfg.metric)) for row in rows],
        })
    return histories


def _chunk_records(histories: list[dict]):
    """The histories as ladder ChunkRecords, plus (flops, tokens, metric) points for the scaling fit."""

    chunks, points = [], []
    for h in histories:
        for i, metric in enumerate(h["metric"]):
            chunks.append(ChunkRecord(trial_id=h["trial_id"], config=h["config"], sweep_flops=h["sweep_flops"][i],
                                      chunk_flops=h["chunk_flops"][i], chunk_hold=h["chunk_reserved"][i],
                                      metric=metric))
            if metric is not None and h["flops"][i] > 0:
                points.append((h["flops"][i], h["tokens"][i], metric))
    return chunks, points


def run_sweep(cfg: SweepConfig, run_dir: str | Path, ledger=None, resume: bool = False) -> SweepResult:
    """Run the search under the FLOP cap; record one ledger entry for the whole sweep.

    `resume=True` continues the sweep recorded in `run_dir` (see `resume_sweep`).
    """
    import ray
    from ray import tune


    started = time.time()
    run_dir = Path(run_dir).resolve()
    data, shape, min_cost = preflight_sweep(cfg)
    if resume:
        state = _sweep_state(run_dir)
    else:
        sweep_id = uuid.uuid4().hex[:8]
        state = {"sweep_id": sweep_id, "experiment": f"sweep-{int(started)}-{sweep_id}",
                 "journal": f"flop_budget-{sweep_id}.jsonl", "started": started}
    state["config"] = cfg.model_dump(mode="json")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    storage = run_dir / "ray_tune"
    experiment_path = storage / state["experiment"]
    init_ray()  # only after every check passed (a no-op when Ray is already up)
    placement = place_trials(cfg)
    budget_name = f"frugalray-flop-budget-{state['sweep_id']}-{uuid.uuid4().hex[:4]}"
    budget = None
    try:
        budget = create_flop_budget(cfg.flop_cap, budget_name, journal=run_dir / state["journal"])
        before = ray.get(budget.snapshot.remote())  # the actor is up (and rebuilt) before trials look it up
        if resume:
            log.info("resuming sweep %s: %.4g FLOPs already spent (%.4g charged for chunks the dead driver left open)",
                     state["sweep_id"], before["spent"], before["charged_at_restart"])
        trainable = _trainable(cfg, data, budget_name, placement)
        if resume and tune.Tuner.can_restore(str(experiment_path)):
            # The scheduler and stopper come back from the experiment's tuner.pkl (same as before).
            tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            if resume:
                log.warning("no restorable Tune state under %s: starting the trials again under the rebuilt budget",
                            experiment_path)
            if cfg.search == "grid":
                param_space = {k: tune.grid_search(v) for k, v in cfg.search_space.items()}
            else:
                param_space = {k: tune.choice(v) for k, v in cfg.search_space.items()}
            stopper = None
            if cfg.sweep_stop_gain is not None:
                from frugalray.tune.scheduler import FitStopper

                _, max_trial = scheduler_flops(cfg, shape, len(data.eval_rows))
                total = len(trial_configs(cfg)) * cfg.num_samples if cfg.search == "grid" else cfg.num_samples
                stopper = FitStopper(cfg.sweep_stop_gain, cfg.metric, cfg.mode, cfg.flop_cap, max_trial, total,
                                     max_steps=cfg.max_steps_per_trial, note_path=str(run_dir / FIT_STOP_FILE))
            scheduler = make_scheduler(cfg, shape, len(data.eval_rows))
            search_alg = None
            if _pauses_trials(cfg):
                # Tune's own limit counts paused trials as live: the pausing scheduler holds it instead.
                from frugalray.tune.scheduler import GatedVariantGenerator

                search_alg = GatedVariantGenerator(scheduler)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=cfg.metric,
                    mode=cfg.mode,
                    num_samples=cfg.num_samples,
                    max_concurrent_trials=None if search_alg is not None else cfg.max_concurrent_trials,
                    scheduler=scheduler,
                    search_alg=search_alg,
                ),
                run_config=tune.RunConfig(storage_path=str(storage), name=state["experiment"], verbose=1,
                                          stop=stopper,
                                          # a paused trial resumes from its latest report; older ones are disk
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
        grid = tuner.fit()
        totals = ray.get(budget.snapshot.remote())
    finally:
        if budget is not None:
            ray.kill(budget)

    trials = []
    for r in grid:
        m = r.metrics or {}
        if m.get("trial_id"):  # a trial left paused at the end kept its scratch copy (Tune holds the checkpoint)
            shutil.rmtree(_pause_scratch(str(m["trial_id"])), ignore_errors=True)
        trials.append(
            TrialSummary(
                config={k: v for k, v in (r.config or {}).items() if k in cfg.search_space},
                metric=_finite_or_none(m.get(cfg.metric)),
                train_loss=_finite_or_none(m.get("train_loss")),
                flops=float(m.get("flops", 0.0)),
                reserved_flops=float(m.get("reserved_flops", 0.0)),
                tokens=int(m.get("tokens", 0)),
                steps=int(m.get("step", 0)),
                stopped_by_cap=bool(m.get("stopped_by_cap", False)),
                error=str(r.error) if r.error else None,
                trial_id=str(m.get("trial_id")) if m.get("trial_id") else None,
            )
        )
    scored = [t for t in trials if t.metric is not None]
    best = (min if cfg.mode == "min" else max)(scored, key=lambda t: t.metric) if scored else None
    # The actor's journal hears of every chunk, even one whose trial died before reporting it,
    # and of holds a killed driver left open; it is the sweep's spend across restarts.
    flops_spent = max(sum(t.flops for t in trials), float(totals["spent"]))
    fit_note = run_dir / FIT_STOP_FILE
    stopped_by_fit = fit_note.read_text().strip() if fit_note.exists() else None
    result = SweepResult(
        best_config=best.config if best else None,
        best_metric=best.metric if best else None,
        metric=cfg.metric,
        mode=cfg.mode,
        flops_spent=flops_spent,
        flops_reserved=float(totals["reserved"] + totals["released"]),
        flops_released=float(totals["released"]),
        flop_cap=cfg.flop_cap,
        min_trial_flops=min_cost,
        trials=trials,
        wall_s=time.time() - started,
        sweep_id=state["sweep_id"],
        resumed=resume,
        flops_charged_at_restart=float(totals["charged_at_restart"]),
        stopped_by_fit=stopped_by_fit,
    )
    if flops_spent > cfg.flop_cap:  # cannot happen unless the bound is wrong; never hide it
        raise RuntimeError(f"sweep spent {flops_spent:.4g} FLOPs > flop_cap {cfg.flop_cap:.4g}")
    _write_reports(cfg, grid, shape, result, run_dir, resumed=resume)

    ledger = ledger or ComputeLedger(run_dir)
    if any(e.get("stage") == "sweep" and e.get("sweep_id") == result.sweep_id for e in ledger.entries()):
        # A resume of a sweep that had already finished and recorded itself: never count it twice.
        log.warning("sweep %s is already in the ledger; not recording it again", result.sweep_id)
    else:
        ledger.record(
            "sweep",
            flops=flops_spent,
            tokens=sum(t.tokens for t in trials),
            wall_s=result.wall_s,
            produced={"best_config": result.best_config, "best_metric": result.best_metric},
            sweep_id=result.sweep_id,
            resumed=resume,
            flop_cap=cfg.flop_cap,
            flops_reserved=result.flops_reserved,
            flops_released=result.flops_released,
            flops_charged_at_restart=result.flops_charged_at_restart,
            budget_actor_spent=float(totals["spent"]),
            trials=len(trials),
            trials_stopped_by_cap=sum(t.stopped_by_cap for t in trials),
            trials_failed=sum(t.error is not None for t in trials),
            # Holds never settled (a trial that died with its node mid-chunk): they stayed charged
            # against the cap, but their real cost is unknown and not in `flops`.
            flops_held_open=max(0.0, float(totals["reserved"] - totals["spent"])),
        )
    log.info(
        "sweep done: best %s=%s with %s; spent %.4g of %.4g FLOPs (%d/%d trials stopped by the cap)",
        cfg.metric, result.best_metric, result.best_config, flops_spent, cfg.flop_cap,
        sum(t.stopped_by_cap for t in trials), len(trials),
    )
    return result


def _write_reports(cfg: SweepConfig, grid, shape, result: SweepResult, run_dir: Path, resumed: bool) -> None:
    """scaling.json always; ladder.json/.md/.png with flop_caps. Attached to `result`."""

    result.histories = _trial_histories(grid, cfg)
    (run_dir / "histories.json").write_text(json.dumps(result.histories, default=str) + "\n")
    result.reports["histories"] = str(run_dir / "histories.json")
    chunks, points = _chunk_records(result.histories)
    ft = cfg.finetune
    lora = shape.lora_params(ft.lora_rank, ft.target_modules)
    result.scaling = fit_scaling(
        points, cfg.mode,
        flops_per_token=train_flops_per_token(shape, ft.seq_len, ft.method, lora),
        model_params=shape.matmul_params,
        stop_rate=cfg.stop_rate if isinstance(cfg.stop_rate, float) and cfg.stop_rate > 0 else None,
        model_sizes=1,
    )
    result.scaling["note"] = ("flops_per_token uses the base lora_rank and seq_len (padded width); trials with "
                              "another rank differ slightly")
    (run_dir / "scaling.json").write_text(json.dumps(result.scaling, indent=2, default=str) + "\n")
    result.reports["scaling"] = str(run_dir / "scaling.json")
    if not cfg.flop_caps:
        return
    prefix_exact = cfg.scheduler in ("fifo", "asha") and cfg.max_concurrent_trials == 1 and not resumed
    why = ("the marginal scheduler's lambda and admission read the remaining budget" if cfg.scheduler == "marginal"
           else "trials ran concurrently, so holds overlapped" if cfg.max_concurrent_trials > 1
           else "the sweep was resumed after a killed driver")
    rungs = budget_ladder(chunks, cfg.flop_caps, cfg.mode, prefix_exact=prefix_exact, why_estimate=why)
    report = LadderReport(metric=cfg.metric, mode=cfg.mode, scheduler=cfg.scheduler,
                          flops_spent=result.flops_spent, rungs=rungs, winner_changes=winner_changes(rungs))
    result.ladder = report
    result.reports.update({f"ladder_{k}": v for k, v in write_ladder_report(report, run_dir, chunks).items()})
