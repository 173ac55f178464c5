"""A trial's reservation bound must cover every FLOP its step spends, whatever the step's shape."""

from frugalray.budget.flops import ModelShape
from frugalray.train.finetune import FinetuneConfig
from frugalray.train.loop import train_step_flops_upper_bound
from frugalray.tune.sweep import trial_cost_bounds

SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=1000)
BASE = {"model": "m", "data_path": "d.jsonl", "method": "lora", "batch_size": 2, "seq_len": 32}


def _step_bound(**overrides) -> float:
    return trial_cost_bounds(FinetuneConfig.model_validate({**BASE, **overrides}), SHAPE, eval_rows=4)[0]


def test_gradient_accumulation_multiplies_the_step_bound():
    assert _step_bound(grad_accum_steps=3) == 3 * _step_bound()


def test_gradient_checkpointing_raises_the_step_bound_by_the_recomputed_forward():
    lora = SHAPE.lora_params(8)
    plain = train_step_flops_upper_bound(SHAPE, 2, 32, "lora", lora)
    recomputed = train_step_flops_upper_bound(SHAPE, 2, 32, "lora", lora, gradient_checkpointing=True)
    assert recomputed > plain
    assert _step_bound(gradient_checkpointing=True, lora_rank=8) == recomputed


def test_evaluation_bound_does_not_depend_on_the_training_step_shape():
    cfg = FinetuneConfig.model_validate({**BASE, "grad_accum_steps": 4, "gradient_checkpointing": True})
    assert trial_cost_bounds(cfg, SHAPE, 4)[1] == trial_cost_bounds(FinetuneConfig.model_validate(BASE), SHAPE, 4)[1]
