"""Learning-dynamics scores: how each example behaves during a short proxy fine-tune.

A proxy LoRA fine-tune (`proxy_finetune`: the project's `TrainingSession` on `dynamics.proxy`,
a few steps, tiny rank, run as one Ray task on the device `dynamics.proxy.device` resolves to, a
whole GPU on GPU: `score.proxy_placement`) saves its adapter at several early steps. Every example is
then scored under each checkpoint (on the scoring actor pool, `scoring_actor.RowScorer`), from the
response tokens only:

- `el2n`: EL2N error norm (Paul et al. 2021), ||softmax(logits) - onehot(target)||_2 per token,
  averaged over the row's response tokens, then over checkpoints. High: the model is far from
  the label (hard, or mislabelled);
- `dyn_loss_mean`: mean NLL over checkpoints;
- `dyn_loss_var`: variance of the row's mean NLL across checkpoints (population variance):
  examples the model is still learning move most;
- `forgetting_events`: response tokens predicted correctly (argmax) at one checkpoint and
  incorrectly at the next, summed over consecutive checkpoint pairs (Toneva et al. 2019, at
  token level);
- `dyn_acc_mean`: token argmax accuracy, averaged over checkpoints.

The per-token numbers come from `token_error_stats`, which applies the LM head to a chunk of
labelled positions at a time, so no full-batch float logits are ever materialized.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from frugalray.config import StrictModel
from frugalray.devices import require_cuda
from frugalray.train.loop import TrainingSession
from frugalray.train.spec import ComputeDtype, TrainingSpec, refuse_flat_training_keys

log = logging.getLogger(__name__)

DYNAMICS_COLUMNS = ("el2n", "dyn_loss_mean", "dyn_loss_var", "forgetting_events", "dyn_acc_mean")


class DynamicsProxySpec(TrainingSpec):
    """The proxy fine-tune: a `TrainingSpec` with the proxy's defaults (a tiny fp32 LoRA on q/v).

    Its length is `max(checkpoints)` steps and its sequence length the score's `max_length`:
    both are set when it runs, so they are not written here (nor dumped)."""

    method: Literal["lora", "qlora"] = "lora"
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: ["q_proj", "v_proj"])
    # A proxy run is short, so it takes large steps: the point is to see which rows move.
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1, description="proxy fine-tune rows per step")
    compute_dtype: ComputeDtype = "float32"
    max_steps: int = Field(20, ge=1, exclude=True, description="not set here: max(dynamics.checkpoints)")
    seq_len: int = Field(128, ge=8, le=8192, exclude=True, description="not set here: the score's max_length")


# Set from elsewhere when the proxy runs (see DynamicsProxySpec), never in dynamics.proxy.
_PROXY_FIELDS_SET_ELSEWHERE = {"max_steps": "dynamics.checkpoints (the proxy trains max(checkpoints) steps)",
                               "seq_len": "the score's max_length"}


class DynamicsSettings(StrictModel):
    checkpoints: list[int] = Field(
        default_factory=lambda: [1, 2, 4], min_length=2,
        description="proxy fine-tune steps after which every row is scored (0: the reference model itself)",
    )
    proxy: DynamicsProxySpec = Field(default_factory=DynamicsProxySpec)
    train_rows: int | None = Field(default=None, ge=1, description="rows the proxy trains on (seeded sample); None: all")
    chunk_tokens: int = Field(default=512, ge=1, description="labelled positions per LM-head chunk")

    @model_validator(mode="before")
    @classmethod
    def _training_keys_moved(cls, data: Any) -> Any:
        data = refuse_flat_training_keys(data, "dynamics")
        proxy = data.get("proxy") if isinstance(data, dict) else None
        set_elsewhere = [f"dynamics.proxy.{k}: set by {where}; drop it" for k, where in _PROXY_FIELDS_SET_ELSEWHERE.items()
                         if isinstance(proxy, dict) and k in proxy]
        if set_elsewhere:
            raise ValueError("; ".join(set_elsewhere))
        return data

    @field_validator("checkpoints")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        if any(s < 0 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"{steps}: list distinct, increasing step numbers >= 0, e.g. [1, 2, 4]")
        return steps


def token_error_stats(hidden, head, targets, chunk_tokens: int = 512):
    """Per labelled position: (NLL, EL2N error norm, argmax correct), computed a chunk at a time.

    `hidden` [N, H] are the hidden states of the positions that predict `targets` [N]; `head`
    maps them to logits. ||p - e_y||^2 = sum(p^2) - 2 p_y + 1, so a chunk needs its own logits only.
    """
    import torch

    nll, el2n, correct = [], [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = head(hidden[start:start + chunk_tokens]).float()
        y = targets[start:start + chunk_tokens]
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        p_y = p.gather(1, y[:, None])[:, 0]
        nll.append(-logp.gather(1, y[:, None])[:, 0])
        el2n.append(((p * p).sum(-1) - 2 * p_y + 1).clamp_min(0).sqrt())
        correct.append(logits.argmax(-1) == y)
        del logits, logp, p
    if not nll:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, torch.zeros(0, dtype=torch.bool)
    return torch.cat(nll), torch.cat(el2n), torch.cat(correct)


def summarize_dynamics(nll: list[list[float]], el2n: list[list[float]], correct: list[list[bool]]) -> dict[str, Any]:
    """One row's columns from its per-checkpoint, per-token numbers (outer list: checkpoints)."""
    n_ckpt = len(nll)
    if n_ckpt == 0 or not nll[0]:
        return {"el2n": math.nan, "dyn_loss_mean": math.nan, "dyn_loss_var": math.nan,
                "forgetting_events": 0, "dyn_acc_mean": math.nan}
    losses = [sum(x) / len(x) for x in nll]
    mean_loss = sum(losses) / n_ckpt
    forgetting = sum(
        sum(1 for before, after in zip(correct[c], correct[c + 1]) if before and not after) for c in range(n_ckpt - 1)
    )
    return {
        "el2n": sum(sum(x) / len(x) for x in el2n) / n_ckpt,
        "dyn_loss_mean": mean_loss,
        "dyn_loss_var": sum((x - mean_loss) ** 2 for x in losses) / n_ckpt,
        "forgetting_events": forgetting,
        "dyn_acc_mean": sum(sum(c) / len(c) for c in correct) / n_ckpt,
    }


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:05d}"


def proxy_finetune(
    model_path: str, rows: list[dict[str, str]], settings: dict, seq_len: int, out_dir: str, threads: int | None = None,
    device: str = "cpu", placed_for: dict | None = None,
) -> dict[str, Any]:
    """Train the proxy LoRA for max(checkpoints) steps, saving the adapter after each checkpoint step.

    `settings` is a `DynamicsSettings` dump (it crosses to this Ray task as a dict). `device`: "cpu",
    or "cuda" for a task placed on a GPU (`placed_for`: what it was placed with). Returns
    {"checkpoints": [dirs], "flops", "tokens", "losses", "wall_s"}. Each adapter is written to a
    temporary directory and renamed, so a directory that exists is complete.
    """

    started = time.time()
    cfg = DynamicsSettings.model_validate(settings)  # re-validated at the task's door
    spec = cfg.proxy.with_values(max_steps=max(cfg.checkpoints), seq_len=seq_len)
    if device == "cuda":
        require_cuda("dynamics proxy", placed_for=placed_for)
    session = TrainingSession(spec, model_path, rows, [], threads=threads, device=device if device != "cpu" else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> str:
        final = checkpoint_dir(out, step)
        tmp = out / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        # PEFT's own save: the proxy is one process (no torch.distributed group for the
        # session's collective checkpoint path), and the scorers load a plain adapter dir.
        session.model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return str(final)

    saved, losses, flops, tokens = [], [], 0.0, 0
    if 0 in cfg.checkpoints:
        saved.append(save(0))  # lora_B starts at zero: this adapter is the reference model
    for step in range(1, max(cfg.checkpoints) + 1):
        stats = session.step()
        losses.append(stats.loss)
        flops += stats.flops
        tokens += stats.tokens
        if step in cfg.checkpoints:
            saved.append(save(step))
    log.info("proxy fine-tune: %d steps, loss %s, checkpoints %s", len(losses),
             [round(x, 3) for x in losses], [Path(s).name for s in saved])
    return {"checkpoints": saved, "flops": flops, "tokens": tokens, "losses": losses,
            "wall_s": time.time() - started, "trainable_params": session.trainable_params}
