"""Budget ladder replay, the budget journal across a restart, and the sweep's ladder/bad-input config checks (no Ray)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frugalray.config import ConfigError, parse_config
from frugalray.tune.budget import FlopReservations, SweepFlopBudget, read_journal
from frugalray.tune.ladder import ChunkRecord, LadderReport, budget_ladder, ladder_markdown, winner_changes


def fifo_chunks():
    """Two trials run one after the other: A (3 chunks) ends at 0.90, B (3 chunks) ends at 0.80.

    Each chunk costs 8 and holds 10. A leads until B's last chunk.
    """
    chunks, clock = [], 0.0
    for tid, metrics in (("A", [1.2, 1.0, 0.9]), ("B", [1.3, 0.95, 0.8])):
        for m in metrics:
            clock += 8
            chunks.append(ChunkRecord(tid, {"learning_rate": 1e-3 if tid == "A" else 1e-4}, clock, 8, 10, m))
    return chunks


def test_each_cap_replays_the_chunks_it_could_have_paid_for_in_spend_order():
    rungs = budget_ladder(fifo_chunks(), [100, 20, 26, 50], "min")
    assert [r.cap for r in rungs] == [20, 26, 50, 100]
    low, mid, high, top = rungs
    # cap 20: chunk 1 holds 10 <= 20, costs 8; chunk 2: 8 + 10 <= 20; chunk 3: 16 + 10 > 20: cut
    assert (low.chunks_used, low.flops_used, low.best_metric, low.best_trial) == (2, 16, 1.0, "A")
    assert low.status == "exact"  # 4 FLOPs left at the cut cannot pay for a 10-FLOP hold
    assert (mid.chunks_used, mid.best_metric, mid.trials_seen) == (3, 0.9, 1)
    # cap 50 pays for the whole sweep (the last chunk: 40 + 10 <= 50): the run itself
    assert high.chunks_used == 6 and high.status == "exact" and "whole sweep" in high.note
    assert top.best_metric == 0.8 and top.best_config == {"learning_rate": 1e-4}
    assert all(r.flops_used <= r.cap for r in rungs)


def test_exactness_depends_on_the_room_left_and_on_the_scheduler():
    chunks = fifo_chunks()
    (r,) = budget_ladder(chunks, [26], "min")  # 3 chunks = 24 used, 2 left < the 10 of any hold
    assert r.chunks_used == 3 and r.status == "exact"
    (r,) = budget_ladder(chunks, [45], "min")  # 5 chunks = 40 used; 5 left < 10: exact, B at 0.95 vs A 0.9
    assert r.chunks_used == 5 and r.best_trial == "A" and r.best_metric == 0.9 and r.status == "exact"
    (r,) = budget_ladder(chunks, [45], "min", prefix_exact=False, why_estimate="marginal")
    assert r.status == "estimate" and r.note == "marginal"
    # Holds far above real costs: room is left at the cut where a partial chunk might have fitted.
    loose = [ChunkRecord(c.trial_id, c.config, c.sweep_flops, c.chunk_flops, 30, c.metric) for c in chunks]
    (r,) = budget_ladder(loose, [50], "min")
    assert r.chunks_used == 3 and r.status == "exact"  # 24 used + 30 > 50; 26 left < 30
    (r,) = budget_ladder(loose, [56], "min")
    assert r.chunks_used == 4 and r.status == "exact"


def test_the_winner_change_is_stated_and_max_mode_is_mirrored():
    rungs = budget_ladder(fifo_chunks(), [30, 100], "min")
    (line,) = winner_changes(rungs)
    assert "1e-3" in line.replace("0.001", "1e-3") and "changes between cap 30 and 100" in line
    flipped = [ChunkRecord(c.trial_id, c.config, c.sweep_flops, c.chunk_flops, c.chunk_hold, -c.metric)
               for c in fifo_chunks()]
    assert [r.best_trial for r in budget_ladder(flipped, [30, 100], "max")] == ["A", "B"]
    report = LadderReport(metric="eval_loss", mode="min", scheduler="fifo", flops_spent=48, rungs=rungs,
                          winner_changes=winner_changes(rungs))
    md = ladder_markdown(report)
    assert md.count("\n| ") == 3 and "winning configuration changes" in md


def test_bad_caps_and_mode_are_refused():
    with pytest.raises(ValueError, match="flop_caps"):
        budget_ladder(fifo_chunks(), [0, 10])
    with pytest.raises(ValueError, match="mode"):
        budget_ladder(fifo_chunks(), [10], "maximize")


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.tuples(st.floats(1, 100), st.floats(1, 3), st.floats(0, 5)), min_size=1, max_size=30),
    caps=st.lists(st.floats(1, 3000), min_size=1, max_size=5),
)
def test_no_rung_uses_more_than_its_cap_and_bigger_caps_never_see_less(costs, caps):
    clock, chunks = 0.0, []
    for i, (cost, pad, metric) in enumerate(costs):
        clock += cost
        chunks.append(ChunkRecord(str(i % 3), {"i": i % 3}, clock, cost, cost * pad, metric))
    rungs = budget_ladder(chunks, caps, "min")
    for r in rungs:
        assert r.flops_used <= r.cap * (1 + 1e-12)
    used = [r.chunks_used for r in rungs]
    assert used == sorted(used)


# -- the budget journal across a killed driver ------------------------------------------------


def test_journal_rebuild_charges_open_holds_once_and_never_passes_the_cap(tmp_path):
    path = tmp_path / "journal.jsonl"
    first = SweepFlopBudget(100.0, str(path))
    assert first.reserve_steps(10.0, 3, 5.0) == 3  # hold 35
    assert first.settle(35.0, 20.0) == 20.0  # spent 20, 15 back
    assert first.reserve_steps(10.0, 2, 5.0) == 2  # hold 25 open when the driver dies
    # The driver dies here. The resumed actor rebuilds: 20 settled + 25 open charged in full.
    second = SweepFlopBudget(100.0, str(path))
    snap = second.snapshot()
    assert snap["spent"] == pytest.approx(45) and snap["charged_at_restart"] == pytest.approx(25)
    assert snap["remaining"] == pytest.approx(55)
    assert second.reserve_steps(10.0, 10, 5.0) == 5  # 55 fit exactly
    assert second.settle(55.0, 30.0) == pytest.approx(75)
    # A second restart replays the same journal (its restart event included): no double charge.
    third = SweepFlopBudget(100.0, str(path))
    assert third.snapshot()["spent"] == pytest.approx(75)
    assert third.snapshot()["charged_at_restart"] == pytest.approx(25)
    ops = [e["op"] for e in read_journal(path)]
    assert ops == ["open", "reserve", "settle", "reserve", "restart", "reserve", "settle", "restart"]


def test_a_torn_last_journal_line_is_dropped_but_a_broken_middle_is_an_error(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"op": "reserve", "flops": 5.0}) + "\n" + '{"op": "sett')
    assert FlopReservations.from_journal(10, read_journal(path)).spent == 5.0
    path.write_text('{"op": \n' + json.dumps({"op": "reserve", "flops": 5.0}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_journal(path)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["steps", "settle", "restart"]), st.floats(1, 50),
                              st.integers(1, 5), st.floats(0, 1)), max_size=40))
def test_any_sequence_of_holds_settles_and_restarts_stays_under_the_cap(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("j") / "journal.jsonl"
    budget = SweepFlopBudget(500.0, str(path))
    holds: list[float] = []
    for kind, step, n, frac in ops:
        if kind == "steps":
            got = budget.reserve_steps(step, n, 1.0)
            if got:
                holds.append(got * step + 1.0)
        elif kind == "settle" and holds:
            hold = holds.pop(0)
            budget.settle(hold, hold * frac)
        elif kind == "restart":
            budget = SweepFlopBudget(500.0, str(path))  # open holds die with the driver
            holds.clear()
        snap = budget.snapshot()
        assert snap["spent"] <= snap["reserved"] + 1e-9 and snap["reserved"] <= 500.0 * (1 + 1e-12)
    assert FlopReservations.from_journal(500.0, read_journal(path)).spent <= 500.0 * (1 + 1e-12)


# -- config: ladder caps and the bad inputs refused before trials start -----------------------

BASE = {"finetune": {"data_path": "x.jsonl"}}


def test_flop_caps_set_the_cap_to_their_largest_and_must_not_exceed_it():
    cfg = parse_config(__import__("frugalray.tune.sweep", fromlist=["SweepConfig"]).SweepConfig,
                       {**BASE, "flop_caps": [3e13, 1e13, 1e14]})
    assert cfg.flop_cap == 1e14 and cfg.flop_caps == [1e13, 3e13, 1e14]
    from frugalray.tune.sweep import SweepConfig

    with pytest.raises(ConfigError, match="flop_caps: the largest cap"):
        parse_config(SweepConfig, {**BASE, "flop_caps": [1e13, 1e14], "flop_cap": 5e13})
    with pytest.raises(ConfigError, match="flop_caps"):
        parse_config(SweepConfig, {**BASE, "flop_caps": [1e13, -1.0]})
    with pytest.raises(ConfigError, match="flop_cap: required"):
        parse_config(SweepConfig, BASE)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"metric": "accuracy"}, "metric"),  # an unknown metric name
        ({"mode": "maximize"}, "mode"),  # neither min nor max
        ({"search_space": {"learning_rate": []}}, "search_space"),  # nothing to sample
        ({"search_space": {"dropout": [0.1]}}, "search_space"),  # not a searchable key
        ({"search_space": {"learning_rate": 1e-3}}, "search_space.learning_rate"),  # not a list of choices
        ({"sweep_stop_gain": 0}, "sweep_stop_gain"),
    ],
)
def test_bad_sweep_input_is_refused_naming_the_field(bad, field):
    from frugalray.tune.sweep import SweepConfig

    with pytest.raises(ConfigError) as err:
        parse_config(SweepConfig, {**BASE, "flop_cap": 1e13, **bad})
    assert any(p.startswith(field) for p in err.value.problems), err.value.problems


def test_sweep_command_refuses_bad_flag_combinations_before_any_work(tmp_path):
    from frugalray.stages import sweep_command

    with pytest.raises(ConfigError, match="flop_caps"):
        sweep_command("x.yaml", None, flop_caps="1e13,lots")
    with pytest.raises(ConfigError, match="resume: .*no sweep_state.json"):
        sweep_command(None, None, resume=str(tmp_path))
    with pytest.raises(ConfigError, match="drop --config"):
        sweep_command("x.yaml", None, resume=str(tmp_path))
    with pytest.raises(ConfigError, match="config: pass --config"):
        sweep_command(None, None)


def _rows(path, n):
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"prompt": f"What is {i} + 1? Reply with only the number.", "response": str(i + 1)}) + "\n"
                      for i in range(n))
    return str(path)


def test_a_cap_below_the_grace_period_or_a_ladder_cap_below_one_chunk_is_refused_before_ray(tmp_path, default_model_path):
    from frugalray.tune.sweep import SweepConfig, preflight_sweep, run_sweep

    base = {"model": default_model_path, "data_path": _rows(tmp_path / "d.jsonl", 8), "eval_rows": 2,
            "batch_size": 2, "seq_len": 48, "method": "lora"}
    ok = parse_config(SweepConfig, {"finetune": base, "flop_cap": 1e15})
    _, _, one_chunk = preflight_sweep(ok)
    for scheduler in ("asha", "marginal"):
        cfg = parse_config(SweepConfig, {"finetune": base, "flop_cap": 3 * one_chunk, "scheduler": scheduler,
                                         "grace_period_flops": 4 * one_chunk})
        with pytest.raises(ConfigError) as err:
            run_sweep(cfg, tmp_path / "run")  # raises in preflight: no Ray, no trial
        (problem,) = err.value.problems
        assert problem.startswith("grace_period_flops:") and "exceeds flop_cap" in problem
    # The default grace (two report chunks at the upper bound) above the cap names flop_cap.
    cfg = parse_config(SweepConfig, {"finetune": base, "flop_cap": 1.5 * one_chunk, "scheduler": "marginal",
                                     "steps_per_report": 1})
    with pytest.raises(ConfigError, match="flop_cap: the marginal scheduler's grace period"):
        preflight_sweep(cfg)
    cfg = parse_config(SweepConfig, {"finetune": base, "flop_caps": [0.5 * one_chunk, 10 * one_chunk]})
    with pytest.raises(ConfigError, match="flop_caps: .* cannot pay for one training step"):
        preflight_sweep(cfg)
    assert not (tmp_path / "run").exists()
