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
    return TrainingSession(cfg, model_path, rows, [], threads=2)


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantization_error_compares_the_4bit_base_with_the_unquantized_one(default_model_path, dtype):
    rows = [{"prompt": f"What is {a} + 3?", "response": f"{a} + 3 = {a + 3}"} for a in range(6)]
    from frugalray.train.loop import TrainingSession

    def session(method: str):
        cfg = FinetuneConfig(data_path="unused", method=method, lora_rank=4, lora_alpha=8, batch_size=2, seq_len=64,
                             max_steps=2, eval_rows=4, seed=0, compute_dtype=dtype)
        return TrainingSession(cfg, default_model_path, rows, rows[:4], threads=2)

    qlora = session("qlora")
    quant = qlora.quantization_error(default_model_path)
    # The unquantized side is the base a LoRA session starts from (lora_B = 0), at the same compute dtype.
    lora_start = session("lora").evaluate()
    assert quant["eval_loss_full"] == pytest.approx(lora_start.loss, rel=1e-4)
    assert quant["eval_loss_4bit"] == pytest.approx(qlora.evaluate().loss, rel=1e-6)
    assert quant["eval_loss_increase"] == pytest.approx(quant["eval_loss_4bit"] - quant["eval_loss_full"])
    assert quant["eval_loss_increase"] != 0.0 and quant["flops"] > 0
    qlora.step()
    assert qlora.quantization_error(default_model_path) is None  # the adapter is no longer a no-op
