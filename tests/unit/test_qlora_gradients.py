"""QLoRA keeps its gradients after an evaluation, on every CPU profile (no Ray: the session alone).

bitsandbytes repacks a 4-bit layer for CPU inference the first time it runs in eval mode on a
CPU with AVX512-BF16; the repacked matmul has no backward, so a session that evaluated before
training trained on cut gradients (held-out accuracy 47.5% -> 5.0% in the main job). The tests:
(a) on an AVX512-BF16 CPU, gradients after `evaluate()` equal those of a session that never
evaluated; (b) on any CPU, with bitsandbytes told it runs on such a CPU, no 4-bit layer is packed
or may repack while a training step runs; (c) the QLoRA loss and LoRA gradients equal those of
the same model with each 4-bit layer replaced by a plain Linear holding its dequantized weights.
"""

from __future__ import annotations

import pytest
import torch

DTYPES = ["float32", "bfloat16"]


def _cpu_has_avx512_bf16() -> bool:
    """bitsandbytes' own test, the one that arms the repack in every Linear4bit it builds."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _rows() -> list[dict[str, str]]:
    return [{"prompt": f"What is {a} + {b}? Reply with only the number.", "response": str(a + b)}
            for a in range(1, 5) for b in range(1, 4)]


def _session(model_path: str, compute_dtype: str):
    from frugalray.train.finetune import FinetuneConfig
    from frugalray.train.loop import TrainingSession

    cfg = FinetuneConfig(data_path="unused", method="qlora", lora_rank=4, lora_alpha=8, batch_size=2, seq_len=64,
                         max_steps=4, eval_rows=2, compute_dtype=compute_dtype, seed=0, learning_rate=1e-3)
    rows = _rows()
    return TrainingSession(cfg, model_path, rows, rows[:2], threads=2)


def _lora_grads(session) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().float().clone() for n, p in session.model.named_parameters()
             if p.requires_grad and p.grad is not None}
    session.optimizer.zero_grad(set_to_none=True)
    return grads


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_same_gradients(got: dict, want: dict, tolerance: float) -> None:
    lora = [n for n in want if "lora_" in n]
    assert len(lora) == 30 * 7 * 2, "every adapted linear of every layer has lora_A and lora_B"
    assert set(got) == set(want), f"parameters without a gradient: {sorted(set(want) - set(got))[:3]}"
    # lora_B starts at zero, so lora_A's first gradient is zero by construction; lora_B's is not.
    zero = [n for n in lora if "lora_B" in n and float(got[n].abs().max()) == 0.0]
    assert not zero, f"{len(zero)} lora_B parameters got a zero gradient, e.g. {zero[0]}"
    worst = max(lora, key=lambda n: _relative_error(got[n], want[n]))
    assert _relative_error(got[worst], want[worst]) < tolerance, (
        f"{worst}: gradient differs from the reference by {_relative_error(got[worst], want[worst]):.3g} (relative)"
    )


@pytest.mark.parametrize("compute_dtype", DTYPES)
def test_gradients_after_evaluate_equal_a_session_that_never_evaluated(default_model_path, compute_dtype):
    """(a) Needs the CPU bitsandbytes repacks on: AVX512-BF16 (elsewhere (b) covers the mechanism)."""
    if not _cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here and has no packed kernel "
                    "(test_no_4bit_layer_is_packed_when_a_step_runs covers the fix's mechanism)")
    evaluated = _session(default_model_path, compute_dtype)
    assert evaluated.evaluate() is not None
    evaluated.compute_gradients()
    fresh = _session(default_model_path, compute_dtype)
    fresh.compute_gradients()
    _assert_same_gradients(_lora_grads(evaluated), _lora_grads(fresh), tolerance=1e-5)


@pytest.mark.parametrize("compute_dtype", DTYPES)
def test_no_4bit_layer_is_packed_when_a_step_runs(default_model_path, compute_dtype, monkeypatch):
    """(b) On every CPU: bitsandbytes is made to believe it runs on AVX512-BF16 (the flag it sets per
    layer at construction), so the repack would happen here too unless the session prevents it."""
    import bitsandbytes.nn.modules as bnb_modules

    from frugalray.train.four_bit import REPACK_FLAG, four_bit_layers, is_packed

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    session = _session(default_model_path, compute_dtype)
    layers = four_bit_layers(session.model)
    assert len(layers) == 30 * 7
    assert session.evaluate() is not None
    seen: list[tuple[str, bool, bool, bool]] = []
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, name=name: seen.append((name, m.training, is_packed(m), getattr(m, REPACK_FLAG))))
        for name, layer in layers]
    try:
        session.step()
        assert session.evaluate() is not None
        session.step()
    finally:
        for h in hooks:
            h.remove()
    training = [s for s in seen if s[1]]
    assert len(training) == 2 * 30 * 7, "every 4-bit layer ran in train mode in each of the two steps"
    bad = [s for s in training if s[2] or s[3]]
    assert not bad, f"{len(bad)} 4-bit layer calls in a training step were packed or may repack, e.g. {bad[0]}"
    assert not any(s[2] for s in seen), "evaluation repacked a 4-bit layer of a training session"


class DequantizedLinear(torch.nn.Linear):
    """A plain Linear holding a 4-bit layer's dequantized weights, computing as Linear4bit does:
    input cast to the compute dtype, output cast back to the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None)
        self.compute_dtype = compute_dtype
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(self.compute_dtype)
        b = None if self.bias is None else self.bias.to(self.compute_dtype)
        return torch.nn.functional.linear(x.to(self.compute_dtype), w, b).to(x.dtype)


def _replace_4bit_with_dequantized(session, compute_dtype: torch.dtype) -> int:
    import bitsandbytes.functional as bnbf

    from frugalray.train.four_bit import four_bit_layers

    replaced = 0
    for name, layer in four_bit_layers(session.model):
        parent_name, _, attr = name.rpartition(".")
        parent = session.model.get_submodule(parent_name)
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        setattr(parent, attr, DequantizedLinear(weight, layer.bias, compute_dtype))
        replaced += 1
    return replaced


@pytest.mark.parametrize("compute_dtype", DTYPES)
def test_qlora_matches_a_dequantized_reference(default_model_path, compute_dtype):
    """(c) After an evaluation, the 4-bit model's loss and LoRA gradients are those of the same
    weights dequantized into plain Linears (fp32 and bf16 compute; bf16 is slow on AVX2: 1 batch)."""
    dtype = getattr(torch, compute_dtype)
    qlora = _session(default_model_path, compute_dtype)
    reference = _session(default_model_path, compute_dtype)
    assert _replace_4bit_with_dequantized(reference, dtype) == 30 * 7
    assert qlora.evaluate() is not None
    got, want = qlora.compute_gradients(), reference.compute_gradients()
    loss_tolerance, grad_tolerance = (1e-5, 1e-4) if compute_dtype == "float32" else (1e-2, 5e-2)
    assert got.loss == pytest.approx(want.loss, rel=loss_tolerance)
    _assert_same_gradients(_lora_grads(qlora), _lora_grads(reference), tolerance=grad_tolerance)
