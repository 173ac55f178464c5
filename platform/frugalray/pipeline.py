"""The main job: generate -> score -> select -> sweep -> finetune -> serve-and-query.

Reads top to bottom: validate every stage's config with the paths this run will use
(all problems at once, before any Ray work), then run the stages in order on one Ray
cluster, each recording what it spent in `run_dir/ledger.jsonl`, and finish with a
summary table (also `summary.json`) that ends in a verdict: did fine-tuning help?

The sweep searches recipes of the method the served adapter uses; the finetune trains the
served adapter with the sweep's winner (a trial's result is its last reported metric). Eval
losses (sweep and finetune) use a clean validation set of their own; the held-out accuracy
questions are never used to choose anything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, FieldSerializationInfo, create_model, field_serializer

from frugalray.budget.ledger import LEDGER_FILE, ComputeLedger
from frugalray.config import ConfigError, StrictModel, apply_overrides, parse_config, read_yaml
from frugalray.data.score import ScoreConfig, ScoreResult, run_score
from frugalray.data.select import SelectConfig, SelectResult, run_select
from frugalray.examples.generate import (
    GenerateConfig,
    generate_tasks,
    make_eval_set,
    told_to_reply_briefly,
    write_rows,
)
from frugalray.models import DEFAULT_MODEL, model_shape, resolve_model
from frugalray.ray_utils import init_ray
from frugalray.report import write_report
from frugalray.serve.app import deploy, shutdown_app
from frugalray.serve.client import evaluate
from frugalray.serve.config import ServeConfig, resolve_api_key
from frugalray.stats import paired_difference
from frugalray.train.finetune import FinetuneConfig, FinetuneResult, run_finetune
from frugalray.tune.sweep import (
    SweepConfig,
    SweepResult,
    run_sweep,
    trial_configs,
    trial_cost_bounds,
    trial_spec,
)

log = logging.getLogger(__name__)


# -- stage sections --------------------------------------------------------------------------------


class StageSection(StrictModel):
    """A stage's config as a section of the pipeline's: the stage's keys less the paths the pipeline
    wires. A key the config leaves out stays unset, so the stage's default (or the pipeline's value,
    e.g. its `model`) applies when the section is merged with the wired paths."""

    def written(self) -> dict[str, Any]:
        """The keys the config wrote (nested sections likewise): what is merged over the pipeline's values."""
        return self.model_dump(exclude_unset=True)


def section_of(config: type[BaseModel], doc: str, wired: Iterable[str] = (), unset_means: dict[str, str] | None = None,
               nested: dict[str, type[StageSection]] | None = None) -> type[StageSection]:
    """`config`'s fields as a `StageSection`, less `wired`; each keeps its type, constraints, default
    and description, so the section cannot drift from the stage. A field the stage requires may be
    left out here: the stage's own validation, after the merge, asks for it (or derives it, as the
    sweep's flop_cap from flop_caps).

    unset_means: field -> what applies when the section leaves it out, shown by `--help` in place of
    the stage's default. nested: field -> the section that replaces its nested config."""
    unset_means, nested = unset_means or {}, nested or {}
    fields: dict[str, Any] = {}
    for name, field in config.model_fields.items():
        if name in wired:
            continue
        if name in nested:
            fields[name] = (nested[name], Field(default_factory=nested[name], description=field.description))
            continue
        help_default = unset_means.get(name, "required" if field.is_required() else None)
        extra = {"json_schema_extra": {"default_text": help_default}} if help_default else {}
        if field.is_required():
            fields[name] = (Annotated[field.annotation | None, field], Field(None, **extra))
        else:
            fields[name] = (Annotated[field.annotation, field], Field(**extra))
    name = config.__name__.removesuffix("Config") + "Section"
    return create_model(name, __base__=StageSection, __doc__=doc, __module__=__name__, **fields)


FROM_PIPELINE = {"model": "default: the pipeline's model"}
FINETUNE_WIRED = ("data_path", "eval_path")

GenerateSection = section_of(GenerateConfig, "`frugalray generate`'s keys; output_path is the pipeline's.",
                             wired=("output_path",))
ScoreSection = section_of(ScoreConfig, "`frugalray score`'s keys; input_path and output_path are the pipeline's.",
                          wired=("input_path", "output_path"), unset_means=FROM_PIPELINE)
SelectSection = section_of(SelectConfig, "`frugalray select`'s keys; input_path and output_path are the pipeline's.",
                           wired=("input_path", "output_path"))
FinetuneSection = section_of(FinetuneConfig, "`frugalray finetune`'s keys; data_path (the selected rows) and "
                             "eval_path (the validation rows) are the pipeline's.",
                             wired=FINETUNE_WIRED, unset_means=FROM_PIPELINE)
SweepFinetuneSection = section_of(
    FinetuneConfig, "The finetune section, with these changes for the sweep's trials.", wired=FINETUNE_WIRED,
    unset_means={k: "default: the finetune section's" for k in FinetuneConfig.model_fields})
SweepSection = section_of(SweepConfig, "`frugalray sweep`'s keys; its finetune is the finetune section's.",
                          nested={"finetune": SweepFinetuneSection})
ServeSection = section_of(ServeConfig, "`frugalray serve`'s keys; the pipeline adds the fine-tuned adapter.",
                          unset_means=FROM_PIPELINE)


# -- config ----------------------------------------------------------------------------------------


class HeldoutConfig(StrictModel):
    """Clean held-out tasks, never trained on: paired accuracy before/after fine-tuning."""

    n_rows: int = Field(200, ge=1, description="clean held-out tasks for accuracy before/after fine-tuning")
    seed: int = 10_000
    max_tokens: int = Field(16, ge=1, description="completion tokens per held-out answer (greedy)")
    validation_rows: int = Field(
        32, ge=1, description="clean rows (seed + 1) for the sweep's and finetune's eval loss; never the accuracy questions")
    # The paired gain (fine-tuned minus base, in accuracy points) the job must reach; below it the job
    # prints its verdict and exits non-zero. None: report only.
    min_gain_points: float | None = None


class QueryConfig(StrictModel):
    """A few held-out questions asked at the end with a sample budget (majority vote)."""

    n_prompts: int = Field(4, ge=0, description="held-out prompts asked with a sample budget at the end")
    max_samples: int = Field(4, ge=1, description="compute_budget.max_samples per budgeted query")
    max_tokens: int = Field(16, ge=1)


SECTIONS = ("generate", "score", "select", "finetune", "sweep", "serve")


class PipelineConfig(StrictModel):
    run_dir: str = "runs/pipeline"
    model: str = DEFAULT_MODEL
    generate: GenerateSection = Field(default_factory=GenerateSection)
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    score: ScoreSection = Field(default_factory=ScoreSection)
    select: SelectSection = Field(default_factory=SelectSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    query: QueryConfig = Field(default_factory=QueryConfig)

    @field_serializer(*SECTIONS)
    def _as_written(self, section: StageSection, info: FieldSerializationInfo) -> dict[str, Any]:
        # A stage section dumps (to pipeline_config.json) only the keys the config wrote: the rest
        # are decided when the section is merged with the wired paths, not here.
        return section.model_dump(mode=info.mode, exclude_unset=True)


def load_pipeline_config(path: str, overrides: list[str]) -> PipelineConfig:
    """The pipeline's config from YAML plus KEY=VALUE overrides (the registry's loader for `pipeline`).

    The sections are checked as the config is parsed, the model only by `StagePlan`; so when the
    parse fails, the model's problem (if any) is named with the sections' problems, all at once."""
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return parse_config(PipelineConfig, data, path)
    except ConfigError as err:
        try:
            resolve_model(str(data.get("model", DEFAULT_MODEL)), field="model", prepare=False)
        except ConfigError as bad:
            raise ConfigError([*err.problems, *bad.problems], path) from None
        raise


class StagePlan:
    """Every stage's typed config, with the file paths that connect the stages."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path):

        self.run_dir = run_dir
        self.tasks_path = run_dir / "data" / "tasks.jsonl"
        self.heldout_path = run_dir / "data" / "heldout.jsonl"
        self.validation_path = run_dir / "data" / "validation.jsonl"
        self.scored_path = run_dir / "scored"
        self.selected_path = run_dir / "selected.jsonl"
        problems: list[str] = []

        def stage(section: str, cls, data: dict[str, Any]):
            try:
                return parse_config(cls, data)
            except ConfigError as err:
                problems.extend(f"{section}.{p}" for p in err.problems)
                return None

        self.generate = stage("generate", GenerateConfig, {**cfg.generate.written(), "output_path": str(self.tasks_path)})
        self.score = stage("score", ScoreConfig, {
            "model": cfg.model, **cfg.score.written(),
            "input_path": str(self.tasks_path), "output_path": str(self.scored_path),
        })
        self.select = stage("select", SelectConfig, {
            **cfg.select.written(), "input_path": str(self.scored_path), "output_path": str(self.selected_path),
        })
        finetune = {"model": cfg.model, **cfg.finetune.written(),
                    "data_path": str(self.selected_path), "eval_path": str(self.validation_path)}
        self.finetune = stage("finetune", FinetuneConfig, finetune)
        sweep = cfg.sweep.written()
        sweep["finetune"] = {**finetune, **sweep.get("finetune", {})}
        self.sweep = stage("sweep", SweepConfig, sweep)
        if self.sweep is not None and self.finetune is not None and self.sweep.finetune.method != self.finetune.method:
            problems.append(
                f"sweep.finetune.method: '{self.sweep.finetune.method}' but finetune.method is "
                f"'{self.finetune.method}'; the served adapter is trained with the sweep's winning recipe, "
                "so the sweep must search the same method (drop sweep.finetune.method)")
        self.serve = stage("serve", ServeConfig, {"model": cfg.model, **cfg.serve.written()})
        try:
            model_path = resolve_model(cfg.model, field="model")
        except ConfigError as err:
            problems.extend(err.problems)
            model_path = None
        if model_path and self.sweep is not None:
            problems.extend(self._sweep_cap_problems(model_path, cfg.heldout.validation_rows))
        if problems:
            raise ConfigError(problems, "pipeline config")

    def _sweep_cap_problems(self, model_path: str, heldout_rows: int) -> list[str]:
        """The cap must pay for at least one step (plus its evaluation) of the cheapest trial.

        Checked here, before any data exists, because the sweep's own preflight reads the
        selected data, which only the select stage produces.
        """

        shape = model_shape(model_path)
        base = self.sweep.finetune
        eval_rows = min(base.eval_rows, heldout_rows)
        costs = [sum(trial_cost_bounds(trial_spec(base, combo), shape, eval_rows)) for combo in trial_configs(self.sweep)]
        cheapest = min(costs)
        if self.sweep.flop_cap < cheapest:
            return [f"sweep.flop_cap: {self.sweep.flop_cap:.4g} FLOPs cannot pay for one training step plus its "
                    f"evaluation of the cheapest trial ({cheapest:.4g}); raise it to at least {cheapest:.4g}"]
        return []

    def finetune_with(self, winner: dict[str, Any] | None):
        """The served adapter's config: the finetune section with the sweep winner's searched values."""

        if not winner:
            return self.finetune
        return parse_config(FinetuneConfig, {**self.finetune.model_dump(), **winner}, "finetune (sweep winner)")

    def serve_with_adapter(self, adapter_name: str, adapter_path: str):

        data = {**self.serve.model_dump(), "adapters": {**self.serve.adapters, adapter_name: adapter_path}}
        return parse_config(ServeConfig, data, "serve")


def _fmt_flops(x: float) -> str:
    return f"{x:.3e}"


def set_aside_previous_ledger(run_dir: Path) -> Path | None:
    """Rename an earlier run's ledger (kept, never deleted): the pipeline reruns every stage, and a
    ledger appended to twice would no longer add up to this run's stage results."""

    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        return None
    kept = path.with_name(f"{path.stem}.{int(path.stat().st_mtime)}{path.suffix}")
    path.rename(kept)
    return kept


def run_pipeline(cfg: PipelineConfig, run_dir: str | Path | None = None, address: str | None = None) -> dict:
    from tqdm import tqdm


    run_dir = Path(run_dir or cfg.run_dir)
    plan = StagePlan(cfg, run_dir)  # raises one ConfigError listing every problem
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline_config.json").write_text(cfg.model_dump_json(indent=2))
    kept = set_aside_previous_ledger(run_dir)
    if kept is not None:
        log.info("a previous run's ledger in %s moved to %s; this run starts a fresh one", run_dir, kept.name)
    ledger = ComputeLedger(run_dir)
    started = time.time()
    steps = ["generate", "score", "select", "sweep", "finetune", "serve"]
    bar = tqdm(total=len(steps), desc="pipeline", unit="stage")
    results: dict[str, Any] = {}

    def stage_done(name: str):
        bar.set_postfix_str(f"{name} done, {time.time() - started:.0f}s")
        bar.update(1)

    # 1. generate: noisy training tasks + clean held-out questions + a clean validation set (no Ray work)
    t0 = time.time()
    rows = generate_tasks(plan.generate)
    write_rows(rows, plan.tasks_path)
    train_instructions = {r["instruction"] for r in rows}
    style = plan.generate.response_style  # held-out questions are asked as the training rows are
    common = {"families": plan.generate.families, "max_digits": plan.generate.max_digits,
              "operations": plan.generate.operations, "response_style": style}
    heldout = make_eval_set(cfg.heldout.n_rows, seed=cfg.heldout.seed,
                            exclude_instructions=train_instructions, **common)
    write_rows(heldout, plan.heldout_path)
    validation = make_eval_set(cfg.heldout.validation_rows, seed=cfg.heldout.seed + 1,
                               exclude_instructions=train_instructions | {r["instruction"] for r in heldout}, **common)
    write_rows(validation, plan.validation_path)
    noisy = sum(r["noise_kind"] != "none" for r in rows)
    produced = {"rows": len(rows), "noisy_rows": noisy, "heldout_rows": len(heldout),
                "validation_rows": len(validation)}
    ledger.record("generate", flops=0.0, wall_s=time.time() - t0, produced=produced)
    results["generate"] = produced
    stage_done("generate")

    init_ray(address)

    # 2-5: each stage records its own ledger entry
    bar.set_description("pipeline: score")
    results["score"] = run_score(plan.score, run_dir, ledger)
    stage_done("score")
    bar.set_description("pipeline: select")
    results["select"] = run_select(plan.select, run_dir, ledger)
    stage_done("select")
    bar.set_description("pipeline: sweep")
    results["sweep"] = sweep = run_sweep(plan.sweep, run_dir / "sweep", ledger)
    stage_done("sweep")
    bar.set_description("pipeline: finetune")
    served_cfg = plan.finetune_with(sweep.best_config)
    results["served_recipe"] = served_recipe(served_cfg, sweep)
    log.info("finetune: %s", results["served_recipe"]["why"])
    results["finetune"] = ft = run_finetune(served_cfg, run_dir / "finetune", ledger)
    stage_done("finetune")

    # 6. serve base + adapter; held-out accuracy before/after; budgeted queries
    bar.set_description("pipeline: serve")
    adapter_name = "finetuned"
    serve_cfg = plan.serve_with_adapter(adapter_name, ft.adapter_path)
    api_key = resolve_api_key(serve_cfg)  # from api_key or the environment variable api_key_env
    t0 = time.time()
    base_url = deploy(serve_cfg)
    startup_s = time.time() - t0
    try:
        # 16 at once: the engine batches them (an adapter's requests took ~4.8 s each, 4 at a time, on 2 cores).
        before = evaluate(base_url, serve_cfg.model_name, heldout, max_tokens=cfg.heldout.max_tokens,
                          api_key=api_key, concurrency=16)
        after = evaluate(base_url, adapter_name, heldout, max_tokens=cfg.heldout.max_tokens,
                         api_key=api_key, concurrency=16)
        # The base at its best, too: untold to answer briefly it often explains at length and is cut off.
        told = told_to_reply_briefly(heldout)
        before_told = evaluate(base_url, serve_cfg.model_name, told, max_tokens=cfg.heldout.max_tokens,
                               api_key=api_key, concurrency=16) if told != heldout else None
        queries = heldout[: cfg.query.n_prompts]
        budgeted = evaluate(base_url, adapter_name, queries, max_tokens=cfg.query.max_tokens,
                            compute_budget={"max_samples": cfg.query.max_samples},
                            api_key=api_key, concurrency=1) if queries else None
    finally:
        shutdown_app(serve_cfg.app_name)
    evaluations = [e for e in (before, after, before_told, budgeted) if e is not None]
    serve_flops = sum(e.usage["flops"] for e in evaluations)
    serve_tokens = sum(int(e.usage.get("prompt_tokens", 0) + e.usage.get("completion_tokens", 0)) for e in evaluations)
    serve_produced = {"accuracy_base": before.accuracy, "accuracy_finetuned": after.accuracy,
                      "startup_s": round(startup_s, 1), "budgeted_queries": len(queries)}
    # Per-query cost next to accuracy, so the report can plot accuracy vs compute for each way of answering.
    for label, evaluation in (("base", before), ("finetuned", after), ("budgeted", budgeted)):
        if evaluation is not None and evaluation.n:
            serve_produced[f"accuracy_{label}"] = evaluation.accuracy
            serve_produced[f"flops_per_query_{label}"] = evaluation.usage["flops"] / evaluation.n
    ledger.record("serve", flops=serve_flops, tokens=serve_tokens, wall_s=time.time() - t0,
                  produced=serve_produced)
    results["serve"] = {"before": before, "after": after, "before_told": before_told, "budgeted": budgeted,
                        "queries": queries,
                        "flops": serve_flops, "startup_s": startup_s}
    stage_done("serve")
    bar.close()

    summary = build_summary(results, ledger, wall_s=time.time() - started, min_gain_points=cfg.heldout.min_gain_points)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(format_summary(summary, run_dir))
    report_path = write_report(run_dir)
    print(f"report: {report_path}")
    return summary


RECIPE_FIELDS = ("method", "learning_rate", "lora_rank", "lora_alpha", "max_steps", "batch_size", "lr_scheduler",
                 "warmup_steps", "max_grad_norm", "compute_dtype")


def served_recipe(finetune_cfg: FinetuneConfig, sweep: SweepResult) -> dict[str, Any]:
    """What the served adapter is trained with, and why (the sweep's winner, or the config's own recipe)."""
    recipe = {k: getattr(finetune_cfg, k) for k in RECIPE_FIELDS}
    best, metric = sweep.best_config, sweep.metric
    trials = [t for t in sweep.trials if t.metric is not None]
    if not best:
        recipe.update(source="config", why=f"the sweep found no trial with a finite {metric}; "
                                             "trained with the finetune section's recipe")
        return recipe
    chosen = ", ".join(f"{k}={v}" for k, v in best.items())
    others = "; ".join(f"{', '.join(f'{k}={v}' for k, v in t.config.items())}: {t.metric:.4f}"
                       for t in trials if t.config != best)
    recipe.update(source="sweep winner", why=(
        f"the sweep's winner ({chosen}: final {metric} {sweep.best_metric:.4f}, the best of {len(trials)} "
        f"trials{'; ' + others if others else ''}), trained for {recipe['max_steps']} steps"))
    return recipe


def finetune_verdict(paired: Any, min_gain_points: float | None, ft: FinetuneResult) -> dict[str, Any]:
    """Did fine-tuning help? `paired` is the fine-tuned-minus-base PairedDifference on the same questions.

    helped: the 95% interval lies above zero (and the gain reaches `min_gain_points` when set).
    Otherwise the line says so loudly and names the likeliest cause from the training figures."""
    gain = 100 * paired.diff
    significant = paired.ci_low > 0
    helped = significant and (min_gain_points is None or gain >= min_gain_points)
    first, last = ft.first_loss, ft.final_loss
    before, after = ft.eval_loss_before, ft.eval_loss_after
    if helped:
        line = f"fine-tuning helped: {paired.describe()}"
        cause = None
    else:
        if first is not None and last is not None and last > 0.9 * first:
            cause = (f"training did not learn (train loss {first:.3f} -> {last:.3f}): check learning_rate and that "
                     "gradients reach the adapter (QLoRA on an AVX512-BF16 CPU used to lose them after an eval)")
        elif before is not None and after is not None and after >= before:
            cause = (f"the adapter got worse on the validation rows (eval loss {before:.3f} -> {after:.3f}): "
                     "overfitting or a learning rate too high")
        elif not significant:
            cause = ("the gain is within noise: too few training steps, too few held-out questions to resolve it, "
                     "or training responses that do not teach the answer the accuracy check reads")
        else:
            cause = f"the gain {gain:+.1f} points is below min_gain_points {min_gain_points}"
        line = f"FINE-TUNING DID NOT HELP: {paired.describe()}. Likely cause: {cause}"
    return {"helped": helped, "line": line, "cause": cause, "gain_points": gain,
            "ci95_points": [100 * paired.ci_low, 100 * paired.ci_high], "min_gain_points": min_gain_points}


def summary_exit_code(summary: dict[str, Any]) -> int:
    """0 when the run kept its promises; 1 when the ledger does not add up; 3 when the fine-tuned
    model missed `heldout.min_gain_points` (everything is written first, so nothing is lost)."""
    if not summary["ledger_matches_stages"]:
        return 1
    verdict = summary["verdict"]
    if verdict["min_gain_points"] is not None and not verdict["helped"]:
        return 3
    return 0


def _correct(evaluation: Any) -> list[bool]:
    return [a is not None and a == g for a, g in zip(evaluation.answers, evaluation.gold)]


def finetune_curve(ft: FinetuneResult) -> dict[str, Any] | None:
    """Train loss against cumulative training FLOPs, for the report's loss-vs-FLOPs plot.

    A finetune result carries its training FLOPs only as a total, so every step is charged the mean
    (`flops_source` says so)."""
    losses = list(ft.losses)
    if not losses:
        return None
    mean = ft.train_flops / len(losses)
    return {"loss": losses, "flops": list(accumulate([mean] * len(losses))), "flops_source": "mean per step"}


def build_summary(results: dict[str, Any], ledger, wall_s: float, min_gain_points: float | None = None) -> dict[str, Any]:
    """The run's summary (summary.json) from `results`: the stages' result models under score, select,
    sweep and finetune; the pipeline's own dicts under generate, serve and served_recipe."""
    score: ScoreResult = results["score"]
    sel: SelectResult = results["select"]
    sw: SweepResult = results["sweep"]
    ft: FinetuneResult = results["finetune"]
    sv = results["serve"]
    # The verdict compares with the base at its best: as asked, or told to reply with only the number.
    told = sv.get("before_told")
    base = told if told is not None and told.correct > sv["before"].correct else sv["before"]
    paired = paired_difference(_correct(sv["after"]), _correct(base))
    verdict = finetune_verdict(paired, min_gain_points, ft)
    per_stage = ledger.totals_by_stage()
    stage_flops = {
        # What this run computed: a rerun resumes scored shards from the run dir and charges only new work
        # (`flops` is the whole output's cost; comparing it made every second `make demo` a MISMATCH).
        "score": score.flops_now,
        "select": 0.0,
        "finetune": ft.flops,
        "sweep": sw.flops_spent,
        "serve": sv["flops"],
    }
    mismatched = {
        s: (f, per_stage.get(s, {}).get("flops", 0.0))
        for s, f in stage_flops.items()
        if abs(per_stage.get(s, {}).get("flops", 0.0) - f) > 1e-6 * max(1.0, f)
    }
    budgeted = sv["budgeted"]
    served_answers = []
    if budgeted is not None:
        for row, answer in zip(sv["queries"], budgeted.answers):
            served_answers.append({"prompt": row["instruction"], "answer": answer, "gold": row["answer"]})
    return {
        "wall_s": round(wall_s, 1),
        "rows_in": sel.rows_in,
        "rows_kept": sel.kept,
        "rows_dropped": sel.dropped,
        "rows_quarantined": score.rows_quarantined,
        "noisy_rows_generated": results["generate"]["noisy_rows"],
        "train_loss_first": ft.first_loss,
        "train_loss_final": ft.final_loss,
        "eval_loss_before": ft.eval_loss_before,
        "eval_loss_after": ft.eval_loss_after,
        "heldout_accuracy_before": sv["before"].accuracy,
        "heldout_accuracy_before_told": told.accuracy if told is not None else None,
        "verdict_base": "told 'Reply with only the number.'" if base is told else "as asked",
        "heldout_accuracy_after": sv["after"].accuracy,
        "heldout_n": sv["before"].n,
        "heldout_paired": paired.as_dict(),
        "verdict": verdict,
        "served_recipe": results.get("served_recipe"),
        "quantization": ft.quantization,
        "sweep_best_config": sw.best_config,
        "sweep_best_metric": sw.best_metric,
        "sweep_flops_spent": sw.flops_spent,
        "sweep_flop_cap": sw.flop_cap,
        "served_answers": served_answers,
        "served_usage": budgeted.usage if budgeted is not None else {},
        "adapter_path": ft.adapter_path,
        "finetune_curve": finetune_curve(ft),
        "ledger_by_stage": per_stage,
        "ledger_total_flops": ledger.total_flops(),
        "ledger_matches_stages": not mismatched,
        "ledger_mismatches": mismatched,
    }


def format_summary(s: dict[str, Any], run_dir: Path) -> str:
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        "",
        "=" * 72,
        f"frugalray pipeline summary ({s['wall_s']:.0f} s)  run dir: {run_dir}",
        "=" * 72,
        f"{'data':<28} rows in {s['rows_in']}, kept {s['rows_kept']}, dropped {s['rows_dropped']}, "
        f"quarantined {s['rows_quarantined']} (noisy generated: {s['noisy_rows_generated']})",
        f"{'train loss (first -> last)':<28} {f(s['train_loss_first'])} -> {f(s['train_loss_final'])}",
        f"{'validation loss (bef->aft)':<28} {f(s['eval_loss_before'])} -> {f(s['eval_loss_after'])}",
        f"{'held-out accuracy':<28} base {f(s['heldout_accuracy_before'], '.1%')} -> fine-tuned "
        f"{f(s['heldout_accuracy_after'], '.1%')} (n={s['heldout_n']}, greedy, same questions)",
        f"{'paired vs best base':<28} {100 * s['heldout_paired']['diff']:+.1f} points, 95% CI "
        f"{100 * s['heldout_paired']['ci_low']:+.1f} to {100 * s['heldout_paired']['ci_high']:+.1f} "
        f"({s['heldout_paired']['a_only']} questions gained, {s['heldout_paired']['b_only']} lost)",
        f"{'sweep best (final metric)':<28} {s['sweep_best_config']} metric {f(s['sweep_best_metric'])}",
        f"{'sweep FLOPs':<28} {_fmt_flops(s['sweep_flops_spent'] or 0)} spent of cap {_fmt_flops(s['sweep_flop_cap'] or 0)}",
    ]
    if s.get("heldout_accuracy_before_told") is not None:
        lines.insert(8, f"{'base told to reply briefly':<28} {s['heldout_accuracy_before_told']:.1%} (the same "
                        f"questions + 'Reply with only the number.'); the verdict's base: {s['verdict_base']}")
    recipe = s.get("served_recipe")
    if recipe:
        lines.append(f"{'served adapter':<28} {recipe['method']} lr {recipe['learning_rate']:g}, rank "
                     f"{recipe['lora_rank']}, {recipe['max_steps']} steps, {recipe['lr_scheduler']} "
                     f"(warmup {recipe['warmup_steps']}), clip {recipe['max_grad_norm']}: {recipe['source']}")
        lines.append(f"{'':<28} why: {recipe['why']}")
    quant = s.get("quantization")
    if quant:
        lines.append(f"{'4-bit quantization cost':<28} eval loss {quant['eval_loss_4bit']:.3f} (NF4 base) vs "
                     f"{quant['eval_loss_full']:.3f} (unquantized), {quant['eval_loss_increase']:+.3f}")
    for q in s["served_answers"]:
        lines.append(f"{'served (budgeted)':<28} {q['prompt'][:40]!r} -> {q['answer']} (gold {q['gold']})")
    u = s["served_usage"]
    if u:
        lines.append(f"{'served cost (all budgeted)':<28} samples {u.get('samples', 0):.0f}, completion tokens "
                     f"{u.get('completion_tokens', 0):.0f}, FLOPs {_fmt_flops(u.get('flops', 0.0))}")
    lines.append("-" * 72)
    lines.append(f"{'stage':<12} {'FLOPs':>12} {'tokens':>10} {'wall s':>8}")
    for stage, t in s["ledger_by_stage"].items():
        lines.append(f"{stage:<12} {_fmt_flops(t['flops']):>12} {int(t['tokens']):>10} {t['wall_s']:>8.1f}")
    lines.append(f"{'total':<12} {_fmt_flops(s['ledger_total_flops']):>12}")
    check = "OK" if s["ledger_matches_stages"] else f"MISMATCH {s['ledger_mismatches']}"
    lines.append(f"ledger vs stage results: {check}; ledger at {run_dir / 'ledger.jsonl'}")
    lines.append("=" * 72)
    verdict = s["verdict"]
    if verdict["helped"]:
        lines.append(f"VERDICT: {verdict['line']}")
    else:
        lines += ["!" * 72, f"VERDICT: {verdict['line']}", "!" * 72]
    lines.append("=" * 72)
    return "\n".join(lines)
