"""The training recipe a session runs: an explicit compute dtype is what runs on any CPU, and the
gradient is clipped to max_grad_norm before each update (its pre-clip norm kept in the history)."""

from __future__ import annotations

import math

import pytest
import torch

from frugalray.train.finetune import FinetuneConfig


def _session(model_path: str, **overrides):
    from frugalray.train.loop import TrainingSession

    cfg = FinetuneConfig(data_path="unused", method="lora", lora_rank=4, lora_alpha=8, batch_size=2, seq_len=64,
                         max_steps=3, eval_rows=0, seed=0, learning_rate=1e-3, **overrides)
    rows = [{"prompt": f"What is {a} + 2?", "response": f"{a} + 2 = {a + 2}"} for a in range(8)]
    return TrainingSession(cfg.model_dump(mode="json"), model_path, rows, [], threads=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_explicit_compute_dtype_is_honoured_on_any_cpu(default_model_path, dtype):
    # Before: lora/full with bfloat16 silently ran float32 on CPUs without native bf16.
    session = _session(default_model_path, compute_dtype=dtype)
    assert session.compute_dtype == dtype
    with session._autocast(plain_weights=True):
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == getattr(torch, dtype)


def test_gradients_are_clipped_to_max_grad_norm(default_model_path):
    reference = _session(default_model_path, max_grad_norm=0.01)
    reference.compute_gradients()
    raw = math.sqrt(sum(float(p.grad.float().norm()) ** 2 for p in reference._trainable if p.grad is not None))
    assert raw > 0.01, "the test needs a gradient larger than the clip threshold"

    clipped = _session(default_model_path, max_grad_norm=0.01)
    seen = []
    original = clipped.optimizer.step

    def spy(*args, **kwargs):  # the gradient the optimizer is handed
        seen.append(math.sqrt(sum(float(p.grad.float().norm()) ** 2 for p in clipped._trainable if p.grad is not None)))
        return original(*args, **kwargs)

    clipped.optimizer.step = spy
    clipped.step()
    assert clipped.history[-1]["grad_norm"] == pytest.approx(raw, rel=1e-4)
    assert seen[0] == pytest.approx(0.01, rel=1e-3)

    unclipped = _session(default_model_path, max_grad_norm=None)
    unclipped.step()
    assert "grad_norm" not in unclipped.history[-1]
