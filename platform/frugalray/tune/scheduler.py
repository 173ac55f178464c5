"""`MarginalGainScheduler`: Ray Tune's scheduler interface over the pure `MarginalGainPolicy`.

    scheduler = MarginalGainScheduler(flop_cap=6e12, grace_flops=1.5e12, max_trial_flops=3e12)
    tune.Tuner(trainable, tune_config=tune.TuneConfig(metric="eval_loss", mode="min", scheduler=scheduler))

FLOPs are the time axis: each result must carry the trial's cumulative FLOPs under
`time_attr` (default "flops", what `sweep_trial` reports). The hard cap is held by the
trials' SweepFlopBudget reservations; the scheduler mirrors the spend to decide:

- on_trial_result -> CONTINUE / STOP, and PAUSE when `pausable`, i.e. the trainable reports a
  checkpoint with each result (`sweep_trial` does when the sweep's `pause_trials` is on; Tune
  keeps the paused trial's last checkpoint and resumes from it); otherwise a pause becomes a stop;
- choose_trial_to_run -> at most `max_running` trials at once (paused ones do not count), and
  admission control: a pending trial starts only while the budget
  pays for its grace period; when nothing runs and no pending trial is admissible or worth
  starting, the pending trials are stopped so that the sweep ends instead of waiting.

This module imports Ray (the base class) at import time; the control logic itself is in
`frugalray.tune.marginal` and is unit-tested without Ray.
"""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING, Literal

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.stopper import Stopper

from frugalray.tune.marginal import Decision, MarginalGainPolicy, MarginalGainSettings
from frugalray.tune.scaling import SweepStopRule

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

log = logging.getLogger(__name__)


NEXT_CONFIG = "__next_config__"  # the policy's stand-in for configs the generator has not created


class MarginalGainScheduler(TrialScheduler):
    def __init__(
        self,
        flop_cap: float,
        grace_flops: float,
        max_trial_flops: float | None = None,
        stop_rate: float | Literal["auto"] = "auto",
        time_attr: str = "flops",
        final_attr: str = "final",
        metric: str | None = None,
        mode: Literal["min", "max"] | None = None,
        pausable: bool = False,
        max_running: int | None = None,
        **policy_options,
    ):
        super().__init__()
        self._time_attr = time_attr
        self._final_attr = final_attr
        self._max_running = max_running
        self._controller: TuneController | None = None  # the live controller (not pickled)
        self.sweep_over = False  # set once nothing is left worth starting: the generator stops too
        self._metric = metric
        self._mode = mode
        self._settings_kwargs = dict(
            flop_cap=flop_cap, grace_flops=grace_flops, max_trial_flops=max_trial_flops,
            stop_rate=stop_rate, pausable=pausable, **policy_options,
        )
        # Fail at construction on bad numbers (cap < grace, ...), not at the first trial.
        MarginalGainSettings(**self._settings_kwargs, mode=mode or "min")
        self.policy: MarginalGainPolicy | None = None
        self._stop_requested: set[str] = set()
        self._num_stopped = 0

    # -- Tune wiring -------------------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def _ensure_policy(self) -> MarginalGainPolicy:
        if self.policy is None:
            if not self._metric or self._mode not in ("min", "max"):
                raise ValueError(
                    f"MarginalGainScheduler needs metric and mode ('min' or 'max'); got metric={self._metric!r}, "
                    f"mode={self._mode!r}: pass them to tune.TuneConfig or to the scheduler"
                )
            self.policy = MarginalGainPolicy(MarginalGainSettings(**self._settings_kwargs, mode=self._mode))
        return self.policy

    # -- configs not created yet (GatedVariantGenerator) -------------------------------------------
    def configs_waiting(self, waiting: bool) -> None:
        """Whether the generator still holds configs it has not created: the policy sees them as one
        pending option (`NEXT_CONFIG`), so a trial is paused for an untried config it cannot see yet."""
        policy = self._ensure_policy()
        if waiting and NEXT_CONFIG not in policy.trials:
            policy.trial_added(NEXT_CONFIG)
        elif not waiting and NEXT_CONFIG in policy.trials:
            policy.trial_finished(NEXT_CONFIG, "every config created" if not self.sweep_over else "sweep over")

    def end_sweep(self) -> None:
        """Nothing left is worth starting: no new config is created, and the policy stops waiting for one."""
        self.sweep_over = True
        self.configs_waiting(False)

    def wants_new_config(self) -> bool:
        """A slot is free and the policy's best option is a config not created yet."""
        if self.sweep_over or self.at_capacity():
            return False
        policy = self._ensure_policy()
        if self._controller is None or NEXT_CONFIG not in policy.trials:
            return True
        return policy.choose_next() == NEXT_CONFIG

    def anything_live(self) -> bool:
        return self._controller is not None and any(
            t.status in (Trial.RUNNING, Trial.PENDING, Trial.PAUSED) for t in self._controller.get_trials())

    def at_capacity(self) -> bool:
        """`max_running` trials are running or about to (pending); paused trials do not count."""
        if self._max_running is None or self._controller is None:
            return False
        live = sum(1 for t in self._controller.get_trials() if t.status in (Trial.RUNNING, Trial.PENDING))
        return live >= self._max_running

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        self._controller = tune_controller
        policy = self._ensure_policy()
        if trial.trial_id in policy.trials:  # a restored experiment re-adds what we already know
            return
        policy.trial_added(trial.trial_id)
        # Restored after a killed driver (Tuner.restore): a finished trial's spend and curve come
        # from its last result, so admission and lambda see what the sweep already bought.
        last = getattr(trial, "last_result", None) or {}
        if getattr(trial, "status", None) == Trial.TERMINATED and self._time_attr in last:
            if self._metric in last:
                policy.trial_result(trial.trial_id, float(last[self._time_attr]), last[self._metric])
            policy.trial_finished(trial.trial_id, "restored")

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        policy = self._ensure_policy()
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        if trial.trial_id not in policy.trials:
            policy.trial_added(trial.trial_id)
        state = policy.trials[trial.trial_id]
        if state.status in ("stopped", "done"):  # restarted after a restore: follow the new attempt
            return TrialScheduler.CONTINUE
        flops = max(float(result[self._time_attr]), state.spent)  # restored trials may repeat a result
        decision = policy.trial_result(trial.trial_id, flops, result[self._metric])
        if result.get(self._final_attr):
            # The trainable's last report: it ends by itself. Pausing here would resume it from its
            # previous checkpoint and recompute the last chunk (a report carries no checkpoint once
            # the schedule or the cap is done).
            policy.trial_finished(trial.trial_id, "final report")
            return TrialScheduler.CONTINUE
        if decision == Decision.CONTINUE:
            return TrialScheduler.CONTINUE
        if decision == Decision.PAUSE and policy.s.pausable:
            return TrialScheduler.PAUSE
        self._num_stopped += 1
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: TuneController, trial: Trial, result: dict) -> None:
        policy = self._ensure_policy()
        if result and self._time_attr in result and self._metric in result:
            state = policy.trials[trial.trial_id]
            flops = float(result[self._time_attr])
            if flops > state.spent:  # a last result Tune did not pass to on_trial_result
                state.spent = state.requested = flops
                state.granted = max(state.granted, flops)
        policy.trial_finished(trial.trial_id, "completed")

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        self._ensure_policy().trial_finished(trial.trial_id, "error")

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._ensure_policy().trial_finished(trial.trial_id, "removed")

    def choose_trial_to_run(self, tune_controller: TuneController) -> Trial | None:
        self._controller = tune_controller
        policy = self._ensure_policy()
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        # Admitted in an earlier call but not started yet: offer it again (must be idempotent).
        for tid, trial in trials.items():
            if trial.status == Trial.PENDING and tid in policy.trials and policy.trials[tid].status == "running":
                return trial
        if self.at_capacity():  # resume a paused trial only into a free slot
            return None
        chosen = policy.choose_next()
        if chosen == NEXT_CONFIG:
            return None  # the generator creates it (GatedVariantGenerator.next_trial asks the same question)
        if chosen is not None and chosen in trials:
            state = policy.trials[chosen]
            if state.status == "pending" and policy.admit(chosen):
                return trials[chosen]
            if state.status == "paused" and trials[chosen].status == Trial.PAUSED:
                policy.trial_resumed(chosen)
                return trials[chosen]
        running = any(t.status == Trial.RUNNING for t in trials.values())
        if not running:
            # Nothing runs and nothing left is worth (or affordable) starting: end the sweep.
            if NEXT_CONFIG in policy.trials:
                self.end_sweep()
            for tid, trial in trials.items():
                if trial.status in (Trial.PENDING, Trial.PAUSED) and tid not in self._stop_requested:
                    self._stop_requested.add(tid)
                    reason = "budget below grace period" if not policy.can_admit() else "predicted gain below lambda"
                    log.info("not starting trial %s: %s", tid, reason)
                    tune_controller.request_stop_trial(trial)
        return None

    def debug_string(self) -> str:
        if self.policy is None:
            return "Using MarginalGainScheduler (no trials yet)."
        p = self.policy
        return (
            f"Using MarginalGainScheduler: {p.spent:.3g} of {p.s.flop_cap:.3g} FLOPs spent, "
            f"{self._num_stopped} trials stopped early"
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_controller": None}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__getstate__(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class GatedVariantGenerator(BasicVariantGenerator):
    """Tune's grid/random generator, holding back new trials while `gate` (the scheduler) is at capacity.

    Tune's `max_concurrent_trials` counts paused trials as live, so with one slot a paused trial
    would only ever be resumed, never joined by the next config; and Tune starts every pending
    trial it has resources for, whatever the scheduler prefers. Creating a trial only when a slot
    is free keeps `max_running` trials at once while paused ones wait.
    """

    def __init__(self, gate: MarginalGainScheduler, **kwargs):
        super().__init__(**kwargs)
        self._gate = gate
        self._created = 0

    def next_trial(self):
        if self._gate.sweep_over or (self.total_samples and self._created >= self.total_samples):
            # Every config created, or the scheduler ended the sweep: Tune must not wait for more.
            self.set_finished()
        self._gate.configs_waiting(not self.is_finished())
        if self.is_finished():
            return None
        if not self._gate.wants_new_config():
            if not self._gate.anything_live():
                # Nothing runs, waits or is paused and no new config is worth its grace period: the sweep
                # is over. (Tune blocks on this generator, up to 10 minutes, when no trial is live.)
                self._gate.end_sweep()
                self.set_finished()
            return None
        trial = super().next_trial()
        if trial is not None:
            self._created += 1
        self._gate.configs_waiting(not self.is_finished() and self._created < self.total_samples)
        return trial

    # The gate is the live scheduler: never saved with the generator's state, never replaced by a copy.
    def get_state(self):
        state = super().get_state()
        if state:
            state.pop("_gate", None)
        return state

    def set_state(self, state):
        gate = self._gate
        super().set_state(state)
        self._gate = gate


class FitStopper(Stopper):
    """A Tune Stopper around `SweepStopRule`: ends the whole sweep when the fits say nothing is left to gain.

    Per-trial stopping stays with the scheduler and the budget; this only answers `stop_all`.
    Results must carry `flops`, the metric, `sweep_flops` (the sweep's total spend) and
    `step`/`stopped_by_cap` (to tell a trial's last report).
    """

    def __init__(self, threshold: float, metric: str, mode: str, flop_cap: float, max_trial_flops: float,
                 total_trials: int, max_steps: int, note_path: str | None = None, **rule_options):
        self.rule = SweepStopRule(threshold, mode, flop_cap, max_trial_flops, total_trials, **rule_options)
        self.metric, self.max_steps, self.note_path = metric, max_steps, note_path
        self.stopped = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        done = bool(result.get("stopped_by_cap")) or int(result.get("step", 0)) >= self.max_steps
        self.rule.observe(trial_id, float(result.get("flops", 0.0)), result.get(self.metric),
                          result.get("sweep_flops"), done=done)
        return False

    def stop_all(self) -> bool:
        if not self.stopped and self.rule.should_stop():
            self.stopped = True
            log.info("ending the sweep: %s", self.rule.why)
            if self.note_path:
                with open(self.note_path, "w") as fh:
                    fh.write(self.rule.why + "\n")
        return self.stopped
