"""Pure training logic: the data plan, LR schedules, option checks, world-size check, checkpoint lookup."""

from __future__ import annotations

import pytest

from frugalray.config import ConfigError, parse_config
from frugalray.train.batching import BatchPlan
from frugalray.train.finetune import FinetuneConfig, option_problems
from frugalray.train.loop import lr_factor


def cfg(**over) -> FinetuneConfig:
    return parse_config(FinetuneConfig, {"data_path": "x.jsonl", **over})


# -- data plan --------------------------------------------------------------------------
def test_ranks_read_disjoint_slices_that_cover_the_global_batch():
    plan = BatchPlan(n_rows=10, micro_batch=2, accum_steps=2, world_size=2, seed=3)
    for step in range(7):
        per_rank = [plan.micro_batches(step, r) for r in range(2)]
        flat = [i for mbs in per_rank for mb in mbs for i in mb]
        assert sorted(flat) == sorted(plan.global_indices(step))
        assert all(len(mb) == 2 for mbs in per_rank for mb in mbs)


def test_single_process_and_two_ranks_see_the_same_global_batches():
    one = BatchPlan(n_rows=9, micro_batch=4, world_size=1, seed=1)
    two = BatchPlan(n_rows=9, micro_batch=2, world_size=2, seed=1)
    for step in range(6):
        assert one.global_indices(step) == two.global_indices(step)


def test_every_epoch_is_a_permutation_and_epochs_differ():
    plan = BatchPlan(n_rows=8, micro_batch=4, seed=0)
    epoch0 = plan.global_indices(0) + plan.global_indices(1)
    epoch1 = plan.global_indices(2) + plan.global_indices(3)
    assert sorted(epoch0) == sorted(epoch1) == list(range(8))
    assert epoch0 != epoch1


def test_position_is_a_pure_function_of_the_step():
    a = BatchPlan(n_rows=7, micro_batch=3, seed=5)
    b = BatchPlan(n_rows=7, micro_batch=3, seed=5)
    for step in range(5):
        a.global_indices(step)  # a walked through the steps, b jumps straight to step 5
    assert a.global_indices(5) == b.global_indices(5)


def test_as_given_keeps_the_curriculum_order_across_epochs():
    plan = BatchPlan(n_rows=5, micro_batch=2, seed=9, order="as_given")
    assert [plan.global_indices(s) for s in range(4)] == [[0, 1], [2, 3], [4, 0], [1, 2]]


def test_length_bucketing_groups_similar_lengths():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    plan = BatchPlan(n_rows=8, micro_batch=2, seed=0, lengths=lengths)
    batches = [plan.global_indices(s) for s in range(4)]
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert max(lengths[i] for i in b) - min(lengths[i] for i in b) <= 2


# -- LR schedule ----------------------------------------------------------------------------
def test_lr_schedules():
    assert [lr_factor(s, 4, "constant", 0) for s in range(4)] == [1.0] * 4
    assert [lr_factor(s, 4, "linear", 2) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_factor(0, 10, "cosine", 0) == pytest.approx(1.0)
    assert lr_factor(10, 10, "cosine", 0) == pytest.approx(0.0)


# -- config checks ----------------------------------------------------------------------------
def test_lora_rank_zero_is_rejected_naming_the_field():
    with pytest.raises(ConfigError) as err:
        cfg(lora_rank=0)
    assert any(p.startswith("lora_rank") for p in err.value.problems)


def test_four_bit_method_on_a_device_without_kernels_is_rejected():
    problems = option_problems(cfg(method="qlora"), four_bit_devices={"cuda"}, cuda=False)
    assert len(problems) == 1 and problems[0].startswith("method: qlora needs bitsandbytes 4-bit kernels on cpu")
    assert option_problems(cfg(method="lora"), four_bit_devices=set(), cuda=False) == []
    assert option_problems(cfg(method="qlora"), four_bit_devices={"cpu"}, cuda=False) == []


def test_cuda_and_paged_optimizer_need_a_gpu():
    problems = option_problems(cfg(device="cuda", optimizer="paged_adamw"), {"cpu"}, cuda=False)
    fields = [p.split(":")[0] for p in problems]
    assert "device" in fields and "optimizer" in fields
    assert option_problems(cfg(device="cuda", optimizer="paged_adamw"), {"cpu", "cuda"}, cuda=True) == []


def test_conflicting_options_name_their_fields():
    problems = option_problems(
        cfg(optimizer="adamw_8bit", num_workers=2, length_bucketing=True, data_order="as_given",
            method="full", export_merged=True),
        {"cpu"}, cuda=False,
    )
    fields = sorted(p.split(":")[0] for p in problems)
    assert fields == ["export_merged", "length_bucketing", "optimizer"]
