"""The sweep's FLOP cap arithmetic and the finetune / sweep config checks, without Ray."""

from __future__ import annotations

import json

import pytest
from frugalray.config import ConfigError, parse_config
from frugalray.tune.budget import FlopReservations
from hypothesis import given, settings
from hypothesis import strategies as st


def test_reserve_is_all_or_nothing():
    b = FlopReservations(100.0)
    assert b.reserve(60)
    assert not b.reserve(50)  # would overshoot: refused whole, nothing taken
    assert b.reserved == 60 and b.refused == 1
    assert b.reserve(40) and b.remaining == 0
    assert not b.reserve(1e-9)


def test_reserve_steps_grants_what_fits():
    b = FlopReservations(100.0)
    assert b.reserve_steps(step_flops=30, max_steps=5, overhead=5) == 3  # 3*30+5 = 95
    assert b.remaining == pytest.approx(5)
    assert b.reserve_steps(step_flops=30, max_steps=5, overhead=0) == 0
    assert b.refused == 1


def test_settle_returns_the_unspent_part_and_rejects_overspend():
    b = FlopReservations(100.0)
    assert b.reserve(60)
    assert not b.reserve(50)
    b.settle(60, 20)  # the chunk cost 20: 40 go back to the pot
    assert b.spent == 20 and b.reserved == 20 and b.released == 40
    assert b.reserve(50)  # fits now
    with pytest.raises(ValueError, match="undercounts"):
        b.settle(50, 51)
    with pytest.raises(ValueError, match="never reserved"):
        b.settle(500, 1)


@pytest.mark.parametrize("cap", [0, -1, float("inf"), float("nan")])
def test_cap_must_be_positive_and_finite(cap):
    with pytest.raises(ValueError, match="flop_cap"):
        FlopReservations(cap)


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "steps", "settle"]),
        st.floats(min_value=1e-3, max_value=1e15, allow_nan=False, allow_infinity=False),
        st.integers(min_value=0, max_value=50),
        st.floats(min_value=0, max_value=1e14, allow_nan=False, allow_infinity=False),
        st.floats(min_value=0, max_value=1, allow_nan=False),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(cap=st.floats(min_value=1.0, max_value=1e16, allow_nan=False, allow_infinity=False), ops=ops)
def test_no_interleaving_of_reservations_exceeds_the_cap(cap, ops):
    """Whatever trials hold and settle, in any order: open holds + spend <= cap, spend <= holds."""
    b = FlopReservations(cap)
    open_holds: list[float] = []
    spent_total = 0.0
    for kind, flops, steps, overhead, fraction in ops:
        before = b.reserved
        if kind == "settle":
            if open_holds:
                hold = open_holds.pop(int(fraction * (len(open_holds) - 1)))
                b.settle(hold, hold * fraction)  # a real chunk costs at most its bound
                spent_total += hold * fraction
            continue
        if kind == "reserve":
            granted = flops if b.reserve(flops) else 0.0
        else:
            n = b.reserve_steps(flops, steps, overhead)
            assert 0 <= n <= steps
            granted = n * flops + overhead if n else 0.0
            if n < steps:  # a partial grant means one more step would not have fit
                assert before + (n + 1) * flops + overhead > cap * (1 - 1e-12)
        if granted:
            open_holds.append(granted)
        assert b.reserved == pytest.approx(before + granted)
        assert b.reserved <= cap * (1 + 1e-12)
        assert b.spent == pytest.approx(spent_total)
        assert b.reserved == pytest.approx(b.spent + sum(open_holds), rel=1e-9, abs=1e-9 * cap)


# -- config checks ----------------------------------------------------------------------


def test_lora_rank_zero_is_rejected_naming_the_field():
    from frugalray.train.finetune import FinetuneConfig

    with pytest.raises(ConfigError) as err:
        parse_config(FinetuneConfig, {"data_path": "x.jsonl", "lora_rank": 0, "lora_rnak": 4})
    text = str(err.value)
    assert "lora_rank" in text and "greater than or equal to 1" in text
    assert "lora_rnak: unknown key" in text and "did you mean 'lora_rank'" in text


def test_unknown_search_key_is_rejected_naming_it():
    from frugalray.tune.sweep import SweepConfig

    with pytest.raises(ConfigError) as err:
        parse_config(
            SweepConfig,
            {"finetune": {"data_path": "x.jsonl"}, "search_space": {"lr": [1e-3]}, "flop_cap": 1e12},
        )
    text = str(err.value)
    assert "search_space" in text and "'lr'" in text and "learning_rate" in text


def test_missing_data_file_is_a_config_error(tmp_path):
    from frugalray.train.finetune import FinetuneConfig, preflight_finetune

    cfg = parse_config(FinetuneConfig, {"data_path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="data_path: .*missing.jsonl' does not exist"):
        preflight_finetune(cfg)


def _rows(path, n):
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"prompt": f"What is {i} + 1? Reply with only the number.", "response": str(i + 1)}) + "\n" for i in range(n))
    return str(path)


def test_flop_cap_below_one_step_is_rejected_with_the_minimum(tmp_path, default_model_path):
    from frugalray.tune.sweep import SweepConfig, preflight_sweep, run_sweep

    base = {"model": default_model_path, "data_path": _rows(tmp_path / "d.jsonl", 8), "eval_rows": 2,
            "batch_size": 2, "seq_len": 48}
    cfg = parse_config(SweepConfig, {"finetune": base, "flop_cap": 1e9, "search_space": {"lora_rank": [2, 8]}})
    with pytest.raises(ConfigError) as err:
        run_sweep(cfg, tmp_path / "run")  # raises in preflight, before any Ray work
    (problem,) = err.value.problems
    assert problem.startswith("flop_cap:") and "at least" in problem
    minimum = float(problem.rsplit("at least ", 1)[1])
    # The minimum is what the cheapest trial's one step + eval costs: a cap of it passes.
    ok = parse_config(SweepConfig, {"finetune": base, "flop_cap": minimum * 1.001,
                                    "search_space": {"lora_rank": [2, 8]}})
    _, _, min_cost = preflight_sweep(ok)
    assert min_cost == pytest.approx(minimum, rel=1e-3)


def test_invalid_value_in_search_space_is_rejected(tmp_path, default_model_path):
    from frugalray.tune.sweep import SweepConfig, preflight_sweep

    base = {"model": default_model_path, "data_path": _rows(tmp_path / "d.jsonl", 8), "eval_rows": 2}
    cfg = parse_config(SweepConfig, {"finetune": base, "flop_cap": 1e15, "search_space": {"lora_rank": [0, 4]}})
    with pytest.raises(ConfigError, match="search_space: .*lora_rank"):
        preflight_sweep(cfg)


def test_shipped_finetune_and_sweep_configs_validate():
    from pathlib import Path

    from frugalray.config import load_config
    from frugalray.train.finetune import FinetuneConfig
    from frugalray.tune.sweep import SweepConfig

    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    finetune = load_config(FinetuneConfig, configs / "finetune.yaml")
    assert finetune.method == "qlora" and finetune.max_steps >= 1
    sweep = load_config(SweepConfig, configs / "sweep.yaml")
    assert sweep.flop_cap > 0 and set(sweep.search_space) <= {"learning_rate", "lora_rank"}
    for name in ("finetune.yaml", "sweep.yaml"):
        first = (configs / name).read_text().splitlines()[0]
        assert first.startswith("# python jobs/") and f"--config jobs/configs/{name}" in first
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(FinetuneConfig, configs / "finetune.yaml", ["lora_rank=0"])
    with pytest.raises(ConfigError, match="search_space"):
        load_config(SweepConfig, configs / "sweep.yaml", ["search_space.lr=[0.1]"])
