"""The memory planner's search and the training preflight, on top of frugalray.train.memory_estimate.

    arch = model_arch(resolve_model("smollm2-135m-instruct"))
    plan = plan_memory(arch, device_memory=24 * GiB, seq_len=512, global_batch=16, max_world_size=2)
    print(plan.table())                        # every candidate, fastest that fits first
    memory_problems(cfg, model_path)           # [] when a finetune config is predicted to fit

Plan mode enumerates every method x optimizer x checkpointing x world size x micro-batch split
of a global batch, estimates each, and ranks those that fit by predicted step time; when none
fits it says which single change would (more memory, more devices, another method, a shorter
seq_len). The preflight checks one `TrainingSpec` against a device's memory and, when it does
not fit, names the fields to change and the least drastic value that fits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from frugalray.config import ConfigError
from frugalray.devices import cuda_available
from frugalray.train.memory_estimate import (
    DEVICES,
    METHODS,
    GiB,
    KiB,
    MemoryEstimate,
    MiB,
    ModelArch,
    TrainSetup,
    estimate_memory,
    estimate_step_time,
    model_arch,
)
from frugalray.train.spec import TrainingSpec


# -- sizes -----------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{int(n)}B"


def parse_bytes(text: str | float) -> int:
    """'24GiB', '24 GB', '512MiB', '1.5e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}; write e.g. 24GiB, 16GB or 512MiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": KiB, "M": MiB, "G": GiB, "T": 1024**4,
             "KIB": KiB, "MIB": MiB, "GIB": GiB, "TIB": 1024**4, "KI": KiB, "MI": MiB, "GI": GiB}.get(unit)
    if scale is None:
        raise ValueError(f"unknown unit in {text!r}; use B, KiB, MiB, GiB, GB")
    return int(float(m.group(1)) * scale)


# -- plan mode -------------------------------------------------------------------------------------
@dataclass
class Candidate:
    setup: TrainSetup
    estimate: MemoryEstimate
    step_s: float
    tokens_per_s: float
    fits: bool


@dataclass
class MemoryPlan:
    device_memory: int
    seq_len: int
    global_batch: int
    candidates: list[Candidate]  # fits first, then by speed
    suggestions: list[str]

    @property
    def best(self) -> Candidate | None:
        return next((c for c in self.candidates if c.fits), None)

    def table(self, limit: int = 12) -> str:
        """The choice and its runners-up (and the closest misses), one row each."""
        rows = [c for c in self.candidates if c.fits][:limit]
        misses = sorted((c for c in self.candidates if not c.fits), key=lambda c: c.estimate.peak_bytes)
        rows += misses[: max(3, limit - len(rows)) if not rows else 3]
        head = (f"{'':2}{'method':6} {'optimizer':11} {'ckpt':4} {'world':>5} {'mbxacc':>7} "
                f"{'weights':>8} {'optim':>8} {'activ':>8} {'logits':>8} {'peak':>9} {'fits':>4} {'rel step':>8}")
        best = self.best
        fastest = best.step_s if best else min((c.step_s for c in self.candidates), default=1.0)
        lines = [(f"device memory {fmt_bytes(self.device_memory)}, seq_len {self.seq_len}, "
                  f"global batch {self.global_batch}"), head]
        for c in rows:
            e, st = c.estimate, c.setup
            mark = "->" if c is best else "  "
            lines.append(
                f"{mark}{st.method:6} {st.optimizer:11} {'on' if st.gradient_checkpointing else 'off':4} "
                f"{st.world_size:>5} {f'{st.micro_batch}x{st.grad_accum}':>7} {fmt_bytes(e.weights):>8} "
                f"{fmt_bytes(e.optimizer):>8} {fmt_bytes(e.activations):>8} {fmt_bytes(e.logits):>8} "
                f"{fmt_bytes(e.peak_bytes):>9} {'yes' if c.fits else 'no':>4} {c.step_s / fastest:>8.2f}"
            )
        if best:
            lines.append(f"chosen: {best.setup.label()} — the fastest of {sum(c.fits for c in self.candidates)} "
                         f"configurations that fit (predicted peak {fmt_bytes(best.estimate.peak_bytes)}, "
                         f"{fmt_bytes(self.device_memory - best.estimate.peak_bytes)} to spare)")
        else:
            lines.append(f"nothing fits in {fmt_bytes(self.device_memory)} per device.")
        lines += [f"  - {s}" for s in self.suggestions]
        return "\n".join(lines)


def enumerate_setups(
    seq_len: int,
    global_batch: int,
    max_world_size: int = 1,
    methods: Iterable[str] = METHODS,
    optimizers: Iterable[str] = ("adamw", "adamw_8bit"),
    checkpointing: Iterable[bool] = (False, True),
    world_sizes: Iterable[int] | None = None,
    device: str = "cpu",
    lora_rank: int = 8,
    target_modules: str | tuple[str, ...] = "all-linear",
) -> list[TrainSetup]:
    """Every (method, optimizer, checkpointing, world size, micro-batch x accumulation) whose
    micro-batch x accumulation x world size equals the global batch."""
    worlds = list(world_sizes) if world_sizes is not None else list(range(1, max_world_size + 1))
    out = []
    for world in worlds:
        if global_batch % world:
            continue
        per_device = global_batch // world
        micro_batches = [m for m in range(1, per_device + 1) if per_device % m == 0]
        for method in methods:
            if method == "qlora" and not DEVICES[device].supports_4bit:
                continue
            for opt in optimizers:
                for ckpt in checkpointing:
                    for mb in micro_batches:
                        out.append(TrainSetup(
                            method=method, seq_len=seq_len, micro_batch=mb, grad_accum=per_device // mb,  # type: ignore[arg-type]
                            world_size=world, gradient_checkpointing=ckpt, optimizer=opt,  # type: ignore[arg-type]
                            lora_rank=lora_rank, target_modules=target_modules, device=device,
                        ))
    return out


def plan_memory(
    arch: ModelArch,
    device_memory: int,
    seq_len: int,
    global_batch: int,
    max_world_size: int = 1,
    methods: Iterable[str] = METHODS,
    optimizers: Iterable[str] = ("adamw", "adamw_8bit"),
    device: str = "cpu",
    world_sizes: Iterable[int] | None = None,
    checkpointing: Iterable[bool] = (False, True),
    lora_rank: int = 8,
    target_modules: str | tuple[str, ...] = "all-linear",
    headroom: float = 0.0,
    suggest: bool = True,
) -> MemoryPlan:
    """Rank every configuration by predicted step time; the fastest that fits comes first.

    `headroom` keeps that fraction of the device free (e.g. 0.1 for other tenants).
    """
    methods, optimizers = list(methods), list(optimizers)
    usable = device_memory * (1.0 - headroom)
    setups = enumerate_setups(seq_len, global_batch, max_world_size, methods, optimizers, checkpointing,
                              world_sizes, device, lora_rank, target_modules)
    candidates = []
    for st in setups:
        est = estimate_memory(arch, st)
        speed = estimate_step_time(arch, st)
        candidates.append(Candidate(st, est, speed["step_s"], speed["tokens_per_s"], est.peak_bytes <= usable))
    candidates.sort(key=lambda c: (not c.fits, c.step_s, c.estimate.peak_bytes))
    plan = MemoryPlan(int(device_memory), seq_len, global_batch, candidates, [])
    if plan.best is None and suggest:
        plan.suggestions = _what_would_fit(arch, candidates, usable, device_memory, seq_len, global_batch,
                                           max_world_size, methods, optimizers, device, lora_rank, target_modules)
    return plan


def _what_would_fit(arch, candidates, usable, device_memory, seq_len, global_batch, max_world_size,
                    methods, optimizers, device, lora_rank, target_modules) -> list[str]:
    out = []
    if candidates:
        smallest = min(candidates, key=lambda c: c.estimate.peak_bytes)
        need = smallest.estimate.peak_bytes / (usable / device_memory)
        out.append(f"device memory: the smallest configuration ({smallest.setup.label()}) needs "
                   f"{fmt_bytes(need)} per device; a device with that much would fit it")
    for world in (2, 4, 8, 16, 32, 64):
        if world <= max_world_size or global_batch % world:
            continue
        alt = plan_memory(arch, device_memory, seq_len, global_batch, world_sizes=[world], methods=methods,
                          optimizers=optimizers, device=device, lora_rank=lora_rank, target_modules=target_modules,
                          suggest=False)
        if alt.best:
            out.append(f"world size: sharding over {world} devices fits ({alt.best.setup.label()}, "
                       f"{fmt_bytes(alt.best.estimate.peak_bytes)} per device)")
            break
    missing = [m for m in ("qlora", "lora") if m not in methods]
    if missing:
        alt = plan_memory(arch, device_memory, seq_len, global_batch, max_world_size, methods=missing,
                          optimizers=optimizers, device=device, lora_rank=lora_rank, target_modules=target_modules,
                          suggest=False)
        if alt.best:
            out.append(f"method: {alt.best.setup.method} fits ({alt.best.setup.label()})")
    seq = seq_len // 2
    while seq >= 64:
        alt = plan_memory(arch, device_memory, seq, global_batch, max_world_size, methods=methods,
                          optimizers=optimizers, device=device, lora_rank=lora_rank, target_modules=target_modules,
                          suggest=False)
        if alt.best:
            out.append(f"seq_len: {seq} tokens fits ({alt.best.setup.label()})")
            break
        seq //= 2
    return out


# -- training preflight ----------------------------------------------------------------------------
def setup_from_config(spec: TrainingSpec, *, num_workers: int, device: str = "cpu") -> TrainSetup:
    """The `TrainSetup` a `TrainingSpec` (or a FinetuneConfig) trains with on `num_workers` devices."""
    targets = spec.target_modules
    return TrainSetup(
        method=spec.method,
        seq_len=spec.seq_len,
        micro_batch=spec.batch_size,
        grad_accum=spec.grad_accum_steps,
        world_size=num_workers,
        gradient_checkpointing=spec.gradient_checkpointing,
        optimizer=spec.optimizer,
        lora_rank=spec.lora_rank,
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        compute_dtype=None if spec.compute_dtype == "auto" else spec.compute_dtype,  # None: the device's
        device=device,
    )


def check_fits(
    spec: TrainingSpec,
    device_memory_bytes: int,
    arch: ModelArch,
    *,
    num_workers: int,
    device: str = "cpu",
    field_prefix: str = "",
) -> MemoryEstimate:
    """Raise `ConfigError` when `spec` on `num_workers` devices is predicted not to fit in
    `device_memory_bytes` per device; otherwise return the estimate.

    The message names the fields to change and the smallest change that would fit (checked
    one knob at a time: gradient_checkpointing, batch_size, method, optimizer, num_workers).
    """
    setup = setup_from_config(spec, num_workers=num_workers, device=device)
    est = estimate_memory(arch, setup)
    if est.peak_bytes <= device_memory_bytes:
        return est
    p = field_prefix
    fixes = []
    tries: list[tuple[str, TrainSetup]] = []
    if not setup.gradient_checkpointing:
        tries.append((f"{p}gradient_checkpointing: true", replace(setup, gradient_checkpointing=True)))
    mb = setup.micro_batch // 2
    while mb >= 1:
        tries.append((f"{p}batch_size: {mb}", replace(setup, micro_batch=mb)))
        mb //= 2
    for method in ("lora", "qlora"):
        if METHODS.index(method) > METHODS.index(setup.method):
            tries.append((f"{p}method: {method}", replace(setup, method=method)))  # type: ignore[arg-type]
    if "8bit" not in setup.optimizer and setup.optimizer != "sgd":
        tries.append((f"{p}optimizer: adamw_8bit", replace(setup, optimizer="adamw_8bit")))
    for world in (2, 4, 8):
        if world > setup.world_size:
            tries.append((f"{p}num_workers: {world}", replace(setup, world_size=world)))
    for label, alt in tries:
        alt_peak = estimate_memory(arch, alt).peak_bytes
        if alt_peak <= device_memory_bytes:
            fixes.append(f"{label} (predicted {fmt_bytes(alt_peak)})")
            if label.startswith(f"{p}batch_size"):
                tries = [t for t in tries if not t[0].startswith(f"{p}batch_size")]
    # one fix per knob: the first (least drastic) that fits
    seen, unique = set(), []
    for f in fixes:
        knob = f.split(":")[0]
        if knob not in seen:
            seen.add(knob)
            unique.append(f)
    top = sorted(est.breakdown().items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in top)
    fix_text = ("; fix: set " + " or ".join(unique)) if unique else (
        "; no single change fits: lower seq_len, or run `frugalray plan-memory` to search every knob")
    message = (
        f"{p}method/{p}batch_size/{p}seq_len/{p}num_workers: predicted peak {fmt_bytes(est.peak_bytes)} per device "
        f"({setup.label()}; largest: {parts}) exceeds the {fmt_bytes(device_memory_bytes)} available{fix_text}"
    )
    raise ConfigError([message])


def available_device_memory(world_size: int = 1, device: str | None = None) -> tuple[int, str]:
    """(bytes per device, device kind): CUDA free memory, or this host's available RAM / workers."""
    try:
        import torch

        if (device in (None, "cuda")) and torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return int(free), "cuda"
    except ImportError:
        pass
    import psutil

    return int(psutil.virtual_memory().available // max(1, world_size)), "cpu"


def memory_problems(cfg: TrainingSpec, model_path: str, *, num_workers: int = 1,
                    device_memory: int | str | None = None, device: str | None = None,
                    field_prefix: str = "") -> list[str]:
    """For a training preflight that collects every problem: [] when `cfg` is predicted to fit
    on each of `num_workers` devices of `device_memory` ("24GiB"; None: what this host has, free
    CUDA memory or available RAM / num_workers).

    `device` ("cuda" / "cpu") picks the memory profile: say it when the job runs elsewhere than this
    process (a GPU node the autoscaler adds); None: this process's device."""
    world = num_workers
    if device_memory is None:
        memory, found = available_device_memory(world, device)
        device = device or found
    else:
        memory, device = parse_bytes(device_memory), (device or ("cuda" if cuda_available() else "cpu"))
    try:
        check_fits(cfg, memory, model_arch(model_path), num_workers=world, device=device, field_prefix=field_prefix)
    except ConfigError as err:
        return list(err.problems)
    except ValueError as err:  # e.g. unknown target modules: reported by the caller's own checks
        return [f"{field_prefix}{err}"]
    return []
