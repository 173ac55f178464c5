"""The training loop shared by `finetune` (Ray Train workers) and `sweep` (Tune trials).

`TrainingSession` owns one model (full, LoRA or QLoRA), its optimizer and LR schedule and a
deterministic data order (`frugalray.train.batching.BatchPlan`), and exposes `step()` and
`evaluate()`. Each call returns what it spent: real (non-pad) tokens and FLOPs from
`frugalray.budget.flops`. Callers decide when to stop (a step count, a FLOP reservation), so
the loop itself holds no budget policy.

With `world_size > 1` inside an initialized `torch.distributed` process group (as Ray Train
sets up), the model is sharded with FSDP2 (`frugalray.train.fsdp`) and each rank reads its
own slice of every global batch. The loss of every micro-batch is its *summed* token loss
divided by the number of loss tokens in the whole global batch (all ranks, all micro-batches),
and FSDP sums gradients across ranks: the update is exactly the one a single process makes
on the same global batch, whatever the padding or the split of tokens between ranks.

A session's full training state (trainable weights, optimizer, LR schedule, data position,
every rank's RNG state, per-step history) goes to and comes back from a directory with
`save_checkpoint` / `load_checkpoint` (see `frugalray.train.checkpointing`).
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from frugalray.budget.flops import ModelShape, forward_flops_per_token, train_flops_per_token
from frugalray.devices import has_fast_bf16
from frugalray.examples.formatting import IGNORE_INDEX, pad_batch, tokenize_example
from frugalray.models import load_causal_lm, load_tokenizer, model_shape
from frugalray.train.batching import BatchPlan
from frugalray.train.checkpointing import load_training_state, save_training_state
from frugalray.train.four_bit import keep_4bit_weights_unpacked, packed_4bit_layers
from frugalray.train.fsdp import broadcast_from_rank0, load_4bit_once_per_node, shard_model
from frugalray.train.spec import TrainingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss over response tokens of the global batch
    tokens: int  # real (non-pad) tokens processed, summed over ranks
    flops: float  # FLOPs of those tokens, summed over ranks


def lora_param_count(shape: ModelShape, rank: int, target_modules: str | list[str]) -> int:
    return shape.lora_params(rank, target_modules)


def train_step_flops_upper_bound(
    shape: ModelShape, batch_size: int, seq_len: int, method: str, lora_params: int, world_size: int = 1,
    accum_steps: int = 1, gradient_checkpointing: bool = False,
) -> float:
    """FLOPs of one step if every row filled seq_len: never below what a real step spends."""
    per_token = train_flops_per_token(shape, seq_len, method, lora_params, gradient_checkpointing)  # type: ignore[arg-type]
    return per_token * batch_size * seq_len * world_size * accum_steps


def eval_flops_upper_bound(shape: ModelShape, n_rows: int, seq_len: int, lora_params: int) -> float:
    return forward_flops_per_token(shape, seq_len, lora_params) * n_rows * seq_len


def resolve_compute_dtype(name: str) -> str:
    if name == "auto":
        return "bfloat16" if has_fast_bf16() else "float32"
    return name


def default_threads(parallel_jobs: int) -> int:
    """Ray sets OMP_NUM_THREADS=1 in 1-CPU workers; on a small box that halves speed for nothing."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel_jobs))


def build_optimizer(name: str, params: list[Any], lr: float, weight_decay: float = 0.0):
    """adamw (torch), adamw_8bit (bitsandbytes 8-bit states), paged_adamw (bitsandbytes, CUDA paging)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw":
        return bnb.optim.PagedAdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown optimizer {name!r}")


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the base LR after `step` optimizer steps (linear warmup, then the schedule)."""
    import math

    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler: unknown schedule {schedule!r}")


class TrainingSession:
    """One model (full / LoRA / QLoRA) + optimizer + LR schedule + a seeded data order.

    `spec` says what to train and how (a `FinetuneConfig` is one); rows are dicts with `prompt`
    and `response`. The session evaluates on `eval_rows` when it is given any.
    """

    def __init__(
        self,
        spec: TrainingSpec,
        model_path: str,
        train_rows: list[dict[str, str]],
        eval_rows: list[dict[str, str]],
        rank: int = 0,
        world_size: int = 1,
        threads: int | None = None,
        device: Any = None,
        fsdp: bool | None = None,
    ):
        import torch


        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        # FSDP whenever there is more than one rank; `fsdp=True` also wraps a single rank (GPU check).
        self.use_fsdp = self.distributed and (world_size > 1 if fsdp is None else fsdp)
        self.device = torch.device(device or "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads or default_threads(world_size))

        self.method = spec.method
        self.batch_size = spec.batch_size
        self.accum_steps = spec.grad_accum_steps
        self.seq_len = spec.seq_len
        self.max_steps = spec.max_steps
        self.gradient_checkpointing = spec.gradient_checkpointing
        self.shape = model_shape(model_path)
        self.lora_params = 0 if self.method == "full" else lora_param_count(
            self.shape, spec.lora_rank, spec.target_modules
        )
        self.tokenizer = load_tokenizer(model_path)
        # An explicit dtype is what runs (bf16 on a CPU without native bf16 is slow, never wrong);
        # "auto" picks bf16 only where it is native.
        self.compute_dtype = resolve_compute_dtype(spec.compute_dtype)
        self.max_grad_norm = spec.max_grad_norm

        torch.manual_seed(spec.seed)
        self.model = self._build_model(model_path)
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(_numel(p) for p in self._trainable)
        expected = self.lora_params if self.method != "full" else None
        if expected is not None and self.trainable_params != expected:
            log.warning("trainable parameters %d differ from the FLOP module's LoRA count %d",
                        self.trainable_params, expected)
        self.optimizer = build_optimizer(spec.optimizer, self._trainable, spec.learning_rate, spec.weight_decay)
        _assert_optimizer_owns_model_params(self.optimizer, self.model)
        schedule, warmup = spec.lr_scheduler, spec.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.max_steps, schedule, warmup)
        )

        def encode(rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
            encoded = [tokenize_example(self.tokenizer, r["prompt"], r["response"], self.seq_len) for r in rows]
            # A row whose response was truncated away has no loss tokens: it would give NaN.
            return [e for e in encoded if any(t != IGNORE_INDEX for t in e["labels"])]

        self.train_examples = encode(train_rows)
        self.eval_examples = encode(eval_rows)[rank::world_size] if eval_rows else []
        self._eval_total = len(encode(eval_rows)) if eval_rows else 0
        if not self.train_examples:
            raise ValueError(
                f"seq_len: no training row keeps a response token within {self.seq_len} tokens; raise seq_len"
            )
        dropped = len(train_rows) - len(self.train_examples)
        if dropped:
            log.warning("dropped %d training rows whose response lies beyond seq_len=%d", dropped, self.seq_len)
        lengths = [len(e["input_ids"]) for e in self.train_examples] if spec.length_bucketing else None
        self.plan = BatchPlan(
            n_rows=len(self.train_examples), micro_batch=self.batch_size, accum_steps=self.accum_steps,
            world_size=world_size, seed=spec.seed, order=spec.data_order, lengths=lengths,
        )
        self.steps_done = 0
        self.history: list[dict[str, Any]] = []  # one entry per optimizer step (rank 0's view)
        self.extras: dict[str, Any] = {}  # caller's figures that must survive a restart
        random.seed(spec.seed + rank)

    # -- model ------------------------------------------------------------------------
    def _build_model(self, model_path: str):
        """Load, wrap with LoRA, enable checkpointing, shard. FSDP ranks > 0 never hold full weights
        for full/LoRA: they build on the meta device and receive their shards from rank 0. For
        QLoRA one rank per node quantizes and the others load its 4-bit checkpoint."""
        import torch


        quantized = self.method == "qlora"
        meta_load = self.use_fsdp and not quantized and self.rank != 0
        if meta_load:
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)
        elif quantized and self.use_fsdp:

            model = load_4bit_once_per_node(model_path, self.compute_dtype)
        else:
            model = load_causal_lm(model_path, quantize_4bit=quantized, compute_dtype=self.compute_dtype)
        if quantized:
            from peft import prepare_model_for_kbit_training


            # Evaluation in this session must not repack the 4-bit weights (that cuts gradients).
            keep_4bit_weights_unpacked(model)

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if self.method != "full":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=self.spec.lora_rank,
                lora_alpha=self.spec.lora_alpha,
                lora_dropout=self.spec.lora_dropout,
                target_modules=self.spec.target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
            if self.gradient_checkpointing and not quantized:
                model.enable_input_require_grads()
        if self.device.type != "cpu" and not meta_load:
            model = model.to(self.device)
        if self.use_fsdp:

            full_state = None if meta_load or quantized else _trainable_and_base_state(model)
            shard_model(model)
            if not quantized:
                # Rank 0 loaded (and LoRA-initialized) the weights; everyone else gets their shard.
                broadcast_from_rank0(model, full_state, self.device, is_meta=meta_load)
            del full_state
        return model

    # -- data ---------------------------------------------------------------------------
    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed or self.world_size == 1:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def _comm_device(self):
        import torch

        return self.device if torch.distributed.get_backend() == "nccl" else "cpu"

    def _autocast(self, plain_weights: bool):
        import torch

        # 4-bit layers compute in their own compute dtype; full-precision weights need autocast for bf16.
        if plain_weights and self.compute_dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _loss_sum(self, batch: dict[str, Any], model: Any = None):
        import torch.nn.functional as F


        with self._autocast(plain_weights=model is not None or self.method != "qlora"):
            logits = (model or self.model)(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
        shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        targets = batch["labels"][:, 1:].reshape(-1)
        return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) for k, v in batch.items()} if self.device.type != "cpu" else batch

    # -- training -------------------------------------------------------------------------
    def step(self) -> StepStats:
        """One optimizer step on the next global batch: gradients, clipping, update, schedule."""
        import torch

        stats = self.compute_gradients()
        grad_norm = None
        if self.max_grad_norm:
            # A DTensor norm under FSDP: the total over every rank's shard, as a single process has it.
            total = torch.nn.utils.clip_grad_norm_(self._trainable, float(self.max_grad_norm))
            grad_norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.history.append({"step": self.steps_done, "loss": stats.loss, "tokens": stats.tokens,
                             "flops": stats.flops, "epoch": self.plan.epoch_of(self.steps_done - 1),
                             **({"grad_norm": grad_norm} if grad_norm is not None else {})})
        return stats

    def compute_gradients(self) -> StepStats:
        """Forward and backward of the next global batch (this rank's slice); gradients accumulate
        in the trainable parameters and nothing is updated. `step()` is this plus the update."""

        if self.method == "qlora":

            unsafe = packed_4bit_layers(self.model)
            if unsafe:
                raise RuntimeError(
                    f"{len(unsafe)} 4-bit layers (e.g. {unsafe[0]}) are repacked for CPU inference or may "
                    "repack: their matmul has no backward and would silently drop gradients"
                )
        micro = [
            pad_batch([self.train_examples[i] for i in rows], self.tokenizer.pad_token_id)
            for rows in self.plan.micro_batches(self.steps_done, self.rank)
        ]
        my_loss_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        (global_loss_tokens,) = self._all_reduce_sum([float(my_loss_tokens)])
        self.model.train()
        loss_sum, tokens, flops = 0.0, 0, 0.0
        for i, batch in enumerate(micro):
            if self.use_fsdp:
                # Reduce-scatter once per optimizer step, after the last micro-batch.
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            part = self._loss_sum(self._to_device(batch))
            (part / global_loss_tokens).backward()
            loss_sum += float(part.detach())
            n = int(batch["attention_mask"].sum())
            width = int(batch["input_ids"].shape[1])
            tokens += n
            flops += train_flops_per_token(
                self.shape, width, self.method, self.lora_params, self.gradient_checkpointing
            ) * n
        loss_all, tokens_all, flops_all = self._all_reduce_sum([loss_sum, tokens, flops])
        return StepStats(loss=loss_all / global_loss_tokens, tokens=int(tokens_all), flops=flops_all)

    def evaluate(self, model: Any = None) -> StepStats | None:
        """Token-weighted mean loss over the eval rows (split over ranks); None without rows.

        `model`: another model with full-precision weights to score on the same rows at this
        session's compute dtype (e.g. the unquantized base, to measure what 4-bit costs)."""
        if not self._eval_total:
            return None
        import torch


        (model or self.model).eval()
        # FSDP all-gathers inside every forward: all ranks must run the same number of them.
        per_rank = -(-self._eval_total // self.world_size)
        n_batches = -(-per_rank // self.batch_size)
        nll, loss_tokens, tokens, flops = 0.0, 0, 0, 0.0
        with torch.no_grad():
            for b in range(n_batches):
                chunk = self.eval_examples[b * self.batch_size : (b + 1) * self.batch_size]
                dummy = not chunk
                batch = pad_batch(chunk or self.eval_examples[:1] or [_one_token_example(self)],
                                  self.tokenizer.pad_token_id)
                part = float(self._loss_sum(self._to_device(batch), model))
                if dummy:
                    continue
                nll += part
                loss_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                n = int(batch["attention_mask"].sum())
                tokens += n
                width = int(batch["input_ids"].shape[1])
                flops += forward_flops_per_token(self.shape, width, self.lora_params) * n
        nll, loss_tokens, tokens, flops = self._all_reduce_sum([nll, loss_tokens, tokens, flops])
        if loss_tokens == 0:
            return None
        return StepStats(loss=nll / loss_tokens, tokens=int(tokens), flops=flops)

    def quantization_error(self, model_path: str, quantized: StepStats | None = None) -> dict[str, float] | None:
        """Eval loss of this session's 4-bit base against the same base unquantized, on the eval rows.

        Call before the first step: LoRA starts as a no-op (lora_B = 0), so the session's model is
        still the quantized base (`quantized`: its evaluation, when the caller already has it).
        `flops`/`tokens` are what this call spent. None for methods without 4-bit weights or eval rows."""
        if self.method != "qlora" or self.steps_done:
            return None

        spent = []
        if quantized is None:
            quantized = self.evaluate()
            spent.append(quantized)
        if quantized is None:
            return None
        full_model = load_causal_lm(model_path).to(self.device)
        full = self.evaluate(model=full_model)
        del full_model
        assert full is not None
        spent.append(full)
        return {"eval_loss_4bit": quantized.loss, "eval_loss_full": full.loss,
                "eval_loss_increase": quantized.loss - full.loss, "flops": sum(e.flops for e in spent),
                "tokens": sum(e.tokens for e in spent)}

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        """Collective: every rank calls it; rank 0 writes the shared state, each rank its RNG."""

        save_training_state(self, directory)

    def load_checkpoint(self, directory: str) -> None:

        load_training_state(self, directory)


def _assert_optimizer_owns_model_params(optimizer: Any, model: Any) -> None:
    """The optimizer must step the parameters the model computes with.

    `fully_shard` replaces every parameter with a new sharded DTensor parameter. An optimizer
    built before sharding keeps stepping the old, orphaned tensors: the model never changes,
    while FSDP's gradients pile up unused. That is what an early QLoRA-under-FSDP try hit
    (its per-step losses were just the losses of different batches on an unchanged model).
    """
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if stepped != trainable:
        raise RuntimeError(
            f"optimizer holds {len(stepped - trainable)} tensors the model does not use and misses "
            f"{len(trainable - stepped)} of its trainable parameters; build it after sharding"
        )


def _numel(p: Any) -> int:
    # A sharded DTensor parameter reports its global numel.
    return int(p.numel())


def _one_token_example(session: TrainingSession) -> dict[str, list[int]]:
    pad = session.tokenizer.pad_token_id
    return {"input_ids": [pad, pad], "labels": [-100, pad]}


def _trainable_and_base_state(model: Any) -> dict[str, Any]:
    """Rank 0's full state dict (shares storage with the model: no copy)."""
    return dict(model.state_dict())
