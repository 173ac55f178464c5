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
    from frugalray.benchmarking import write_plan

    write_plan("b", {"primary": {"method": sa.PRIMARY}, "prompts": [{"id": "x"}]}, tmp_path)
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


# -- serve_overhead: the ingress's own time and the paired hop (issue 20, point 4) -------------------------


@pytest.mark.parametrize("arms", [so.ARMS, ("frugal", "direct")])
def test_round_order_puts_every_arm_first_and_before_every_other_equally_often(arms):
    from collections import Counter
    from itertools import permutations

    orders = [so.round_order(r, arms) for r in range(2 * len(arms))]
    assert all(sorted(order) == sorted(arms) for order in orders)
    assert set(Counter(order[0] for order in orders).values()) == {2}
    before = Counter((a, b) for order in orders for i, a in enumerate(order) for b in order[i + 1:])
    assert {before[pair] for pair in permutations(arms, 2)} == {len(arms)}
    if len(arms) == 2:
        assert [o[0] for o in orders] == ["frugal", "direct", "direct", "frugal"]  # AB, BA, BA, AB


def _answer(latency_s, tokens=2, own_ms=None, engine_ms=None):
    out = {"ok": True, "latency_s": latency_s, "completion_tokens": tokens}
    if own_ms is not None:
        out.update(own_ms=own_ms, engine_ms=engine_ms)
    return out


def _failure(reason="HTTP 500", error="boom"):
    return {"ok": False, "latency_s": 0.01, "reason": reason, "error": error}


def test_paired_differences_use_only_rounds_where_both_arms_answered():
    rounds = [{"frugal": _answer(0.205), "direct": _answer(0.2)},
              {"frugal": _failure(), "direct": _answer(0.2)},
              {"frugal": _answer(0.3)},  # direct not deployed
              {"direct": _answer(0.25), "frugal": _answer(0.24)}]
    assert so.paired_differences(rounds, "frugal", "direct") == pytest.approx([5.0, -10.0])
    assert so.paired_differences(rounds, "direct", "frugal") == pytest.approx([-5.0, 10.0])


def test_bootstrap_interval_is_seeded_and_covers_the_mean_at_the_expected_width():
    import random
    import statistics

    rng = random.Random(1)
    values = [rng.gauss(5.0, 1.0) for _ in range(400)]
    lo, hi = so.bootstrap_interval(values, statistics.fmean)
    assert lo < 5.0 < hi
    # the normal interval's width, 2 x 1.96 sd / sqrt(n) (a 90% interval would be 16% narrower)
    assert hi - lo == pytest.approx(2 * 1.96 * statistics.stdev(values) / 20, rel=0.06)
    assert so.bootstrap_interval(values, statistics.fmean) == (lo, hi)  # same data, same interval
    assert so.bootstrap_interval([3.0] * 50, statistics.median) == (3.0, 3.0)
    assert so.bootstrap_interval([3.0], statistics.median) is None


@pytest.mark.parametrize(("interval", "verdict"), [
    ((2.0, 8.0), "met"), ((8.0, 12.0), "unresolved"), ((10.5, 15.0), "not met"), ((-3.0, 10.0), "met"),
    (None, "not measured")])
def test_an_interval_resolves_the_target_only_when_it_lies_on_one_side(interval, verdict):
    assert so.resolve(interval, "<= 10") == verdict


@pytest.mark.parametrize(("shift_ms", "verdict"), [(3.0, "met"), (25.0, "not met")])
def test_two_hundred_noisy_pairs_resolve_a_10_ms_target(shift_ms, verdict):
    import random

    rng = random.Random(2)
    # the hop on top of engine noise much larger than it (sd 20 ms): the old p50-of-32 could not tell these apart
    diffs = [shift_ms + rng.gauss(0.0, 20.0) for _ in range(200)]
    out = so.summarize_differences(diffs)
    assert out["n"] == 200 and out["median_ci95"][0] <= out["median_ms"] <= out["median_ci95"][1]
    assert so.resolve(out["median_ci95"], so.TARGET_MS) == verdict
    assert so.summarize_differences([])["median_ci95"] is None


def test_ingress_timing_headers_are_read_and_named_as_the_ingress_writes_them():
    from frugalray.serve import ingress

    assert (so.INGRESS_MS_HEADER, so.ENGINE_MS_HEADER) == (ingress.INGRESS_MS_HEADER, ingress.ENGINE_MS_HEADER)
    headers = ingress.RequestClock(started=1.0, engine_s=0.2).headers(1.25)
    assert so.ingress_timing(headers) == pytest.approx((50.0, 200.0))
    assert so.ingress_timing({}) is None
    assert so.ingress_timing({so.INGRESS_MS_HEADER: "x", so.ENGINE_MS_HEADER: "1"}) is None


def test_own_time_counts_answers_with_headers_and_says_how_many_lacked_them():
    rounds = [{"frugal": _answer(0.2, own_ms=float(i), engine_ms=100.0 + i)} for i in range(1, 101)]
    rounds += [{"frugal": _answer(0.2)}, {"frugal": _failure()}, {"direct": _answer(0.2)}]
    out = so.own_time_stats(rounds, "frugal")
    assert out["n"] == 100 and out["answers_without_timing_headers"] == 1
    assert out["own_p50_ms"] == pytest.approx(50.5) and out["own_p99_ms"] == pytest.approx(99.01)
    assert out["engine_p50_ms"] == pytest.approx(150.5)
    assert so.own_time_stats([], "frugal")["own_p50_ms"] is None


def test_token_mismatches_count_answers_that_differ_from_the_rounds_first():
    rounds = [{"a": _answer(0.1, 2), "b": _answer(0.1, 2), "c": _answer(0.1, 3)},
              {"a": _answer(0.1, 2), "b": _answer(0.1, 3), "c": _answer(0.1, 3)},
              {"a": _failure(), "b": _answer(0.1, 4)}, {"a": _failure()}]
    assert so.token_mismatches(rounds) == 3


def test_tally_reports_planned_run_and_failures_with_reasons():
    outcomes = {"frugal": [_answer(0.1), _failure("HTTP 500", "first"), _failure("HTTP 500", "second"),
                           _failure("ReadTimeout", "slow")],
                "direct": []}
    out = so.tally({"frugal": 4, "direct": 4, "ray_openai": 2}, outcomes, {"direct": "did not deploy: X"})
    assert out["frugal"] == {"planned": 4, "run": 4, "answered": 1, "failed": 3, "failures": {
        "HTTP 500": {"count": 2, "first": "first"}, "ReadTimeout": {"count": 1, "first": "slow"}}}
    assert out["direct"]["not_run"] == 4 and out["direct"]["not_run_reason"] == "did not deploy: X"
    assert out["ray_openai"]["not_run"] == 2 and "stopped early" in out["ray_openai"]["not_run_reason"]


def test_the_new_targets_are_accepted_against_the_committed_record_after_the_plan(tmp_path):
    import json

    from frugalray.benchmarking import write_plan, write_result

    # the record as it was before the target's metric moved (bench/results has the moved one now)
    (tmp_path / "serve_overhead.json").write_text(json.dumps(
        {"bench": "serve_overhead", "targets": {"added_p50_ms": "<= 10", "throughput_ratio": ">= 0.9"}}))
    write_plan("serve_overhead", {"primary": {}}, tmp_path)  # as run() does before the first request
    metrics = {"added_p50_ms_upper95": 6.0, "added_p50_ms": 4.0, "throughput_ratio": 1.0}
    with pytest.raises(ValueError, match="added_p50_ms"):
        write_result("serve_overhead", {}, metrics, so.TARGETS, out_dir=tmp_path)
    out = write_result("serve_overhead", {}, metrics, so.TARGETS, out_dir=tmp_path,
                       targets_history=so.TARGETS_HISTORY)
    assert out["met"] == {"added_p50_ms_upper95": True, "throughput_ratio": True}
    assert [(e["metric"], e["old"], e["new"]) for e in out["targets_history"]] == [
        ("added_p50_ms", "<= 10", None), ("added_p50_ms_upper95", None, "<= 10")]


def _fake_run(arms, n_rounds=200, hop_ms=3.0):
    import random

    rng = random.Random(3)
    rounds = []
    for _ in range(n_rounds):
        engine = 0.2 + rng.uniform(0.0, 0.05)  # shared by the round, so the pairs cancel most of it
        rnd = {}
        for arm in arms:
            if arm == "direct":
                rnd[arm] = _answer(engine + rng.gauss(0.0, 0.002))
            elif arm == "ray_openai":
                rnd[arm] = _answer(engine + 0.002 + rng.gauss(0.0, 0.002))
            else:
                rnd[arm] = _answer(engine + hop_ms / 1000 + rng.gauss(0.0, 0.002), own_ms=1.5, engine_ms=200.0)
        rounds.append(rnd)
    rps = {"direct": 2.0, "ray_openai": 1.9, "frugal": 1.8, "frugal_budget_greedy": 1.7}
    blocks = {arm: [{"wall_s": 8 / rps[arm], "latencies_s": [0.5] * 8, "errors": 0,
                     "results": [_answer(0.5)] * 8}] for arm in arms}
    return rounds, blocks


def test_a_run_is_summarized_with_the_hop_its_interval_and_the_requests_planned(capsys):
    rounds, blocks = _fake_run(so.ARMS)
    planned = {arm: 200 for arm in so.ARMS}
    metrics = so.summarize_run(rounds, blocks, so.ARMS, planned, {arm: 8 for arm in so.ARMS}, {})
    assert metrics["added_p50_ms"] == pytest.approx(3.0, abs=1.0)
    lo, hi = metrics["added_p50_ms_ci95"]
    assert lo < 3.0 < hi and metrics["added_p50_ms_upper95"] == hi < 10
    assert metrics["added_p50_resolution"] == "met" and metrics["hop_pairs"] == 200
    assert metrics["over_ray_openai_p50_ms"] == pytest.approx(1.0, abs=1.0)
    assert metrics["ingress_own_p50_ms"] == 1.5 and metrics["ingress_own_requests"] == 200
    assert metrics["at_least_200_requests"] is True
    assert metrics["throughput_ratio"] == pytest.approx(1.8 / 1.9)
    assert metrics["throughput_ratio_vs_direct"] == pytest.approx(0.9)
    assert metrics["requests"]["latency_phase"]["direct"] == {
        "planned": 200, "run": 200, "answered": 200, "failed": 0, "failures": {}}
    so.print_summary(metrics, so.ARMS, {}, {"added_p50_ms_upper95": True})
    out = capsys.readouterr().out
    assert "added p50 (median paired frugal - direct)" in out and "frugal-ray_openai" in out


def test_a_run_without_the_direct_arm_says_the_hop_was_not_measured_and_why(capsys):
    arms = tuple(a for a in so.ARMS if a != "direct")
    rounds, blocks = _fake_run(arms, n_rounds=20)
    reason = "the direct app did not deploy: RuntimeError: x"
    metrics = so.summarize_run(rounds, blocks, arms, {arm: 20 for arm in so.ARMS}, {arm: 8 for arm in so.ARMS},
                               {"direct": reason})
    assert metrics["added_p50_ms_upper95"] is None and metrics["added_p50_resolution"] == "not measured"
    assert metrics["throughput_ratio_vs_direct"] is None and metrics["at_least_200_requests"] is False
    assert metrics["requests"]["latency_phase"]["direct"]["not_run_reason"] == reason
    assert metrics["requests"]["throughput_phase"]["direct"]["not_run"] == 8
    so.print_summary(metrics, arms, {"direct": reason}, {"added_p50_ms_upper95": False})
    assert "not measured" in capsys.readouterr().out
