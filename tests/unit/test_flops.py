"""The analytic FLOP formulas against torch's own FlopCounterMode on the real default model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from frugalray.budget.flops import ModelShape, forward_flops_per_token, train_flops_per_token

SMOLLM2 = ModelShape(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, vocab_size=49152)


def test_hand_computed_shape():
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536
    assert SMOLLM2.matmul_params == 30 * per_layer + 576 * 49152
    # rank 8 on q_proj only: 8 * (576 + 576) per layer
    assert SMOLLM2.lora_params(8, ["q_proj"]) == 30 * 8 * 1152
    with pytest.raises(ValueError, match="target_modules"):
        SMOLLM2.lora_params(8, ["nope"])


def test_training_multiples():
    fwd = forward_flops_per_token(SMOLLM2, 128)
    assert train_flops_per_token(SMOLLM2, 128, "full") == pytest.approx(3 * fwd)
    assert train_flops_per_token(SMOLLM2, 128, "lora") == pytest.approx(2 * fwd)
    gc = train_flops_per_token(SMOLLM2, 128, "full", gradient_checkpointing=True)
    assert gc == pytest.approx(4 * fwd)
    with pytest.raises(ValueError, match="method"):
        train_flops_per_token(SMOLLM2, 128, "bogus")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def real_model(default_model_path):
    from frugalray.models import load_causal_lm, model_shape

    model = load_causal_lm(default_model_path)
    return model, model_shape(default_model_path)


def _counted(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def test_forward_flops_match_flop_counter(real_model):
    model, shape = real_model
    assert shape == SMOLLM2
    batch, seq = 2, 64
    ids = torch.randint(0, shape.vocab_size, (batch, seq))
    with torch.no_grad():
        measured = _counted(lambda: model(input_ids=ids))
    predicted = forward_flops_per_token(shape, seq) * batch * seq
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_lora_training_flops_match_flop_counter(real_model):
    from peft import LoraConfig, get_peft_model

    model, shape = real_model
    rank = 8
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules="all-linear", lora_alpha=16))
    try:
        batch, seq = 2, 48
        ids = torch.randint(0, shape.vocab_size, (batch, seq))

        def step():
            out = peft_model(input_ids=ids, labels=ids)
            out.loss.backward()

        measured = _counted(step)
        lora = shape.lora_params(rank)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert lora == trainable
        predicted = train_flops_per_token(shape, seq, "lora", lora_params=lora) * batch * seq
        assert abs(predicted - measured) / measured < 0.10, (predicted, measured)
    finally:
        peft_model.unload()
