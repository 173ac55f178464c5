"""MarginalGainScheduler's mapping of Tune callbacks onto the policy, with fake trials (no cluster)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.tune")

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from frugalray.config import ConfigError, parse_config
from frugalray.tune.scheduler import MarginalGainScheduler

G = 1e9


class FakeController:
    def __init__(self, trials):
        self.trials = trials
        self.stop_requests = []

    def get_trials(self):
        return list(self.trials)

    def request_stop_trial(self, trial):
        self.stop_requests.append(trial.trial_id)


def fake_trial(tid):
    return SimpleNamespace(trial_id=tid, status=Trial.PENDING)


def make(cap=1e3 * G, grace=2 * G, **kw):
    sched = MarginalGainScheduler(flop_cap=cap, grace_flops=grace, **kw)
    assert sched.set_search_properties("eval_loss", "min")
    return sched


def test_results_map_to_continue_then_stop_with_flops_as_the_time_axis():
    sched = make(stop_rate=0.1 / G)
    trial = fake_trial("a")
    ctl = FakeController([trial])
    sched.on_trial_add(ctl, trial)
    assert sched.choose_trial_to_run(ctl) is trial
    assert sched.choose_trial_to_run(ctl) is trial  # idempotent until Tune starts it
    trial.status = Trial.RUNNING
    decisions = []
    for k in range(1, 30):
        # 1 + 10 (c/G)^-1: the hand-worked stop of test_marginal_policy is at 10 G.
        result = {"flops": k * G, "eval_loss": 1 + 10 / k, "training_iteration": k}
        decisions.append(sched.on_trial_result(ctl, trial, result))
        if decisions[-1] != TrialScheduler.CONTINUE:
            break
    assert decisions[-1] == TrialScheduler.STOP and len(decisions) == 10
    sched.on_trial_complete(ctl, trial, result)
    assert sched.policy.trials["a"].status == "stopped"


def test_results_without_the_time_attr_or_metric_are_ignored():
    sched = make(stop_rate=1.0)
    trial = fake_trial("a")
    ctl = FakeController([trial])
    sched.on_trial_add(ctl, trial)
    sched.choose_trial_to_run(ctl)
    assert sched.on_trial_result(ctl, trial, {"eval_loss": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(ctl, trial, {"flops": 5 * G}) == TrialScheduler.CONTINUE
    assert sched.policy.trials["a"].spent == 0


def test_admission_control_stops_pending_trials_the_cap_cannot_start():
    sched = make(cap=5 * G, grace=2 * G)
    trials = [fake_trial(t) for t in "abc"]
    ctl = FakeController(trials)
    for t in trials:
        sched.on_trial_add(ctl, t)
    a = sched.choose_trial_to_run(ctl)
    a.status = Trial.RUNNING
    b = sched.choose_trial_to_run(ctl)
    assert (a.trial_id, b.trial_id) == ("a", "b")
    b.status = Trial.RUNNING
    assert sched.choose_trial_to_run(ctl) is None  # 1 G left < 2 G grace; others still run
    assert ctl.stop_requests == []
    for t in (a, b):
        sched.on_trial_result(ctl, t, {"flops": 2 * G, "eval_loss": 2.0})
        sched.on_trial_complete(ctl, t, {"flops": 2 * G, "eval_loss": 2.0})
        t.status = Trial.TERMINATED
    # 4 G spent, 1 G left: "c" can never finish its grace period, so it is stopped, once.
    assert sched.choose_trial_to_run(ctl) is None and sched.choose_trial_to_run(ctl) is None
    assert ctl.stop_requests == ["c"]


def slow_curve(c):  # the best trial of the pause scenario
    return 0.5 + (c / G) ** -0.2


def worse_curve(c):
    return 1.5 + (c / G) ** -0.5


def pause_scenario(pausable: bool):
    """Two trials started and reported twice, a third pending: the best ("slow") is later paused or kept."""
    sched = make(cap=1e5 * G, grace=3 * G, initial_trials=2, max_trial_flops=200 * G, pausable=pausable)
    trials = [fake_trial(t) for t in ("slow", "worse", "new")]
    ctl = FakeController(trials)
    for t in trials:
        sched.on_trial_add(ctl, t)
    for t, curve in zip(trials[:2], (slow_curve, worse_curve)):
        assert sched.choose_trial_to_run(ctl) is t
        t.status = Trial.RUNNING
        for k in (1, 2):
            sched.on_trial_result(ctl, t, {"flops": k * G, "eval_loss": curve(k * G), "final": False})
    return sched, trials, ctl


def lockstep_until_pause(index, curve):
    """The same reports to a pausable and a non-pausable scheduler, up to the pausable one's PAUSE."""
    (paus, trials_p, ctl_p), (stop, trials_s, ctl_s) = pause_scenario(True), pause_scenario(False)
    for k in range(3, 60):
        result = {"flops": k * G, "eval_loss": curve(k * G)}
        p = paus.on_trial_result(ctl_p, trials_p[index], dict(result))
        s = stop.on_trial_result(ctl_s, trials_s[index], dict(result))
        if p == TrialScheduler.PAUSE:
            return s, stop.policy.trials[trials_s[index].trial_id]
        assert p == s == TrialScheduler.CONTINUE, k  # identical until the pause
    raise AssertionError("the setup never reaches a pause")


def test_pause_becomes_stop_unless_the_trainable_can_resume():
    # A challenger ("worse") at the report where a pausable scheduler pauses it: without resumable
    # trials the same decision is a STOP, and the trial is over.
    decision, state = lockstep_until_pause(1, worse_curve)
    assert decision == TrialScheduler.STOP and state.status == "stopped"
    # The best trial ("slow") at the report where a pausable scheduler pauses it: protected while it
    # still improves, so without pausing it keeps running rather than being stopped.
    decision, state = lockstep_until_pause(0, slow_curve)
    assert decision == TrialScheduler.CONTINUE and state.status == "running"


def test_a_trials_final_report_is_never_paused_and_ends_it():
    # The same situation as above where a pausable scheduler pauses the best trial, but the report
    # is the trainable's last (schedule done or cap refused): it carries no checkpoint, so a pause
    # there would resume from the report before and train the last chunk twice.
    sched, trials, ctl = pause_scenario(pausable=True)
    for k in range(3, 60):
        result = {"flops": k * G, "eval_loss": slow_curve(k * G), "final": False}
        probe = pickle.loads(pickle.dumps(sched))  # what the decision would be at a report that is not the last
        if probe.on_trial_result(ctl, trials[0], result) == TrialScheduler.PAUSE:
            break
        assert sched.on_trial_result(ctl, trials[0], result) == TrialScheduler.CONTINUE
    else:
        raise AssertionError("the setup never reaches a pause")
    assert sched.on_trial_result(ctl, trials[0], {**result, "final": True}) == TrialScheduler.CONTINUE
    assert sched.policy.trials["slow"].status == "done"
    # ... so it is never offered to run again.
    trials[0].status = Trial.PAUSED
    assert sched.choose_trial_to_run(ctl) is not trials[0]


def test_missing_metric_or_mode_is_refused_when_trials_arrive():
    sched = MarginalGainScheduler(flop_cap=10 * G, grace_flops=G)
    with pytest.raises(ValueError, match="metric and mode"):
        sched.on_trial_add(FakeController([]), fake_trial("a"))
    with pytest.raises(ValueError, match="grace_flops"):
        MarginalGainScheduler(flop_cap=G, grace_flops=2 * G)


def test_sweep_config_scheduler_field_defaults_to_fifo_and_rejects_unknown_names():
    from frugalray.tune.sweep import SweepConfig

    base = {"finetune": {"data_path": "x.jsonl"}, "flop_cap": 1e12}
    cfg = parse_config(SweepConfig, base)
    assert cfg.scheduler == "fifo" and cfg.stop_rate == "auto" and cfg.grace_period_flops is None
    assert parse_config(SweepConfig, {**base, "scheduler": "marginal", "stop_rate": 1e-12}).stop_rate == 1e-12
    with pytest.raises(ConfigError, match="scheduler"):
        parse_config(SweepConfig, {**base, "scheduler": "hyperband"})
    with pytest.raises(ConfigError, match="stop_rate"):
        parse_config(SweepConfig, {**base, "stop_rate": -1})
    with pytest.raises(ConfigError, match="mode"):
        parse_config(SweepConfig, {**base, "mode": "maximize"})


def test_fit_stopper_ends_the_sweep_once_no_option_is_predicted_to_gain(tmp_path):
    from frugalray.tune.scheduler import FitStopper

    note = tmp_path / "why.txt"
    stopper = FitStopper(0.01, "eval_loss", "min", flop_cap=1e3 * G, max_trial_flops=10 * G, total_trials=2,
                         max_steps=10, note_path=str(note))
    for tid, floor in (("a", 1.0), ("b", 1.4)):
        for k in range(1, 11):  # both curves flat at their floor; the second trial's last report ends it
            result = {"flops": k * G, "eval_loss": floor + 1e-5 / k, "sweep_flops": k * G, "step": k}
            assert stopper(tid, result) is False  # per-trial stopping is not this stopper's job
    assert stopper.stop_all()
    assert "threshold" in note.read_text() or "no option" in note.read_text()
    steep = FitStopper(0.01, "eval_loss", "min", 1e3 * G, 100 * G, total_trials=3, max_steps=100)
    for k in range(1, 9):
        steep("a", {"flops": k * G, "eval_loss": 1 + 3 * k**-0.7, "sweep_flops": k * G, "step": k})
        steep("b", {"flops": k * G, "eval_loss": 2 + 3 * k**-0.7, "sweep_flops": 8 * G + k * G, "step": k})
    assert not steep.stop_all()


def test_max_running_counts_running_and_pending_trials_not_paused_ones():
    from frugalray.tune.scheduler import GatedVariantGenerator

    sched = make(cap=1e5 * G, grace=3 * G, pausable=True, max_running=1)
    trials = [fake_trial(t) for t in ("a", "b", "c")]
    ctl = FakeController(trials[:1])
    gen = GatedVariantGenerator(sched)
    assert not sched.at_capacity()  # no controller seen yet: the first trial is created
    sched.on_trial_add(ctl, trials[0])
    assert sched.at_capacity() and gen.next_trial() is None  # "a" is pending: no second trial yet
    trials[0].status = Trial.RUNNING
    assert sched.at_capacity()
    trials[0].status = Trial.PAUSED  # a paused trial frees its slot: the next config may start
    assert not sched.at_capacity()
    ctl.trials = trials
    for t in trials[1:]:
        sched.on_trial_add(ctl, t)
    trials[1].status = Trial.RUNNING
    assert sched.choose_trial_to_run(ctl) is None  # "a" waits while "b" runs
    # The generator's saved state leaves the live scheduler out, and a restore keeps it.
    state = gen.get_state()
    assert state is False or "_gate" not in state
    if state:
        gen.set_state(state)
        assert gen._gate is sched
    assert pickle.loads(pickle.dumps(sched))._controller is None


def test_a_config_not_created_yet_is_an_option_the_running_trial_is_paused_for():
    from frugalray.tune.scheduler import NEXT_CONFIG

    sched = make(cap=1e5 * G, grace=3 * G, pausable=True, max_running=1, max_trial_flops=200 * G)
    trial = fake_trial("a")
    ctl = FakeController([trial])
    sched.configs_waiting(True)  # the generator holds more configs
    assert sched.wants_new_config()
    sched.on_trial_add(ctl, trial)
    assert not sched.wants_new_config()  # "a" is pending: its slot is taken
    trial.status = Trial.RUNNING
    decisions = [sched.on_trial_result(ctl, trial, {"flops": k * G, "eval_loss": 0.5 + k ** -0.3}) for k in range(1, 8)]
    # Alone, an improving trial would run on; with an untried config waiting it is paused after its grace.
    assert TrialScheduler.PAUSE in decisions
    assert decisions[:3] == [TrialScheduler.CONTINUE] * 3
    trial.status = Trial.PAUSED
    assert sched.wants_new_config() and sched.choose_trial_to_run(ctl) is None  # the new config goes first
    sched.configs_waiting(False)  # every config created: the placeholder is gone ...
    assert sched.policy.trials[NEXT_CONFIG].status == "done"
    assert sched.choose_trial_to_run(ctl) is trial  # ... and the paused trial is resumed
