"""The memory planner's arithmetic against cases worked out by hand (no torch, no Ray).

The tiny model: 2 layers, d_model 64, 4 heads of 16 (2 KV heads), d_ff 128, vocab 1000, tied
embeddings. Per layer q/o hold 64x64 = 4096 weights, k/v 64x32 = 2048, gate/up/down
64x128 = 8192: 36,864 linear weights; embedding 64,000; norms (2*2+1)*64 = 320; total 138,048.
"""

from __future__ import annotations

import pytest

from frugalray.budget.flops import ModelShape
from frugalray.config import ConfigError
from frugalray.train.memory_estimate import (
    CPU,
    CUDA,
    GiB,
    MiB,
    ModelArch,
    TrainSetup,
    _optimizer_state_bytes,
    arch_from_config,
    estimate_memory,
    nf4_bytes,
)
from frugalray.train.memory_plan import check_fits, parse_bytes, plan_memory, setup_from_config
from frugalray.train.spec import TrainingSpec

TINY = ModelArch(
    shape=ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=1000),
    tied_embeddings=True,
)
ALL_PARAMS = 138_048


def test_parameter_count_of_the_tiny_model():
    assert TINY.total_params == ALL_PARAMS
    untied = ModelArch(shape=TINY.shape, tied_embeddings=False)
    assert untied.total_params == ALL_PARAMS + 64_000


def test_arch_from_hf_config_reads_tied_embeddings():
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True}
    assert arch_from_config(cfg) == ModelArch(shape=TINY.shape, tied_embeddings=True, name="model")


def test_nf4_double_quant_bytes():
    # 4096 weights: 2048 bytes of codes, 64 one-byte absmax codes, one fp32 scale (per 256 absmaxes) + fp32 offset
    assert nf4_bytes(4096) == 2048 + 64 + 4 + 4
    # large tensors: 4 bits + 8/64 bits + 32/(64*256) bits ~ 4.127 bits per weight
    n = 64 * 256 * 1000
    assert nf4_bytes(n) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-4)


def test_full_finetune_fp32_adamw_is_16_bytes_per_weight_plus_activations():
    est = estimate_memory(TINY, TrainSetup(method="full", seq_len=8, micro_batch=2, optimizer="adamw", device="cpu"))
    assert est.weights == ALL_PARAMS * 4
    assert est.gradients == ALL_PARAMS * 4
    assert est.optimizer == ALL_PARAMS * 8  # two fp32 moments
    assert est.lora == 0
    assert est.trainable_params == ALL_PARAMS


def test_qlora_weights_keep_embedding_and_norms_unquantized():
    est = estimate_memory(TINY, TrainSetup(method="qlora", seq_len=8, device="cpu", weight_dtype="float32"))
    per_layer = 2 * nf4_bytes(4096) + 2 * nf4_bytes(2048) + 3 * nf4_bytes(8192)
    assert per_layer == 2 * 2120 + 2 * 1064 + 3 * 4232
    assert est.weights == 2 * per_layer + (64_000 + 320) * 4
    bf16 = estimate_memory(TINY, TrainSetup(method="qlora", seq_len=8, device="cpu", weight_dtype="bfloat16"))
    assert bf16.weights == 2 * per_layer + (64_000 + 320) * 2


def test_lora_params_gradients_and_optimizer_states():
    est = estimate_memory(TINY, TrainSetup(method="lora", lora_rank=4, seq_len=8, optimizer="adamw"))
    # rank 4 x (in + out): q 4*128, k 4*96, v 4*96, o 4*128, gate/up/down 4*192 each = 4096 per layer
    assert est.trainable_params == 2 * 4096 == TINY.shape.lora_params(4)
    assert est.lora == est.gradients == 8192 * 4
    assert est.optimizer == 8192 * 8
    # every LoRA matrix here is < 4096 elements: bitsandbytes keeps those in 32-bit states
    est8 = estimate_memory(TINY, TrainSetup(method="lora", lora_rank=4, seq_len=8, optimizer="adamw_8bit"))
    assert est8.optimizer == 8192 * 8
    sgd = estimate_memory(TINY, TrainSetup(method="lora", lora_rank=4, seq_len=8, optimizer="sgd"))
    assert sgd.optimizer == 0


def test_8bit_adam_states_are_two_bytes_plus_block_absmax():
    assert _optimizer_state_bytes("adamw_8bit", [8192], 4) == 2 * 8192 + 2 * (8192 // 256) * 4
    assert _optimizer_state_bytes("adamw", [8192], 2) == 2 * 8192 * 2  # states in the parameter dtype
    assert _optimizer_state_bytes("paged_adamw", [100], 4) == 800


def test_activations_and_logits_by_hand():
    setup = TrainSetup(method="lora", lora_rank=4, seq_len=8, micro_batch=2, device="cpu")
    est = estimate_memory(TINY, setup)
    tokens = 16
    attn = 2 * 64 + 1 + 2 * 64 + 2 * 32 + 4  # residual, normed, 1/rms, q + sdpa out (= o_proj input), k, v, lse
    mlp = 2 * 64 + 1 + 4 * 128  # residual, normed, 1/rms, gate, silu(gate), up, product
    lora = 4 * 7  # each B's rank-wide input, 7 adapted linears per layer
    per_token_layer = (attn + mlp + lora) * 4
    raw = tokens * 2 * per_token_layer  # (+3 d_model per token for full fine-tuning only)
    assert est.activations == int(raw * CPU.activation_overhead)
    # logits fp32 + log-softmax output + its gradient + the logits' gradient
    assert est.logits == int(tokens * 1000 * 16 * CPU.activation_overhead)
    # The peak is during forward/backward (CPU's non-foreach AdamW step needs far less scratch):
    # fp32 weights, the 8192 LoRA weights in fp32, their fp32 gradients and two fp32 AdamW moments,
    # the activations and logits above, and the device's fixed runtime.
    persistent = ALL_PARAMS * 4 + 8192 * 4 + 8192 * 4 + 8192 * 8
    assert est.peak_bytes == int(persistent + (raw + tokens * 1000 * 16) * CPU.activation_overhead
                                 + CPU.runtime_bytes)


def test_gradient_checkpointing_keeps_layer_inputs_plus_one_layer():
    plain = estimate_memory(TINY, TrainSetup(method="lora", lora_rank=4, seq_len=8, micro_batch=2))
    ckpt = estimate_memory(TINY, TrainSetup(method="lora", lora_rank=4, seq_len=8, micro_batch=2,
                                            gradient_checkpointing=True))
    per_token_layer = (325 + 641 + 28) * 4
    raw = 16 * (2 * 64 * 4 + per_token_layer)
    assert ckpt.activations == int(raw * CPU.activation_overhead)
    assert ckpt.activations < plain.activations
    assert ckpt.logits == plain.logits  # checkpointing does not touch the logits


def test_bf16_compute_halves_activations_and_adds_an_fp32_logits_copy():
    est = estimate_memory(TINY, TrainSetup(method="qlora", seq_len=8, micro_batch=2, device="cuda"))
    assert est.setup.compute_dtype == "bfloat16" and est.setup.weight_dtype == "bfloat16"
    # at backward's start: bf16 logits, fp32 log-softmax output, its gradient and the fp32 logits gradient
    assert est.logits == int(16 * 1000 * (2 + 12) * CUDA.activation_overhead)
    assert est.runtime == 0


def test_fsdp_shards_state_but_not_activations():
    one = estimate_memory(TINY, TrainSetup(method="full", seq_len=8, micro_batch=2))
    two = estimate_memory(TINY, TrainSetup(method="full", seq_len=8, micro_batch=2, world_size=2))
    assert two.weights == one.weights // 2
    assert two.optimizer == one.optimizer // 2
    assert two.gradients == one.gradients // 2
    assert two.activations == one.activations
    assert two.temporaries > 0  # all-gather buffers of one layer (and its prefetched neighbour)


def test_plan_picks_the_fastest_that_fits_and_explains():
    roomy = plan_memory(TINY, 1 * GiB, seq_len=8, global_batch=4, max_world_size=1)
    best = roomy.best
    assert best is not None and best.fits
    # everything fits: LoRA (4N FLOPs, no dequantization) at the largest micro-batch is fastest
    assert best.setup.method == "lora" and not best.setup.gradient_checkpointing
    assert best.setup.micro_batch == 4 and best.setup.grad_accum == 1
    assert "chosen:" in roomy.table()
    # a budget between QLoRA's and LoRA's smallest peak forces QLoRA
    lora_min = min(c.estimate.peak_bytes for c in roomy.candidates if c.setup.method == "lora")
    qlora_min = min(c.estimate.peak_bytes for c in roomy.candidates if c.setup.method == "qlora")
    assert qlora_min < lora_min
    tight = plan_memory(TINY, (qlora_min + lora_min) // 2, seq_len=8, global_batch=4)
    assert tight.best is not None and tight.best.setup.method == "qlora"
    assert all(c.estimate.peak_bytes <= tight.device_memory for c in tight.candidates if c.fits)


def test_plan_when_nothing_fits_says_what_would():
    plan = plan_memory(TINY, 1 * MiB, seq_len=8, global_batch=4, max_world_size=1)
    assert plan.best is None
    text = plan.table()
    assert "nothing fits" in text
    smallest = min(c.estimate.peak_bytes for c in plan.candidates)
    assert any(s.startswith("device memory:") for s in plan.suggestions)
    needed = plan.suggestions[0].split("needs ")[1].split(" per device")[0]
    assert parse_bytes(needed) >= smallest * 0.99


def test_check_fits_refuses_with_fields_and_fix():
    cfg = TrainingSpec(method="lora", batch_size=8, seq_len=64, lora_rank=4)
    est = estimate_memory(TINY, setup_from_config(cfg, num_workers=1, device="cuda"))
    assert check_fits(cfg, est.peak_bytes, TINY, num_workers=1, device="cuda").peak_bytes == est.peak_bytes
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, int(est.peak_bytes * 0.8), TINY, num_workers=1, device="cuda")
    message = str(err.value)
    assert "batch_size" in message and "exceeds" in message and "fix:" in message
    assert "gradient_checkpointing: true" in message or "batch_size: " in message


def test_setup_from_training_spec():
    spec = TrainingSpec(method="qlora", batch_size=4, seq_len=128, lora_rank=16, target_modules=["q_proj", "v_proj"],
                        compute_dtype="auto")
    st = setup_from_config(spec, num_workers=2)
    assert (st.method, st.micro_batch, st.seq_len, st.world_size, st.lora_rank) == ("qlora", 4, 128, 2, 16)
    assert st.target_modules == ("q_proj", "v_proj") and st.compute_dtype is None
    assert st.optimizer == "adamw" and not st.gradient_checkpointing


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * GiB), ("16GB", 16 * 10**9), ("512MiB", 512 * MiB),
                                           ("1.5GiB", int(1.5 * GiB)), (1000, 1000), ("2G", 2 * GiB)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError):
        parse_bytes("lots")
