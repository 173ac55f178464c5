"""ComputeLedger arithmetic and the config loader's error messages."""

import json
import multiprocessing as mp

import pytest
from pydantic import Field

from frugalray.budget.ledger import ComputeLedger
from frugalray.config import ConfigError, StrictModel, apply_overrides, load_config, parse_config


def _append_many(run_dir, worker, n):
    ledger = ComputeLedger(run_dir)
    for i in range(n):
        ledger.record(f"stage{worker % 2}", flops=1e9, tokens=10, wall_s=0.01, produced={"i": i})


def test_ledger_totals_add_up_across_concurrent_writers(tmp_path):
    procs = [mp.Process(target=_append_many, args=(tmp_path, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    ledger = ComputeLedger(tmp_path)
    entries = ledger.entries()
    assert len(entries) == 200  # no torn or lost lines
    totals = ledger.totals_by_stage()
    assert totals["stage0"]["flops"] + totals["stage1"]["flops"] == pytest.approx(ledger.total_flops())
    assert ledger.total_flops() == pytest.approx(200 * 1e9)
    assert totals["stage0"]["tokens"] == 1000
    # every line is standalone JSON
    for line in ledger.path.read_text().splitlines():
        json.loads(line)


def test_ledger_rejects_negative_spend(tmp_path):
    with pytest.raises(ValueError, match="must be >= 0"):
        ComputeLedger(tmp_path).record("x", flops=-1)


class _Lora(StrictModel):
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = 16


class _Job(StrictModel):
    data_path: str
    lora: _Lora = Field(default_factory=_Lora)


def test_typo_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        parse_config(_Job, {"data_path": "x", "lora": {"lora_rnak": 4}})
    msg = str(err.value)
    assert "lora.lora_rnak" in msg and "did you mean 'lora_rank'" in msg


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config(_Job, {"lora": {"lora_rank": 0}, "extra": 1})
    problems = err.value.problems
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "data_path: required" in joined
    assert "lora.lora_rank" in joined and "greater than or equal to 1" in joined
    assert "extra: unknown key" in joined


def test_yaml_loading_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data_path: a.jsonl\nlora:\n  lora_rank: 4\n")
    cfg = load_config(_Job, path, ["lora.lora_alpha=32"])
    assert cfg.lora.lora_rank == 4 and cfg.lora.lora_alpha == 32
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_Job, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_Job, tmp_path / "bad.yaml")
