"""Analytic FLOP accounting: the one place the project turns tokens into FLOPs.

Conventions (one multiply-add = 2 FLOPs, as `torch.utils.flop_counter` counts):
- forward: 2 FLOPs per weight of every matmul (all linear layers including the LM head;
  the embedding lookup is free) plus attention's score and value matmuls, 4 * ctx * d_attn
  per layer per token. The attention term counts the full ctx x ctx square, as dense SDPA
  kernels execute it (causal masking does not skip the work on CPU).
- full fine-tuning: forward + backward = 3x forward (the classic 6N).
- LoRA / QLoRA: frozen base weights get no weight gradients, so backward only propagates
  activation gradients: about 2x forward for the base (4N total), plus 6 FLOPs per LoRA
  weight (forward, its weight gradient and its input gradient).
- gradient checkpointing re-runs the forward once more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

TrainMethod = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    gated_mlp: bool = True

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """From a Llama-style decoder's HF config: its config.json dict, or a transformers
        `PretrainedConfig`, read as that same dict (`to_dict()`)."""
        fields: dict[str, Any] = config if isinstance(config, dict) else config.to_dict()
        d_model = fields["hidden_size"]
        n_heads = fields["num_attention_heads"]
        return cls(
            n_layers=fields["num_hidden_layers"],
            d_model=d_model,
            n_heads=n_heads,
            # Optional in config.json: absent (or null) means one KV head per head, head_dim = d / heads.
            n_kv_heads=fields.get("num_key_value_heads") or n_heads,
            head_dim=fields.get("head_dim") or d_model // n_heads,
            d_ff=fields["intermediate_size"],
            vocab_size=fields["vocab_size"],
        )

    @property
    def attn_linear_params(self) -> int:
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        # q, k, v projections in, o projection out
        return self.d_model * (q_out + 2 * kv_out) + q_out * self.d_model

    @property
    def mlp_params(self) -> int:
        return (3 if self.gated_mlp else 2) * self.d_model * self.d_ff

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every layer's linears plus the LM head."""
        return self.n_layers * (self.attn_linear_params + self.mlp_params) + self.d_model * self.vocab_size

    def lora_params(self, rank: int, target_modules: str | list[str] = "all-linear") -> int:
        """Trainable LoRA weights: rank * (in + out) per adapted linear (the LM head is never adapted)."""
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.d_model, q_out),
            "k_proj": (self.d_model, kv_out),
            "v_proj": (self.d_model, kv_out),
            "o_proj": (q_out, self.d_model),
            "gate_proj": (self.d_model, self.d_ff),
            "up_proj": (self.d_model, self.d_ff),
            "down_proj": (self.d_ff, self.d_model),
        }
        names = list(shapes) if target_modules == "all-linear" else list(target_modules)
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ValueError(f"target_modules: unknown module(s) {unknown}; use 'all-linear' or {list(shapes)}")
        return self.n_layers * sum(rank * (shapes[n][0] + shapes[n][1]) for n in names)


def attention_flops_per_token(shape: ModelShape, context: int) -> float:
    """QK^T and attention-times-V: 2 matmuls x 2 FLOPs x ctx x (heads x head_dim), per layer."""
    return 4.0 * shape.n_layers * context * shape.n_heads * shape.head_dim


def forward_flops_per_token(shape: ModelShape, context: int, lora_params: int = 0) -> float:
    return 2.0 * shape.matmul_params + attention_flops_per_token(shape, context) + 2.0 * lora_params


def train_flops_per_token(
    shape: ModelShape,
    context: int,
    method: TrainMethod = "qlora",
    lora_params: int = 0,
    gradient_checkpointing: bool = False,
) -> float:
    base_fwd = 2.0 * shape.matmul_params + attention_flops_per_token(shape, context)
    if method == "full":
        total = 3.0 * base_fwd
        recompute = base_fwd
    elif method in ("lora", "qlora"):
        total = 2.0 * base_fwd + 6.0 * lora_params
        recompute = base_fwd + 2.0 * lora_params
    else:
        raise ValueError(f"method: unknown training method {method!r}; use 'full', 'lora' or 'qlora'")
    return total + (recompute if gradient_checkpointing else 0.0)


def train_step_flops(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    method: TrainMethod = "qlora",
    lora_params: int = 0,
    gradient_checkpointing: bool = False,
) -> float:
    """FLOPs of one optimizer step over a padded batch of `batch_size` x `seq_len` tokens."""
    per_token = train_flops_per_token(shape, seq_len, method, lora_params, gradient_checkpointing)
    return per_token * batch_size * seq_len
