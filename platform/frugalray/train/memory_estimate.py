"""The memory planner's estimate: peak bytes per device of one training configuration, by
component, and its relative step time (the search over configurations and the training preflight
are in frugalray.train.memory_plan).

    arch = model_arch(resolve_model("smollm2-135m-instruct"))
    est = estimate_memory(arch, TrainSetup(method="qlora", seq_len=512, micro_batch=1))
    est.peak_bytes, est.breakdown()            # {"weights": ..., "activations": ..., ...}
    estimate_step_time(arch, TrainSetup(method="qlora"))["step_s"]   # relative, for ranking

Pure arithmetic (no torch import), so it runs before any worker starts. What it counts, per device:

- weights: every parameter in its storage dtype. QLoRA (bitsandbytes NF4) packs two 4-bit
  codes per byte and keeps one absmax per 64 weights; with double quantization that absmax
  is an 8-bit code plus one fp32 scale per 256 absmaxes (and an fp32 offset), i.e. about
  0.127 bits per weight. bitsandbytes quantizes only the decoder's linear layers: the token
  embedding, the norms and the LM head stay in the non-quantized dtype.
- lora: adapter weights, fp32 (PEFT keeps adapters in fp32 even on a bf16/4-bit base).
- gradients: one per trainable weight, in its dtype.
- optimizer: AdamW keeps 2 states in the parameter dtype (8 B per fp32 weight); bitsandbytes
  8-bit AdamW keeps 2 one-byte states plus an fp32 absmax per block of 256 (tensors under
  4,096 elements keep 32-bit states); paged variants hold the same bytes (paging only lets
  them spill to host under pressure, which we do not plan on); SGD without momentum none.
- activations: what autograd saves for backward in a Llama-style decoder with SDPA
  attention, per token per layer (see `saved_per_token_layer`), times micro-batch x seq_len
  x layers. With gradient checkpointing only each layer's input is kept, plus one layer's
  full activations while it is recomputed.
- logits: the LM head's output (batch x seq x vocab), its fp32 copy for the loss when the
  compute dtype is narrower, log-softmax's output, and in backward the two gradients of the
  same size: the largest transient of a small model.
- temporaries: QLoRA's per-layer dequantized weight, FSDP's all-gather of one layer's
  parameters (two, with prefetch) and its unsharded gradients, and the optimizer step's
  scratch (the foreach AdamW on CUDA makes a full-size copy; the CPU loop one tensor's).
- runtime: a device's fixed cost the framework adds once training runs (CPU: ~45 MiB of
  kernel scratch, thread pools and allocator bookkeeping, measured by bench/train_memory.py;
  CUDA's context is not in `max_memory_allocated` and is left out).

What it predicts is the peak of live bytes. On a CPU that is what RSS shows only when glibc
returns freed blocks: by default glibc raises its mmap threshold (up to 32 MiB) each time a
large block is freed, after which freed activations stay in the heap; at seq 512 that made
RSS 1.45x the live peak (1769 vs 1219 MiB for QLoRA on the default model). Setting
MALLOC_MMAP_THRESHOLD_=131072 in a training worker's environment keeps RSS on the prediction,
at the price of a fresh mmap per activation (a CPU LoRA step 1.8x slower); frugalray's workers
use 16 MiB by default (frugalray.ray_utils.worker_env), so on a CPU their RSS can sit above the
predicted live peak, by up to the 1.45x above.

Weights, LoRA, gradients and optimizer states are divided by the FSDP world size (FSDP2
shards every parameter, gradient and state); activations and logits are per device.
The peak is the persistent state plus the larger of the forward/backward phase and the
optimizer-step phase.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from frugalray.budget.flops import ModelShape, train_flops_per_token
from frugalray.models import load_config as load_model_config

Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd")
METHODS: tuple[str, ...] = ("full", "lora", "qlora")

KiB, MiB, GiB = 1024, 1024**2, 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# bitsandbytes NF4 with double quantization: 4 bits per weight; absmax per 64 weights stored
# as an 8-bit code; per 256 absmaxes one fp32 scale (and one fp32 offset for the whole tensor).
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256
# bitsandbytes 8-bit optimizers: block-wise quantized states with one fp32 absmax per 256.
OPT8_BLOCK = 256
OPT8_MIN_SIZE = 4096


# -- model architecture ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelArch:
    """A Llama-style decoder: the FLOP module's `ModelShape` plus what memory also needs."""

    shape: ModelShape
    tied_embeddings: bool = True
    name: str = "model"

    @property
    def embedding_params(self) -> int:
        return self.shape.vocab_size * self.shape.d_model

    @property
    def lm_head_params(self) -> int:
        """Separate LM head weights (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.shape.vocab_size * self.shape.d_model

    @property
    def layer_linear_params(self) -> int:
        return self.shape.attn_linear_params + self.shape.mlp_params

    @property
    def norm_params(self) -> int:
        return (2 * self.shape.n_layers + 1) * self.shape.d_model

    @property
    def total_params(self) -> int:
        s = self.shape
        return self.embedding_params + self.lm_head_params + s.n_layers * self.layer_linear_params + self.norm_params

    @property
    def largest_linear(self) -> int:
        s = self.shape
        return max(s.d_model * s.d_ff, s.d_model * s.n_heads * s.head_dim)


def arch_from_config(config: dict[str, Any], name: str = "model") -> ModelArch:
    """From an HF `config.json` dict (Llama-style decoder)."""
    return ModelArch(
        shape=ModelShape.from_hf_config(config),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        name=name,
    )


def model_arch(path_or_id: str) -> ModelArch:
    """Architecture of a local HF model directory (reads config.json) or a cached HF id."""
    config_file = Path(path_or_id) / "config.json"
    if config_file.is_file():
        return arch_from_config(json.loads(config_file.read_text()), name=Path(path_or_id).name)
    return arch_from_config(load_model_config(path_or_id).to_dict(), name=str(path_or_id))


# -- devices ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """What a kind of device changes in the arithmetic."""

    name: str
    compute_dtype: str  # the dtype activations are computed and saved in
    runtime_bytes: int  # fixed cost once training runs (kernels' scratch, allocator slack)
    activation_overhead: float  # multiplier on activations + logits for allocator slack / fragmentation
    supports_4bit: bool = True
    supports_paged: bool = False
    foreach_optimizer: bool = False  # torch's AdamW uses the foreach (full-size scratch) path
    # relative speed knobs for the planner's time model (see `estimate_step_time`)
    matmul_flops: float = 1.0e11
    interconnect_bytes_per_s: float = 5e9


# CPU numbers come from bench/train_memory.py on this repository's 2-core AVX2 machine:
# once one training step has run, the process holds ~45 MiB beyond its tensors (kernel
# scratch, thread pools, allocator bookkeeping). bf16 compute is emulated on AVX2 CPUs,
# so training computes in fp32 (frugalray.train.loop.resolve_compute_dtype).
CPU = DeviceProfile(
    name="cpu", compute_dtype="float32", runtime_bytes=45 * MiB, activation_overhead=1.0,
    supports_4bit=True, supports_paged=False, foreach_optimizer=False,
    matmul_flops=1.5e11, interconnect_bytes_per_s=2e9,
)
# CUDA: `torch.cuda.max_memory_allocated` counts live (rounded) blocks only, so no slack and no
# context; these settings follow from that and are NOT yet validated on a GPU in this repository.
CUDA = DeviceProfile(
    name="cuda", compute_dtype="bfloat16", runtime_bytes=0, activation_overhead=1.0,
    supports_4bit=True, supports_paged=True, foreach_optimizer=True,
    matmul_flops=4e14, interconnect_bytes_per_s=5e10,
)
DEVICES = {"cpu": CPU, "cuda": CUDA}

# -- one configuration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSetup:
    method: Method = "qlora"
    seq_len: int = 512
    micro_batch: int = 1
    grad_accum: int = 1
    world_size: int = 1
    gradient_checkpointing: bool = False
    optimizer: Optimizer = "adamw"
    lora_rank: int = 8
    target_modules: str | tuple[str, ...] = "all-linear"
    # storage dtype of the weights that are not 4-bit (all of them for full/LoRA); None: fp32 on
    # CPU, bf16 on CUDA (the non-quantized parts of QLoRA likewise)
    weight_dtype: str | None = None
    compute_dtype: str | None = None  # None: the device's
    device: str = "cpu"

    def resolved(self) -> TrainSetup:
        dev = DEVICES[self.device]
        weight = self.weight_dtype or ("bfloat16" if dev.name == "cuda" else "float32")
        compute = self.compute_dtype or dev.compute_dtype
        targets = self.target_modules if isinstance(self.target_modules, str) else tuple(self.target_modules)
        return replace(self, weight_dtype=weight, compute_dtype=compute, target_modules=targets)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def label(self) -> str:
        ck = "ckpt" if self.gradient_checkpointing else "no-ckpt"
        return (
            f"{self.method} {self.optimizer} {ck} world={self.world_size} "
            f"mb={self.micro_batch}x{self.grad_accum}acc seq={self.seq_len}"
        )


@dataclass
class MemoryEstimate:
    """Predicted peak bytes per device and the components that make it up."""

    setup: TrainSetup
    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    temporaries: int
    runtime: int
    peak_bytes: int
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    COMPONENTS = ("weights", "lora", "gradients", "optimizer", "activations", "logits", "temporaries", "runtime")

    def breakdown(self) -> dict[str, int]:
        return {c: int(getattr(self, c)) for c in self.COMPONENTS}

    def to_dict(self) -> dict[str, Any]:
        out = {"setup": asdict(self.setup), **self.breakdown(), "peak_bytes": self.peak_bytes}
        out["trainable_params"] = self.trainable_params
        out["notes"] = list(self.notes)
        return out


def nf4_bytes(n_weights: int) -> float:
    """Bytes of n weights in bitsandbytes NF4 with double quantization."""
    codes = n_weights / 2
    absmax_codes = math.ceil(n_weights / NF4_BLOCK)  # 1 byte each (8-bit quantized absmax)
    scales = math.ceil(absmax_codes / NF4_DQ_BLOCK) * 4 + 4  # fp32 per 256 absmaxes + the offset
    return codes + absmax_codes + scales


def _lora_module_sizes(arch: ModelArch, rank: int, target_modules: str | tuple[str, ...]) -> list[tuple[int, int]]:
    """(numel of A, numel of B) of every LoRA pair in the model."""
    s = arch.shape
    q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    shapes = {
        "q_proj": (s.d_model, q_out), "k_proj": (s.d_model, kv_out), "v_proj": (s.d_model, kv_out),
        "o_proj": (q_out, s.d_model), "gate_proj": (s.d_model, s.d_ff), "up_proj": (s.d_model, s.d_ff),
        "down_proj": (s.d_ff, s.d_model),
    }
    names = list(shapes) if target_modules == "all-linear" else list(target_modules)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"target_modules: unknown module(s) {unknown}; use 'all-linear' or {list(shapes)}")
    return [(rank * shapes[n][0], rank * shapes[n][1]) for n in names] * s.n_layers


def _optimizer_state_bytes(optimizer: str, tensor_sizes: Iterable[int], param_bytes: int) -> float:
    total = 0.0
    for n in tensor_sizes:
        if optimizer in ("adamw", "paged_adamw"):
            total += 2 * n * param_bytes
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            if n < OPT8_MIN_SIZE:  # bitsandbytes keeps small tensors in 32-bit states
                total += 2 * n * 4
            else:
                total += 2 * n + 2 * math.ceil(n / OPT8_BLOCK) * 4
        elif optimizer == "sgd":
            total += 0
        else:
            raise ValueError(f"optimizer: unknown {optimizer!r}; use one of {OPTIMIZERS}")
    return total


def saved_per_token_layer(arch: ModelArch, method: str, lora_rank: int, n_lora_modules: int) -> dict[str, float]:
    """Elements autograd saves per token in one decoder layer (Llama, SDPA flash attention).

    Checked against `torch.autograd.graph.saved_tensors_hooks` on transformers' Llama:
    attention: the residual input and the normed input (shared by q/k/v and their LoRA A),
    RMSNorm's 1/rms; SDPA keeps q, k and v at their own head counts (GQA is native, no
    repeat), and a log-sum-exp per head; its output doubles as o_proj's input. MLP: residual,
    normed input, SiLU's input (gate), SiLU's output and `up` (for the product), and
    down_proj's input. LoRA adds each B's rank-wide input. Full fine-tuning also keeps each
    norm's normalized-but-unscaled output for the norm weight's gradient.
    """
    s = arch.shape
    q_out = s.n_heads * s.head_dim
    kv_out = s.n_kv_heads * s.head_dim
    attn = 2 * s.d_model + 1 + 2 * q_out + 2 * kv_out + s.n_heads
    mlp = 2 * s.d_model + 1 + 4 * s.d_ff
    lora = lora_rank * n_lora_modules / s.n_layers if method in ("lora", "qlora") else 0
    full_extra = 2 * s.d_model if method == "full" else 0
    return {"attention": attn, "mlp": mlp, "lora_fp32": lora, "norm_weight_grads": full_extra}


def estimate_memory(arch: ModelArch, setup: TrainSetup) -> MemoryEstimate:
    """Predicted peak bytes per device of `setup`, by component."""
    st = setup.resolved()
    dev = DEVICES[st.device]
    s = arch.shape
    wb = DTYPE_BYTES[st.weight_dtype]  # type: ignore[index]
    cb = DTYPE_BYTES[st.compute_dtype]  # type: ignore[index]
    world = st.world_size
    notes: list[str] = []

    linear_total = s.n_layers * arch.layer_linear_params
    other_params = arch.embedding_params + arch.lm_head_params + arch.norm_params
    if st.method == "qlora":
        per_layer_4bit = [s.d_model * (s.n_heads * s.head_dim), s.d_model * s.n_kv_heads * s.head_dim,
                          s.d_model * s.n_kv_heads * s.head_dim, s.n_heads * s.head_dim * s.d_model,
                          s.d_model * s.d_ff, s.d_model * s.d_ff, s.d_ff * s.d_model]
        weights = s.n_layers * sum(nf4_bytes(n) for n in per_layer_4bit) + other_params * wb
        notes.append("embedding, norms and LM head are not 4-bit (bitsandbytes skips them)")
    else:
        weights = (linear_total + other_params) * wb

    lora_pairs = _lora_module_sizes(arch, st.lora_rank, st.target_modules) if st.method != "full" else []
    lora_params = sum(a + b for a, b in lora_pairs)
    lora_bytes = lora_params * 4
    if st.method == "full":
        trainable_sizes = [arch.embedding_params] + ([arch.lm_head_params] if arch.lm_head_params else [])
        trainable_sizes += [n for n in _linear_sizes(arch)] * s.n_layers + [s.d_model] * (2 * s.n_layers + 1)
        trainable_bytes = wb
    else:
        trainable_sizes = [n for pair in lora_pairs for n in pair]
        trainable_bytes = 4
    trainable = sum(trainable_sizes)
    grads = trainable * trainable_bytes
    opt_state = _optimizer_state_bytes(st.optimizer, trainable_sizes, trainable_bytes)
    if st.optimizer.startswith("paged") and not dev.supports_paged:
        notes.append(f"paged optimizers fall back to ordinary ones on {dev.name}")

    # Activations on this device: its micro-batch only (FSDP shards parameters, not data).
    tokens = st.micro_batch * st.seq_len
    per_layer = saved_per_token_layer(arch, st.method, st.lora_rank, len(lora_pairs))
    # LoRA's rank-wide activations are fp32 (the adapters' dtype). With a narrower compute
    # dtype PEFT also casts each adapted linear's input to fp32 for its A, and A keeps that copy.
    per_token_layer = (sum(v for k, v in per_layer.items() if k != "lora_fp32") * cb + per_layer["lora_fp32"] * 4)
    if cb < 4 and lora_pairs:
        per_token_layer += sum(a for a, _ in lora_pairs) / st.lora_rank / s.n_layers * 4
    layer_inputs = s.d_model * cb  # what a checkpointed layer keeps
    if st.gradient_checkpointing:
        acts = tokens * (s.n_layers * layer_inputs + per_token_layer)
    else:
        acts = tokens * s.n_layers * per_token_layer
    # Full: the embedding output, and the final norm's input, normalized and scaled outputs
    # (the LM head's weight gradient needs its input). LoRA: the frozen embedding's output
    # needs no gradient (layer 0 keeps one tensor less) and the final norm keeps its input.
    acts += tokens * (3 if st.method == "full" else 0) * s.d_model * cb
    # Backward starts with the logits (compute dtype, still referenced by the model output),
    # log-softmax's fp32 output (saved), its incoming gradient and the gradient of its input,
    # all fp32: cb + 12 bytes per logit. (The loss's fp32 copy of narrow logits is freed after
    # forward, and by the time the gradient is cast back the log-softmax buffers are gone.)
    logit_elems = tokens * s.vocab_size
    logits = logit_elems * (cb + 12)
    acts *= dev.activation_overhead
    logits *= dev.activation_overhead

    # temporaries that live one layer at a time
    temps_fb = 0.0
    if st.method == "qlora":
        temps_fb += arch.largest_linear * cb  # a 4-bit weight dequantized for its matmul
    if world > 1:
        layer_storage = (nf4_bytes(arch.layer_linear_params) if st.method == "qlora"
                         else arch.layer_linear_params * wb) + 2 * s.d_model * wb
        temps_fb += 2 * layer_storage  # all-gathered current layer + the prefetched next one
        layer_trainable = (arch.layer_linear_params + 2 * s.d_model) * wb if st.method == "full" else (
            lora_params / s.n_layers * 4)
        temps_fb += layer_trainable  # unsharded gradients before reduce-scatter

    # optimizer-step scratch
    if st.optimizer in ("adamw", "paged_adamw") and dev.foreach_optimizer:
        temps_opt = trainable * trainable_bytes / world
    else:
        temps_opt = max(trainable_sizes, default=0) * 4

    persistent = (weights + lora_bytes + opt_state) / world
    grads_shard = grads / world
    if st.method == "full":
        # Gradients appear as backward frees activations; at its start only the LM head's
        # (tied: the embedding's) gradient exists. With accumulation, all persist across micro-batches.
        # While the LM head's backward runs, the logits and their gradient are alive beside it.
        head_grad = (arch.lm_head_params or arch.embedding_params) * wb / world
        head_phase = acts + logit_elems * 2 * max(cb, 4) * dev.activation_overhead + head_grad
        fb = max(acts + logits, head_phase, grads_shard + acts / s.n_layers) if st.grad_accum == 1 else (
            acts + logits + grads_shard)
    else:
        fb = acts + logits + grads_shard
    fb += temps_fb
    opt_phase = grads_shard + temps_opt
    peak = persistent + max(fb, opt_phase) + dev.runtime_bytes
    temporaries = temps_fb if fb >= opt_phase else temps_opt
    return MemoryEstimate(
        setup=st,
        weights=int(weights / world),
        lora=int(lora_bytes / world),
        gradients=int(grads_shard),
        optimizer=int(opt_state / world),
        activations=int(acts),
        logits=int(logits),
        temporaries=int(temporaries),
        runtime=int(dev.runtime_bytes),
        peak_bytes=int(peak),
        trainable_params=int(trainable),
        notes=notes,
    )


def _linear_sizes(arch: ModelArch) -> list[int]:
    s = arch.shape
    q_out, kv_out = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return [s.d_model * q_out, s.d_model * kv_out, s.d_model * kv_out, q_out * s.d_model,
            s.d_model * s.d_ff, s.d_model * s.d_ff, s.d_ff * s.d_model]

# -- speed model -----------------------------------------------------------------------------------
def estimate_step_time(arch: ModelArch, setup: TrainSetup) -> dict[str, float]:
    """Relative seconds per optimizer step (for ranking candidates, not a promise).

    compute = the FLOP module's training FLOPs of this device's tokens (with checkpointing's
    recompute) / the device's matmul rate, divided by a utilization that falls for small
    micro-batches (a matmul of few rows cannot keep the device busy: tokens / (tokens + 256)
    on CPU, / (tokens + 2048) on CUDA); x1.25 for QLoRA (dequantizing each 4-bit weight
    before its matmul, forward and backward).
    optimizer = reading and writing every trainable weight's states once per step; 8-bit
    states cost a further 25% for (de)quantization, and 1% of the step (its extra kernels), so
    that between otherwise equal candidates the exact 32-bit optimizer wins.
    communication = FSDP all-gathers each layer's parameters in forward and backward and
    reduce-scatters gradients, once per micro-batch, at the interconnect's rate.
    """
    st = setup.resolved()
    dev = DEVICES[st.device]
    s = arch.shape
    lora_params = s.lora_params(st.lora_rank, st.target_modules if st.target_modules == "all-linear"
                                else list(st.target_modules)) if st.method != "full" else 0
    tokens = st.micro_batch * st.seq_len
    flops = train_flops_per_token(s, st.seq_len, st.method, lora_params, st.gradient_checkpointing)  # type: ignore[arg-type]
    flops *= tokens * st.grad_accum
    saturation = 256 if dev.name == "cpu" else 2048
    utilization = tokens / (tokens + saturation)
    compute = flops / (dev.matmul_flops * utilization) * (1.25 if st.method == "qlora" else 1.0)

    trainable = arch.total_params if st.method == "full" else lora_params
    wb = DTYPE_BYTES[st.weight_dtype] if st.method == "full" else 4  # type: ignore[index]
    state_bytes = _optimizer_state_bytes(st.optimizer, [trainable], wb) if st.optimizer != "sgd" else 0
    # memory-bound: read weight + grad + states, write weight + states, at ~ matmul_flops / 10 bytes/s
    optimizer = (trainable * wb * 3 + 2 * state_bytes) / st.world_size / (dev.matmul_flops / 10)
    if "8bit" in st.optimizer:
        optimizer *= 1.25

    comm = 0.0
    if st.world_size > 1:
        storage = estimate_memory(arch, replace(st, world_size=1)).weights
        grads = (arch.total_params * wb) if st.method == "full" else lora_params * 4
        per_micro = (2 * storage + grads) * (st.world_size - 1) / st.world_size
        comm = per_micro * st.grad_accum / dev.interconnect_bytes_per_s
    total = compute + optimizer + comm
    if "8bit" in st.optimizer:
        total *= 1.01
    return {"compute_s": compute, "optimizer_s": optimizer, "comm_s": comm, "step_s": total,
            "tokens_per_s": st.global_batch * st.seq_len / total if total else 0.0}
