"""The LoRA / QLoRA training loop shared by `finetune` (Ray Train workers) and `sweep` (Tune trials).

`LoraTrainingSession` owns one model, its optimizer and a deterministic data order, and
exposes `step()` and `evaluate()`. Each call returns what it spent: real (non-pad)
tokens and FLOPs from `frugalray.budget.flops`. Callers decide when to stop (a step
count, a FLOP reservation), so the loop itself holds no budget policy.

With `world_size > 1` inside an initialized `torch.distributed` process group (as Ray
Train sets up), each rank reads a disjoint slice of every global batch and LoRA gradients
are averaged with all-reduce before the optimizer step, so the ranks stay identical.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any

from frugalray.budget.flops import ModelShape, forward_flops_per_token, train_flops_per_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean loss over response tokens (averaged over ranks)
    tokens: int  # real (non-pad) tokens processed, summed over ranks
    flops: float  # FLOPs of those tokens, summed over ranks


def lora_param_count(shape: ModelShape, rank: int, target_modules: str | list[str]) -> int:
    return shape.lora_params(rank, target_modules)


def train_step_flops_upper_bound(
    shape: ModelShape, batch_size: int, seq_len: int, method: str, lora_params: int, world_size: int = 1
) -> float:
    """FLOPs of one step if every row filled seq_len: never below what a real step spends."""
    per_token = train_flops_per_token(shape, seq_len, method, lora_params)  # type: ignore[arg-type]
    return per_token * batch_size * seq_len * world_size


def eval_flops_upper_bound(shape: ModelShape, n_rows: int, seq_len: int, lora_params: int) -> float:
    return forward_flops_per_token(shape, seq_len, lora_params) * n_rows * seq_len


def has_fast_bf16() -> bool:
    """Native bf16 matmuls: a CUDA device, or a CPU with AVX512-BF16 / AMX.

    On an AVX2-only CPU, torch's bf16 matmul measured 1.4 GFLOP/s against 35 GFLOP/s fp32,
    which made a QLoRA step (bf16 compute) about 27x slower than with fp32 compute.
    """
    import torch

    if torch.cuda.is_available():
        return True
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_compute_dtype(name: str) -> str:
    if name == "auto":
        return "bfloat16" if has_fast_bf16() else "float32"
    return name


def default_threads(parallel_jobs: int) -> int:
    """Ray sets OMP_NUM_THREADS=1 in 1-CPU workers; on a small box that halves speed for nothing."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel_jobs))


class LoraTrainingSession:
    """One LoRA/QLoRA model + AdamW + a seeded data order.

    `cfg` is a mapping with the `FinetuneConfig` fields (a dict crosses process boundaries
    more easily than the pydantic model); rows are dicts with `prompt` and `response`.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        model_path: str,
        train_rows: list[dict[str, str]],
        eval_rows: list[dict[str, str]],
        rank: int = 0,
        world_size: int = 1,
        threads: int | None = None,
    ):
        import torch
        from peft import LoraConfig, get_peft_model

        from frugalray.data.formatting import IGNORE_INDEX, tokenize_example
        from frugalray.models import load_causal_lm, load_tokenizer, model_shape

        self.cfg = dict(cfg)
        self.rank, self.world_size = rank, world_size
        self.distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        torch.set_num_threads(threads or default_threads(world_size))
        torch.manual_seed(int(cfg["seed"]))

        self.method = cfg["method"]
        self.batch_size = int(cfg["batch_size"])
        self.seq_len = int(cfg["seq_len"])
        self.shape = model_shape(model_path)
        self.lora_params = lora_param_count(self.shape, int(cfg["lora_rank"]), cfg["target_modules"])

        self.tokenizer = load_tokenizer(model_path)
        quantized = self.method == "qlora"
        self.compute_dtype = resolve_compute_dtype(cfg.get("compute_dtype", "auto")) if quantized else "float32"
        model = load_causal_lm(model_path, quantize_4bit=quantized, compute_dtype=self.compute_dtype)
        if quantized:
            from peft import prepare_model_for_kbit_training

            # No gradient checkpointing: the FLOP accounting assumes one forward per step.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(
            r=int(cfg["lora_rank"]),
            lora_alpha=float(cfg["lora_alpha"]),
            lora_dropout=float(cfg["lora_dropout"]),
            target_modules=cfg["target_modules"],
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(model, lora)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in trainable)
        if self.trainable_params != self.lora_params:
            log.warning(
                "trainable parameters %d differ from the FLOP module's LoRA count %d",
                self.trainable_params, self.lora_params,
            )
        self.optimizer = torch.optim.AdamW(trainable, lr=float(cfg["learning_rate"]), weight_decay=0.0)
        self._trainable = trainable

        def encode(rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
            encoded = [tokenize_example(self.tokenizer, r["prompt"], r["response"], self.seq_len) for r in rows]
            # A row whose response was truncated away has no loss tokens: it would give NaN.
            return [e for e in encoded if any(t != IGNORE_INDEX for t in e["labels"])]

        self.train_examples = encode(train_rows)
        self.eval_examples = encode(eval_rows)[rank::world_size] if eval_rows else []
        if not self.train_examples:
            raise ValueError(
                f"seq_len: no training row keeps a response token within {self.seq_len} tokens; raise seq_len"
            )
        dropped = len(train_rows) - len(self.train_examples)
        if dropped:
            log.warning("dropped %d training rows whose response lies beyond seq_len=%d", dropped, self.seq_len)
        self._rng = random.Random(int(cfg["seed"]))
        self._order: list[int] = []
        self.steps_done = 0

    # -- data -------------------------------------------------------------------------
    def _next_global_batch(self) -> list[int]:
        """Indices of the next global batch (batch_size x world_size), reshuffled each epoch."""
        want = self.batch_size * self.world_size
        batch: list[int] = []
        while len(batch) < want:
            if not self._order:
                self._order = list(range(len(self.train_examples)))
                self._rng.shuffle(self._order)
            batch.append(self._order.pop())
        return batch

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # -- training -------------------------------------------------------------------------
    def step(self) -> StepStats:
        import torch

        from frugalray.data.formatting import pad_batch

        global_batch = self._next_global_batch()
        mine = global_batch[self.rank :: self.world_size]
        batch = pad_batch([self.train_examples[i] for i in mine], self.tokenizer.pad_token_id)
        self.model.train()
        out = self.model(**batch)
        loss = out.loss
        loss.backward()
        if self.distributed:
            for p in self._trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world_size
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1

        tokens = int(batch["attention_mask"].sum())
        width = int(batch["input_ids"].shape[1])
        flops = train_flops_per_token(self.shape, width, self.method, self.lora_params) * tokens
        loss_sum, tokens_all, flops_all = self._all_reduce_sum([float(loss.detach()), tokens, flops])
        return StepStats(loss=loss_sum / self.world_size, tokens=int(tokens_all), flops=flops_all)

    def evaluate(self) -> StepStats | None:
        """Token-weighted mean loss over this rank's eval rows (reduced over ranks); None without rows."""
        if not self.cfg.get("eval_rows") or (not self.eval_examples and not self.distributed):
            return None
        import torch
        import torch.nn.functional as F

        from frugalray.data.formatting import IGNORE_INDEX, pad_batch

        self.model.eval()
        nll, loss_tokens, tokens, flops = 0.0, 0, 0, 0.0
        with torch.no_grad():
            for start in range(0, len(self.eval_examples), self.batch_size):
                chunk = self.eval_examples[start : start + self.batch_size]
                batch = pad_batch(chunk, self.tokenizer.pad_token_id)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
                targets = batch["labels"][:, 1:].reshape(-1)
                nll += float(F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
                loss_tokens += int((targets != IGNORE_INDEX).sum())
                n = int(batch["attention_mask"].sum())
                tokens += n
                width = int(batch["input_ids"].shape[1])
                flops += forward_flops_per_token(self.shape, width, self.lora_params) * n
        nll, loss_tokens, tokens, flops = self._all_reduce_sum([nll, loss_tokens, tokens, flops])
        if loss_tokens == 0:
            return None
        return StepStats(loss=nll / loss_tokens, tokens=int(tokens), flops=flops)

    def save_adapter(self, directory: str) -> None:
        # Adapter weights + adapter_config.json only; the base model's tokenizer is the one to use.
        self.model.save_pretrained(directory, safe_serialization=True)
