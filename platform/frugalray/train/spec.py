"""`TrainingSpec`: everything one training run needs, typed once.

What a `TrainingSession` (frugalray.train.loop) builds and runs, and what the memory planner
(frugalray.train.memory_plan) sizes: the method and its LoRA settings, the optimizer and schedule, the
batch, the sequence length, the compute dtype and the device. `FinetuneConfig` is a TrainingSpec
plus where the data and workers are; a sweep trial is a TrainingSpec with the searched values set;
the curation proxies (`AutoSettings.proxy`, `DynamicsSettings.proxy`) each hold one.

It crosses to Ray workers as its JSON dict and is re-validated at the worker's door
(`FinetuneConfig.model_validate(d)`, `DynamicsSettings.model_validate(d)`), so a worker never
reads a key with a default of its own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import Field

from frugalray.config import StrictModel

Method = Literal["qlora", "lora", "full"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw"]
Schedule = Literal["constant", "linear", "cosine"]
Device = Literal["auto", "cpu", "cuda"]


class TrainingSpec(StrictModel):
    # The descriptions are what `frugalray finetune --help` prints for each key.
    method: Method = Field("qlora", description=(
        "full: every weight trains; lora: fp32 base + LoRA; qlora: NF4 4-bit base (double quant) + LoRA"))
    lora_rank: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        "all-linear", description="modules that get LoRA: all-linear, or names such as [q_proj, v_proj]")
    # On an AVX2-only CPU bf16 compute made each step ~27x slower, hence auto.
    compute_dtype: ComputeDtype = Field("auto", description=(
        "matmul dtype; auto: bfloat16 where it is native (CUDA, AVX512-BF16, AMX), else float32; "
        "an explicit value is what runs, on any machine"))
    optimizer: Optimizer = Field("adamw", description=(
        "adamw (torch), adamw_8bit (bitsandbytes 8-bit states), paged_adamw (bitsandbytes; CUDA only)"))
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: Schedule = Field("constant", description="LR after warmup: constant, linear or cosine decay to 0")
    warmup_steps: int = Field(0, ge=0, description="steps of linear LR warmup")
    max_grad_norm: float | None = Field(1.0, gt=0, description=(
        "clip the global gradient norm before each update (HF Trainer's default 1.0); null: no clipping"))
    max_steps: int = Field(20, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="rows per worker per micro-batch")
    grad_accum_steps: int = Field(1, ge=1, description=(
        "micro-batches per optimizer step: global batch = batch_size x grad_accum_steps x num_workers"))
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory, slower)")
    seq_len: int = Field(128, ge=8, le=8192, description="tokens per row; longer rows are truncated")
    data_order: Literal["shuffle", "as_given"] = Field("shuffle", description=(
        "shuffle: a seeded permutation per epoch; as_given: the file's order (e.g. select's curriculum)"))
    length_bucketing: bool = Field(False, description="put rows of similar length in one micro-batch (less padding)")
    device: Device = Field("auto", description=(
        "auto: GPUs when the running nodes or the autoscaler's node types can give one per worker, else CPU; "
        "cuda: GPUs (refused before launch when the cluster can never provide them)"))
    accelerator: str | None = Field(None, description=(
        "GPU model to ask Ray for (its accelerator_type, e.g. A10G, L4, A100-80G); null: any GPU"))
    seed: int = Field(0, description="model init, data order and dropout")

    def training_spec(self) -> TrainingSpec:
        """Just the training fields (a subclass such as FinetuneConfig carries more)."""
        return TrainingSpec.model_validate(self.model_dump(include=set(TrainingSpec.model_fields)))

    def with_values(self, **values: Any) -> Self:
        """A copy with `values` set, validated as a new config is (pydantic's model_copy is not)."""
        return type(self).model_validate({**self.model_dump(), **values})


def refuse_flat_training_keys(data: Any, section: str, renamed: dict[str, str] | None = None) -> Any:
    """For a `mode="before"` validator of a config that nests its training run under `proxy`:
    training keys written flat (where they used to be) are refused, each naming its new place.

    `renamed`: old flat key -> its field in the spec (e.g. proxy_steps -> max_steps)."""
    if not isinstance(data, dict):
        return data
    renamed = renamed or {}
    moved = {k: renamed.get(k, k) for k in data if k in renamed or k in TrainingSpec.model_fields}
    if moved:
        where = "; ".join(f"{section}.{old} moved to {section}.proxy.{new}" for old, new in moved.items())
        raise ValueError(f"{where} (the proxy's training settings are one TrainingSpec under {section}.proxy)")
    return data
