"""sweep: a Ray Tune hyperparameter search whose total FLOPs never exceed `flop_cap`.

    cfg = parse_config(SweepConfig, {"finetune": {...}, "search_space": {"learning_rate": [1e-4, 1e-3]},
                                     "flop_cap": 5e13, "max_steps_per_trial": 8})
    result = run_sweep(cfg, run_dir)             # -> SweepResult

Each trial runs the finetune training loop in-process (`LoraTrainingSession`). Before each
chunk of `steps_per_report` steps it reserves, from one shared `FlopBudget` actor, an
upper bound of that chunk's FLOPs plus the evaluation after it; when the reservation is
refused (or only partly granted), the trial stops and says so (`stopped_by_cap`). After the
chunk it settles: the real FLOPs stay charged and the unspent part of the hold goes back.
Open holds plus settled spend never exceed the cap, and no chunk spends more than it held,
so the cap is a promise, not a target.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from frugalray.config import ConfigError, StrictModel
from frugalray.train.finetune import FinetuneConfig

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
    flop_cap: float = Field(gt=0)
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
    asha_reduction_factor: float = Field(3.0, gt=1)

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


def trial_configs(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the search space (what a grid search runs once per sample)."""
    keys = list(cfg.search_space)
    return [dict(zip(keys, values)) for values in itertools.product(*(cfg.search_space[k] for k in keys))]


def trial_cost_bounds(cfg: FinetuneConfig, shape, eval_rows: int) -> tuple[float, float]:
    """(upper bound of one training step, upper bound of one evaluation) for a trial config."""
    from frugalray.train.loop import eval_flops_upper_bound, train_step_flops_upper_bound

    lora = shape.lora_params(cfg.lora_rank, cfg.target_modules)
    step = train_step_flops_upper_bound(shape, cfg.batch_size, cfg.seq_len, cfg.method, lora)
    return step, eval_flops_upper_bound(shape, eval_rows, cfg.seq_len, lora)


def preflight_sweep(cfg: SweepConfig):
    """Check everything that can be checked before Ray; returns (PreparedData, shape, min trial FLOPs)."""
    from frugalray.models import model_shape
    from frugalray.train.finetune import preflight_finetune

    problems: list[str] = []
    variants = []
    for combo in trial_configs(cfg):
        try:
            variants.append(FinetuneConfig.model_validate({**cfg.finetune.model_dump(), **combo}))
        except Exception as err:  # noqa: BLE001 - pydantic's message names the bad value
            problems.append(f"search_space: {combo} is not a valid finetune config ({err.errors()[0]['msg']})")
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
        variant = FinetuneConfig.model_validate({**cfg.finetune.model_dump(), **combo})
        step, evaluation = trial_cost_bounds(variant, shape, eval_rows)
        chunk = min(cfg.steps_per_report, cfg.max_steps_per_trial) * step + evaluation
        grace_default = max(grace_default, min(2, chunks) * chunk)
        max_trial = max(max_trial, cfg.max_steps_per_trial * step + chunks * evaluation)
    grace = cfg.grace_period_flops if cfg.grace_period_flops is not None else grace_default
    return grace, max(max_trial, grace)


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
                                 stop_rate=cfg.stop_rate, time_attr="flops")


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
) -> None:
    """Tune function trainable: train in reserved chunks, report after each, stop at the cap."""
    import ray
    from ray import tune

    from frugalray.models import model_shape
    from frugalray.train.loop import LoraTrainingSession

    trial_cfg = FinetuneConfig.model_validate({**base, **config})
    budget = ray.get_actor(budget_name)
    shape = model_shape(model_path)
    step_bound, eval_bound = trial_cost_bounds(trial_cfg, shape, len(eval_rows))
    # Refuse early, before paying to load the model, when not even one chunk fits.
    granted = ray.get(budget.reserve_steps.remote(step_bound, min(steps_per_report, max_steps), eval_bound))
    if granted == 0:
        tune.report({"step": 0, "flops": 0.0, "reserved_flops": 0.0, "tokens": 0, "eval_loss": math.inf,
                     "train_loss": math.inf, "stopped_by_cap": True})
        return
    session = LoraTrainingSession(trial_cfg.model_dump(mode="json"), model_path, train_rows, eval_rows, threads=threads)
    steps, flops, reserved, tokens = 0, 0.0, 0.0, 0
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
        ray.get(budget.settle.remote(held, chunk_flops))
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
        }
        if steps >= max_steps or stopped_by_cap:
            tune.report(result)
            return
        wanted = min(steps_per_report, max_steps - steps)
        granted = ray.get(budget.reserve_steps.remote(step_bound, wanted, eval_bound))
        if granted == 0:
            tune.report({**result, "stopped_by_cap": True})
            return
        tune.report(result)


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_sweep(cfg: SweepConfig, run_dir: str | Path, ledger=None) -> SweepResult:
    """Run the search under the FLOP cap; record one ledger entry for the whole sweep."""
    import ray
    from ray import tune

    from frugalray.budget.ledger import ComputeLedger
    from frugalray.ray_utils import init_ray
    from frugalray.train.loop import default_threads
    from frugalray.tune.budget import create_flop_budget

    started = time.time()
    run_dir = Path(run_dir).resolve()
    data, shape, min_cost = preflight_sweep(cfg)
    init_ray()  # only after every check passed (a no-op when Ray is already up)
    budget_name = f"frugalray-flop-budget-{uuid.uuid4().hex[:8]}"
    budget = None
    try:
        budget = create_flop_budget(cfg.flop_cap, budget_name)
        ray.get(budget.snapshot.remote())  # the actor is up before trials look it up
        if cfg.search == "grid":
            param_space = {k: tune.grid_search(v) for k, v in cfg.search_space.items()}
        else:
            param_space = {k: tune.choice(v) for k, v in cfg.search_space.items()}
        trainable = tune.with_resources(
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
            ),
            {"cpu": 1},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials,
                scheduler=make_scheduler(cfg, shape, len(data.eval_rows)),
            ),
            run_config=tune.RunConfig(
                storage_path=str(run_dir / "ray_tune"), name=f"sweep-{int(started)}", verbose=1
            ),
        )
        grid = tuner.fit()
        totals = ray.get(budget.snapshot.remote())
    finally:
        if budget is not None:
            ray.kill(budget)

    trials = []
    for r in grid:
        m = r.metrics or {}
        trials.append(
            TrialSummary(
                config={k: v for k, v in (r.config or {}).items() if k in cfg.search_space},
                metric=_finite(m.get(cfg.metric)),
                train_loss=_finite(m.get("train_loss")),
                flops=float(m.get("flops", 0.0)),
                reserved_flops=float(m.get("reserved_flops", 0.0)),
                tokens=int(m.get("tokens", 0)),
                steps=int(m.get("step", 0)),
                stopped_by_cap=bool(m.get("stopped_by_cap", False)),
                error=str(r.error) if r.error else None,
            )
        )
    scored = [t for t in trials if t.metric is not None]
    best = (min if cfg.mode == "min" else max)(scored, key=lambda t: t.metric) if scored else None
    # The actor hears of every finished chunk, even one whose trial died before reporting it.
    flops_spent = max(sum(t.flops for t in trials), float(totals["spent"]))
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
    )
    if flops_spent > cfg.flop_cap:  # cannot happen unless the bound is wrong; never hide it
        raise RuntimeError(f"sweep spent {flops_spent:.4g} FLOPs > flop_cap {cfg.flop_cap:.4g}")
    ledger = ledger or ComputeLedger(run_dir)
    ledger.record(
        "sweep",
        flops=flops_spent,
        tokens=sum(t.tokens for t in trials),
        wall_s=result.wall_s,
        produced={"best_config": result.best_config, "best_metric": result.best_metric},
        flop_cap=cfg.flop_cap,
        flops_reserved=result.flops_reserved,
        flops_released=result.flops_released,
        budget_actor_spent=float(totals["spent"]),
        trials=len(trials),
        trials_stopped_by_cap=sum(t.stopped_by_cap for t in trials),
        trials_failed=sum(t.error is not None for t in trials),
    )
    log.info(
        "sweep done: best %s=%s with %s; spent %.4g of %.4g FLOPs (%d/%d trials stopped by the cap)",
        cfg.metric, result.best_metric, result.best_config, flops_spent, cfg.flop_cap,
        sum(t.stopped_by_cap for t in trials), len(trials),
    )
    return result
