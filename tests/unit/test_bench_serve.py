"""The pure analysis parts of bench/serve_adaptive.py and bench/serve_overhead.py (no Ray, no server).

The harnesses themselves need a served model (minutes on 2 cores), so they are run by hand
(`python bench/serve_adaptive.py --quick`, `python bench/serve_overhead.py --quick`); these
tests pin the arithmetic that turns their raw samples and latencies into the reported numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import serve_adaptive as sa
import serve_overhead as so

from frugalray.budget.flops import ModelShape
from frugalray.serve.stopping import Sample
from frugalray.serve.usage import request_flops

SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=100,
                   gated_mlp=True)


def pool_of(answers: list[str | None], tokens: int = 3) -> list[dict]:
    return [{"answer": a, "completion_tokens": tokens, "mean_logprob": -0.1} for a in answers]


def test_self_consistency_uses_the_first_k_samples_and_the_servers_tie_break():
    pool = [Sample(a, 2) for a in ["7", "8", "8", "7", "9", "9", "9", "9"]]
    assert sa.self_consistency_at(pool, 1) == ("7", 1)
    # 2-2 tie among the first four: the answer seen first wins (the server's majority_vote rule)
    assert sa.self_consistency_at(pool, 4) == ("7", 4)
    assert sa.self_consistency_at(pool, 8) == ("9", 8)
    with pytest.raises(ValueError):
        sa.self_consistency_at(pool, 16)


def test_replayed_adaptive_stops_on_a_unanimous_start():
    # Beta rule at 0.95: four agreeing votes give 1 - 1/32 = 0.969, three give 0.9375.
    pool = [Sample("5", 3)] * 16
    out = sa.replay_policy("adaptive_consistency", pool, 0.95, 2, max_tokens=4)
    assert (out.samples, out.answer, out.stopped_early) == (4, "5", True)
    out1 = sa.replay_policy("adaptive_consistency", pool, 0.95, 1, max_tokens=4)
    assert out1.samples == 4 and out1.rounds == 4
    out_09 = sa.replay_policy("adaptive_consistency", pool, 0.9, 1, max_tokens=4)
    assert out_09.samples == 3


def test_replayed_adaptive_uses_the_whole_pool_when_answers_never_settle():
    pool = [Sample(str(i % 5), 3) for i in range(16)]
    out = sa.replay_policy("adaptive_consistency", pool, 0.95, 2, max_tokens=4)
    assert out.samples == 16 and not out.stopped_early and out.reason == "max_samples"


def test_pooled_outcomes_flops_match_the_servers_formula():
    record = {"pool": pool_of(["3"] * 16, tokens=3), "prompt_tokens": 20}
    out = sa.pooled_outcomes(record, SHAPE, [("adaptive_consistency", 0.95, 2)], max_tokens=4)
    assert out["SC@16"]["flops"] == pytest.approx(request_flops(SHAPE, 20, [3] * 16, 0, 1))
    assert out["SC@4"]["samples"] == 4
    sim = out["sim:adaptive_consistency@0.95/r2"]
    # two rounds of two: the prompt is prefilled once per round
    assert sim["samples"] == 4
    assert sim["flops"] == pytest.approx(request_flops(SHAPE, 20, [3] * 4, 0, 2))


def test_summary_ratios_and_gap_against_sc16():
    records = [
        {"dataset": "arithmetic", "gold": "1", "methods": {
            "SC@16": {"answer": "1", "samples": 16, "flops": 160.0},
            "ac": {"answer": "1", "samples": 4, "flops": 40.0, "stopped_early": True}}},
        {"dataset": "arithmetic", "gold": "2", "methods": {
            "SC@16": {"answer": "2", "samples": 16, "flops": 160.0},
            "ac": {"answer": "3", "samples": 4, "flops": 40.0, "stopped_early": False}}},
    ]
    rows = {r["method"]: r for r in sa.compare_to_sc16(sa.summarize(records, sa.source_of))}
    assert rows["SC@16"]["accuracy"] == 1.0 and rows["ac"]["accuracy"] == 0.5
    assert rows["ac"]["sample_ratio"] == pytest.approx(4.0)
    assert rows["ac"]["flops_ratio"] == pytest.approx(4.0)
    assert rows["ac"]["acc_gap_pts"] == pytest.approx(50.0)
    assert rows["ac"]["stopped_early"] == pytest.approx(0.5)
    assert rows["SC@16"]["source"] == "server n=16 pool" and rows["ac"]["source"] == "server"


def test_a_missing_answer_never_counts_as_correct():
    records = [{"dataset": "gsm8k", "gold": None, "methods": {"SC@16": {"answer": None, "samples": 16, "flops": 1.0}}}]
    (row,) = sa.summarize(records, sa.source_of)
    assert row["accuracy"] == 0.0


def test_pareto_front():
    points = [("a", 1.0, 0.5), ("b", 4.0, 0.7), ("c", 4.0, 0.6), ("d", 16.0, 0.7), ("e", 2.0, 0.4)]
    assert sa.pareto_front(points) == ["a", "b"]


def test_by_difficulty_splits_levels():
    records = [
        {"difficulty": 1, "gold": "1", "methods": {"m": {"answer": "1", "samples": 4, "flops": 1.0}}},
        {"difficulty": 2, "gold": "2", "methods": {"m": {"answer": "9", "samples": 16, "flops": 1.0}}},
    ]
    rows = {r["difficulty"]: r for r in sa.by_difficulty(records, ["m"])}
    assert rows[1]["accuracy"] == 1.0 and rows[1]["mean_samples"] == 4
    assert rows[2]["accuracy"] == 0.0 and rows[2]["mean_samples"] == 16


def test_percentile_and_arm_comparison():
    assert so.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert so.percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    assert so.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    stats = {
        "ray_openai": so.arm_stats([{"latencies_s": [0.1, 0.1], "wall_s": 0.2}, {"latencies_s": [0.1], "wall_s": 0.1}]),
        "frugal": so.arm_stats([{"latencies_s": [0.105, 0.105, 0.105], "wall_s": 0.4, "errors": 1}]),
    }
    assert stats["ray_openai"]["rps"] == pytest.approx(10.0)
    out = so.compare_arms(stats)
    assert out["frugal"]["throughput_ratio"] == pytest.approx(0.75)
    assert out["frugal"]["added_p50_ms"] == pytest.approx(5.0)
    assert out["frugal"]["errors"] == 1


def test_block_order_rotates_every_arm_through_first_place():
    firsts = {so.block_order(b)[0] for b in range(len(so.ARMS))}
    assert firsts == set(so.ARMS)
    assert sorted(so.block_order(5)) == sorted(so.ARMS)


def _pipeline_run(tmp_path, trained: list[str]):
    import json

    (tmp_path / "data").mkdir()
    (tmp_path / "pipeline_config.json").write_text(json.dumps({"generate": {
        "families": ["arithmetic", "compare"], "max_digits": 1, "operations": ["+"], "response_style": "worked"}}))
    (tmp_path / "data" / "tasks.jsonl").write_text("".join(json.dumps({"instruction": q}) + "\n" for q in trained))
    return tmp_path


def test_fresh_prompts_are_the_trained_family_and_never_a_trained_question(tmp_path):
    from frugalray.examples.generate import make_eval_set

    # train on most of the 1-digit questions the generator would ask first
    first = make_eval_set(40, seed=sa.HELDOUT_SEED, families=["arithmetic", "compare"], max_digits=1,
                          operations=["+"], response_style="worked")
    generate, seen = sa.trained_run(_pipeline_run(tmp_path, [r["instruction"] for r in first[:30]]))
    assert len(seen) == 30
    rows = sa.fresh_heldout_rows(20, generate, seen)
    assert len(rows) == 20 and not {r["prompt"] for r in rows} & seen
    assert {r["family"] for r in rows} == {"arithmetic", "compare"}
    assert all(r["gold"] == str(int(r["gold"])) for r in rows)  # normalized as the server's extractor
    # the question space is too small for this many unseen questions: refused, never a repeat
    with pytest.raises(SystemExit, match="--n-prompts"):
        sa.fresh_heldout_rows(200, generate, seen)


def test_a_run_dir_without_a_pipeline_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--run-dir.*make demo"):
        sa.trained_run(tmp_path)


def test_each_prompt_is_asked_of_every_served_model_in_its_own_group():
    rows = [{"id": "a", "dataset": "arithmetic"}, {"id": "b", "dataset": "arithmetic"}]
    out = sa.for_models(rows, {"adapter": "arith", "base": "smol"}, 0.7)
    assert [(r["id"], r["dataset"], r["model"]) for r in out] == [
        ("a", "adapter@T0.7", "arith"), ("a", "base@T0.7", "smol"),
        ("b", "adapter@T0.7", "arith"), ("b", "base@T0.7", "smol")]
    assert {r["task"] for r in out} == {"arithmetic"} and rows[0]["dataset"] == "arithmetic"


def test_the_plan_is_written_before_any_request_keeping_the_target_history(tmp_path):
    import json

    history = [{"metric": "m", "old": ">= 1", "new": ">= 2", "commit": "abc", "why": "because"}]
    (tmp_path / "b.json").write_text(json.dumps({"targets": {"m": ">= 2"}, "targets_history": history,
                                                 "metrics": {"m": 3}}))
    sa.plan_record(tmp_path, "b", {"primary": {"method": sa.PRIMARY}, "prompts": [{"id": "x"}]})
    planned = json.loads((tmp_path / "b.json").read_text())
    assert planned["status"] == "running" and planned["config"]["prompts"] == [{"id": "x"}]
    assert planned["targets"] == {"m": ">= 2"} and planned["targets_history"] == history
    assert "metrics" not in planned  # no stale figures under a running plan


def test_sc_flops_carry_the_adapters_lora_term():
    record = {"pool": pool_of(["3"] * 16, tokens=3), "prompt_tokens": 20}
    plain = sa.pooled_outcomes(record, SHAPE, [], max_tokens=4)
    tuned = sa.pooled_outcomes(record, SHAPE, [], max_tokens=4, lora_params=1000)
    assert tuned["SC@16"]["flops"] == pytest.approx(request_flops(SHAPE, 20, [3] * 16, 1000, 1))
    assert tuned["SC@16"]["flops"] > plain["SC@16"]["flops"]
