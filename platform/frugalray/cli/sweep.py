"""`frugalray sweep` (and jobs/sweep.py): start a new sweep from a config, or resume a run directory."""

from __future__ import annotations

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, load_config
from frugalray.tune.sweep import SweepConfig, SweepResult, resume_sweep, run_sweep


def sweep_command(config: str | None, run_dir: str | None, overrides: list[str] | None = None,
                  resume: str | None = None, flop_caps: str | None = None, ledger=None) -> SweepResult:
    """What `frugalray sweep` does: a new sweep from `config`, or `resume` a run directory."""
    caps = None
    if flop_caps:
        try:
            caps = [float(c) for c in flop_caps.split(",") if c.strip()]
        except ValueError:
            raise ConfigError([(f"flop_caps: '{flop_caps}' is not a comma-separated list of numbers, "
                                "e.g. --flop-caps 1e13,3e13,1e14")]) from None
    if resume:
        if config:
            raise ConfigError(["resume: the resumed sweep reuses the config stored in RUN_DIR; drop --config"])
        return resume_sweep(resume, ledger or ComputeLedger(resume), caps)
    if not config:
        raise ConfigError(["config: pass --config YAML for a new sweep, or --resume RUN_DIR"])
    overrides = list(overrides or [])
    if caps:
        overrides.append(f"flop_caps=[{','.join(repr(c) for c in caps)}]")
        overrides.append("flop_cap=null")
    cfg = load_config(SweepConfig, config, overrides)
    run_dir = run_dir or "runs/sweep"
    return run_sweep(cfg, run_dir, ledger or ComputeLedger(run_dir))
