"""The stages, listed once: what each does, its typed config, how it runs, and its command-line flags.

`frugalray <stage>`, `frugalray submit <stage>` and the Ray Job entrypoints in jobs/ all build
their arguments and load their configs from `STAGES`, so a new stage is one entry here (plus its
jobs/ script). Stage modules are named by dotted path and imported only when a stage is used, so
building `frugalray`'s parser imports none of them (nor torch or Ray). A stage's own `--help` lists
what its config accepts, rendered from the config class (frugalray.config_help).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, load_config
from frugalray.config_help import render_config_help

# -- flag parsing ----------------------------------------------------------------------------------


def flop_caps_list(text: str) -> list[float]:
    """`--flop-caps 1e13,3e13` as numbers, or a ConfigError naming the flag."""
    try:
        return [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError([(f"flop_caps: '{text}' is not a comma-separated list of numbers, "
                            "e.g. --flop-caps 1e13,3e13,1e14")]) from None


def _flop_caps_overrides(text: str) -> list[str]:
    caps = flop_caps_list(text)
    return [f"flop_caps=[{','.join(repr(c) for c in caps)}]", "flop_cap=null"] if caps else []


# -- the registry's types --------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A command-line flag only some stages have. `overrides` turns its value into config overrides
    (None: the stage's own runner reads the flag)."""

    name: str
    metavar: str
    help: str
    overrides: Callable[[str], list[str]] | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # one line, shown by `frugalray --help`
    config: str  # "module:Class" of the typed config
    run: str  # "module:function" called as run(cfg, run_dir, ledger) unless `runner` is set
    script: str  # the Ray Job entrypoint, relative to the repository root
    example_config: str  # the shipped config (or Serve config) the docs and errors point at
    run_dir: str | None = None  # the job script's default --run-dir; None: the config says where
    has_run_dir: bool = True  # False: the stage writes no run directory (serve)
    config_required: bool = True  # False: --config may be left out (sweep --resume; serve's default)
    config_defaults: bool = False  # True: --config defaults to example_config (serve)
    loader: str | None = None  # "module:function(path, overrides)"; default: load_config(config class)
    flags: tuple[Flag, ...] = ()
    submit: bool = True  # `frugalray submit` may run it as a Ray Job
    nests_stages: bool = False  # its config has one section per stage (the pipeline)
    # How the stage runs from parsed arguments when "load the config, call `run`" is not enough.
    runner: Callable[[Stage, argparse.Namespace, str | Path, Any], Any] | None = None

    def config_class(self) -> type:
        return _resolve(self.config)

    def run_function(self) -> Callable[..., Any]:
        return _resolve(self.run)


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


# -- the sweep's runner: a new sweep, or --resume of a run directory -------------------------------


def sweep_command(config: str | None, run_dir: str | Path | None, overrides: list[str] | None = None,
                  resume: str | None = None, flop_caps: str | None = None, ledger=None) -> Any:
    """What `frugalray sweep` and jobs/sweep.py do: a new sweep from `config`, or `resume` a run directory."""
    from frugalray.tune.sweep import SweepConfig, resume_sweep, run_sweep

    caps = flop_caps_list(flop_caps) if flop_caps else None
    if resume:
        if config:
            raise ConfigError(["resume: the resumed sweep reuses the config stored in RUN_DIR; drop --config"])
        return resume_sweep(resume, ledger or ComputeLedger(resume), caps)
    if not config:
        raise ConfigError(["config: pass --config YAML for a new sweep, or --resume RUN_DIR"])
    overrides = list(overrides or []) + (_flop_caps_overrides(flop_caps) if caps else [])
    cfg = load_config(SweepConfig, config, overrides)
    run_dir = run_dir or "runs/sweep"
    return run_sweep(cfg, run_dir, ledger or ComputeLedger(run_dir))


def _run_sweep(stage: Stage, args: argparse.Namespace, run_dir: str | Path, ledger) -> Any:
    return sweep_command(args.config, run_dir, args.overrides, args.resume, args.flop_caps, ledger)


# -- the registry ----------------------------------------------------------------------------------

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("score",
          "score every example on a Ray Data actor pool (perplexity, IFD, GraNd, dynamics, influence, pass rate, "
          "heuristics, duplicates); resumes a killed run",
          config="frugalray.data.score:ScoreConfig", run="frugalray.data.score:run_score",
          script="jobs/score.py", example_config="jobs/configs/score.yaml", run_dir="runs/data"),
    Stage("select",
          "keep scored examples under a row, token or training-FLOP budget (knapsack; strategy auto runs a proxy "
          "experiment); write the subset and a report",
          config="frugalray.data.select:SelectConfig", run="frugalray.data.select:run_select",
          script="jobs/select_data.py", example_config="jobs/configs/select.yaml", run_dir="runs/data"),
    Stage("finetune", "QLoRA/LoRA fine-tune with Ray Train; save the PEFT adapter as a checkpoint",
          config="frugalray.train.finetune:FinetuneConfig", run="frugalray.train.finetune:run_finetune",
          script="jobs/finetune.py", example_config="jobs/configs/finetune.yaml", run_dir="runs/finetune",
          flags=(Flag("--resume-from", "RUN_DIR_OR_CHECKPOINT",
                      "continue a finished or stopped run from its latest checkpoint (raise max_steps)",
                      overrides=lambda value: [f"resume_from={value}"]),)),
    Stage("sweep", "Ray Tune sweep whose trials share one FLOP cap that is never exceeded",
          config="frugalray.tune.sweep:SweepConfig", run="frugalray.tune.sweep:run_sweep",
          script="jobs/sweep.py", example_config="jobs/configs/sweep.yaml", run_dir="runs/sweep",
          config_required=False, runner=_run_sweep,
          flags=(Flag("--resume", "RUN_DIR", "continue the sweep in RUN_DIR after its driver died (no --config)"),
                 Flag("--flop-caps", "C1,C2,...",
                      "budget ladder: one sweep at the largest cap, the best config reported at each cap",
                      overrides=_flop_caps_overrides))),
    Stage("serve", "serve the model and adapters (Ray Serve LLM + vLLM) until Ctrl-C",
          config="frugalray.serve.config:ServeConfig", run="frugalray.serve.app:deploy",
          script="jobs/serve.py", example_config="serve/config.yaml", has_run_dir=False,
          config_required=False, config_defaults=True, loader="frugalray.serve.config:load_serve_config",
          submit=False),
    Stage("pipeline", "generate -> score -> select -> sweep -> finetune (sweep winner) -> serve-and-query",
          config="frugalray.pipeline:PipelineConfig", run="frugalray.pipeline:run_pipeline",
          script="jobs/pipeline.py", example_config="jobs/configs/pipeline.yaml", nests_stages=True,
          loader="frugalray.pipeline:load_pipeline_config"),
)}


def submittable() -> list[str]:
    """The stages `frugalray submit` runs as Ray Jobs."""
    return [name for name, stage in STAGES.items() if stage.submit]


def stage_for_script(script: str) -> Stage | None:
    """The stage whose Ray Job entrypoint is `script` (e.g. jobs/select_data.py)."""
    return next((s for s in STAGES.values() if s.script == script), None)


# -- configs ---------------------------------------------------------------------------------------


def load_stage_config(name: str, config: str | Path, overrides: list[str] | None = None) -> Any:
    """The stage's typed config from a YAML file plus KEY=VALUE overrides; ConfigError names every problem."""
    stage = STAGES[name]
    if stage.loader:
        return _resolve(stage.loader)(str(config), list(overrides or []))
    return load_config(stage.config_class(), config, overrides)


def stage_overrides(stage: Stage, args: argparse.Namespace) -> list[str]:
    """--set KEY=VALUE items plus what the stage's own flags set (finetune --resume-from)."""
    overrides = list(getattr(args, "overrides", None) or [])
    for flag in stage.flags:
        value = getattr(args, flag.dest, None)
        if value and flag.overrides is not None:
            overrides += flag.overrides(value)
    return overrides


def config_from_args(name: str, args: argparse.Namespace) -> Any:
    return load_stage_config(name, args.config, stage_overrides(STAGES[name], args))


def config_help(stage: Stage) -> str:
    """The `--help` section listing what the stage's config accepts (imports the stage's module)."""
    cls = stage.config_class()
    text = render_config_help(cls, f"{stage.example_config} keys ({cls.__name__}; unknown keys are errors):")
    if stage.nests_stages:
        text += "\nThe pipeline sets the paths that connect the stages; a section names only the rest.\n"
    return text


def run_stage(name: str, args: argparse.Namespace, run_dir: str | Path, ledger=None) -> Any:
    """Validate the stage's config from parsed arguments, then run it; returns the stage's result.

    `ledger`: where FLOPs are recorded; default the run directory's (a resumed sweep: RUN_DIR's)."""
    stage = STAGES[name]
    if stage.runner is not None:
        return stage.runner(stage, args, run_dir, ledger)
    cfg = config_from_args(name, args)
    # Each stage validates its inputs (files, fields, model, budget) and only then calls
    # init_ray(), so bad input is rejected before any Ray work starts.
    return stage.run_function()(cfg, run_dir, ledger or ComputeLedger(run_dir))


# -- argument parsers ------------------------------------------------------------------------------


class StageParser(argparse.ArgumentParser):
    """An ArgumentParser whose help ends with what the stage's config accepts, rendered only when asked
    (so building `frugalray`'s parser imports no stage module)."""

    def __init__(self, *args, stage: Stage | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage

    def format_help(self) -> str:
        text = super().format_help()
        return text if self.stage is None else f"{text}\n{config_help(self.stage)}"


def add_stage_arguments(parser: argparse.ArgumentParser, stage: Stage, *, cli: bool) -> None:
    """The stage's flags. `cli`: `frugalray <stage>` (adds --address; --run-dir defaults to runs/<stage>);
    else a jobs/ script (--run-dir defaults to the stage's `run_dir`)."""
    if stage.config_defaults:
        parser.add_argument("--config", default=stage.example_config, help=f"the config file ({stage.example_config})")
    else:
        parser.add_argument("--config", required=stage.config_required, default=None,
                            help=f"YAML of {stage.config.rpartition(':')[2]} keys (e.g. {stage.example_config}); "
                                 "the keys are listed below")
    if stage.has_run_dir:
        if cli:
            default, where = None, f"runs/{stage.name}" if stage.run_dir else "the config's run_dir"
        else:
            default = stage.run_dir
            where = stage.run_dir or "the config's run_dir"
        parser.add_argument("--run-dir", default=default,
                            help=f"where outputs and ledger.jsonl go (default: {where})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable); a nested one as section.key=VALUE")
    for flag in stage.flags:
        parser.add_argument(flag.name, default=None, metavar=flag.metavar, help=flag.help)
    if cli:
        parser.add_argument("--address", default=None,
                            help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")


def add_stage_subparser(sub, name: str) -> argparse.ArgumentParser:
    """`frugalray <name>`: registered on the CLI's subparsers (whose parser_class is StageParser)."""
    stage = STAGES[name]
    parser = sub.add_parser(name, help=stage.help, description=stage.help, stage=stage)
    add_stage_arguments(parser, stage, cli=True)
    return parser


def job_parser(name: str, description: str) -> StageParser:
    """The argument parser of the stage's jobs/ script (`description`: the script's docstring)."""
    stage = STAGES[name]
    parser = StageParser(prog=f"python {stage.script}", description=description, stage=stage,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_arguments(parser, stage, cli=False)
    return parser
