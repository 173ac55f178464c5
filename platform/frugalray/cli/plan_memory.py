"""`frugalray plan-memory`: the memory planner on the command line (predict peak memory per
device, check a finetune config the way training's preflight does, list what would fit)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

from frugalray.config import ConfigError, load_config
from frugalray.devices import cuda_available
from frugalray.models import DEFAULT_MODEL, resolve_model
from frugalray.train.finetune import FinetuneConfig
from frugalray.train.memory_estimate import DEVICES, METHODS, OPTIMIZERS, estimate_memory, model_arch
from frugalray.train.memory_plan import (
    available_device_memory,
    check_fits,
    fmt_bytes,
    parse_bytes,
    plan_memory,
    setup_from_config,
)


def add_plan_memory_parser(sub) -> None:
    """`frugalray plan-memory`: registered by frugalray.cli.main."""
    p = sub.add_parser(
        "plan-memory",
        help="predict peak memory per device and pick the fastest training configuration that fits",
        description="Predict peak bytes per device (weights, LoRA, gradients, optimizer, activations, logits, "
                    "temporaries) and choose the fastest configuration that fits. With --config, check a "
                    "finetune config as the training preflight does, then show the alternatives.",
    )
    p.add_argument("--model", default=None, help="model name or path (default: the config's, or the embedded default)")
    p.add_argument("--device-memory", default=None, help="per-device memory, e.g. 24GiB (default: this host's)")
    p.add_argument("--device", choices=sorted(DEVICES), default=None, help="device kind (default: cuda if present)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 512, or the config's)")
    p.add_argument("--global-batch", type=int, default=None, help="rows per optimizer step over all devices")
    p.add_argument("--world-size", type=int, default=None, help="most devices to shard over (FSDP); default 1")
    p.add_argument("--method", action="append", choices=list(METHODS), default=None,
                   help="allowed method(s) (repeatable; default all)")
    p.add_argument("--optimizer", action="append", choices=list(OPTIMIZERS), default=None,
                   help="allowed optimizer(s) (repeatable; default adamw and adamw_8bit)")
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--config", default=None, help="a finetune YAML (jobs/configs/finetune.yaml) to check and plan")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (with --config)")
    p.add_argument("--rows", type=int, default=12, help="table rows to show")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_plan_memory(args) -> int:
    """Print the plan; exit 0 when something fits (or the --config fits), 3 when nothing does."""
    cfg: FinetuneConfig | None = None
    if args.config:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
    # The command line wins, then the config, then the planner's defaults.
    model = args.model or (cfg.model if cfg is not None else None) or DEFAULT_MODEL
    arch = model_arch(resolve_model(model, field="--model" if args.model else "model"))
    device = args.device or ("cuda" if cuda_available() else "cpu")
    world = args.world_size or (cfg.num_workers if cfg is not None else 1)
    if args.device_memory:
        try:
            memory = parse_bytes(args.device_memory)
        except ValueError as err:
            raise ConfigError([f"--device-memory: {err}"]) from None
    else:
        memory = available_device_memory(world, device)[0]
    seq_len = args.seq_len or (cfg.seq_len if cfg is not None else 512)
    lora_rank = args.lora_rank or (cfg.lora_rank if cfg is not None else 8)
    targets: str | tuple[str, ...] = "all-linear"
    if cfg is not None and not isinstance(cfg.target_modules, str):
        targets = tuple(cfg.target_modules)
    if args.global_batch:
        global_batch = args.global_batch
    elif cfg is not None:
        global_batch = setup_from_config(cfg, num_workers=cfg.num_workers, device=device).global_batch
    else:
        global_batch = 16
    problems = []
    if seq_len < 1:
        problems.append("--seq-len: must be >= 1")
    if global_batch < 1:
        problems.append("--global-batch: must be >= 1")
    if world < 1:
        problems.append("--world-size: must be >= 1")
    if problems:
        raise ConfigError(problems)

    out: dict[str, Any] = {"model": model, "device": device, "device_memory": memory}
    status = 0
    if cfg is not None:
        setup = replace(setup_from_config(cfg, num_workers=cfg.num_workers, device=device),
                        seq_len=seq_len, lora_rank=lora_rank)
        est = estimate_memory(arch, setup)
        fits = est.peak_bytes <= memory
        out["config"] = {"setup": setup.label(), "fits": fits, **est.breakdown(), "peak_bytes": est.peak_bytes}
        if not args.json:
            print(f"{args.config}: {setup.label()}")
            for name, value in est.breakdown().items():
                print(f"  {name:<12} {fmt_bytes(value):>10}")
            print(f"  {'peak':<12} {fmt_bytes(est.peak_bytes):>10}  of {fmt_bytes(memory)} per device: "
                  f"{'fits' if fits else 'does NOT fit'}")
            if not fits:
                try:
                    check_fits(cfg, memory, arch, num_workers=cfg.num_workers, device=device)
                except ConfigError as err:
                    print("\n".join(f"  {p}" for p in err.problems))
            print()
        status = 0 if fits else 3
    plan = plan_memory(
        arch, memory, seq_len, global_batch, max_world_size=world,
        methods=args.method or ([cfg.method] if cfg is not None else METHODS),
        optimizers=args.optimizer or ("adamw", "adamw_8bit"), device=device, lora_rank=lora_rank,
        target_modules=targets,
    )
    if args.json:
        best = plan.best
        out["plan"] = {
            "best": None if best is None else {"setup": asdict(best.setup), **best.estimate.breakdown(),
                                               "peak_bytes": best.estimate.peak_bytes},
            "suggestions": plan.suggestions,
            "candidates": [{"setup": c.setup.label(), "peak_bytes": c.estimate.peak_bytes, "fits": c.fits,
                            "rel_step_s": c.step_s} for c in plan.candidates],
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"{arch.name}: {arch.total_params / 1e6:.1f}M parameters, {device}")
        print(plan.table(limit=args.rows))
    if cfg is None and plan.best is None:
        status = 3
    return status
