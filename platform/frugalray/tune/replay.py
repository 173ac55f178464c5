"""Replay learning curves under FIFO, ASHA (FLOPs as time) and the marginal-gain policy.

A pure simulation (no Ray, no training): each config of a search space is a learning curve
in FLOPs, observed with seeded noise at every report. Methods see only the noisy reports,
spend FLOPs chunk by chunk from one capped pot (each chunk is reserved before it runs), and
run up to `workers` trials at once. Because a curve is a function of FLOPs, a paused trial
resumes exactly where it stopped, so many seeds are cheap and deterministic.

Two kinds of curves:
- *synthetic* (`synthetic_space`): power laws with a floor whose speed and floor depend on
  the learning rate the way LoRA fine-tunes typically do (too low: slow; too high: fast
  start, worse floor), plus Gaussian eval noise and rare spikes;
- *recorded* (`recorded_space`): eval-loss curves measured by real sweeps of the project's
  own LoRA fine-tunes on the default model (bench/results/recorded_curves.json). The
  recorded value at a report is the truth of that checkpoint; each seed reorders the
  configs and adds eval noise of the size measured in the recordings (different eval
  draws), so repetitions differ while staying anchored to real curves.

Methods: FIFO, random search (FIFO over configs drawn with replacement), Tune's
TrialPlateauStopper rule (per trial: stop once the last `num_results` metrics have a
std below `std`, after `grace_period` results), ASHA with FLOPs as time, and the
marginal-gain policy.

Quality of a method at a moment = the TRUE loss of the trial it would report as best
(the best last observed metric, as Tune's best result with scope "last").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from frugalray.tune.marginal import Decision, MarginalGainPolicy, MarginalGainSettings, fit_learning_curve


@dataclass(frozen=True)
class Curve:
    """One config's learning curve: true loss after c FLOPs, observed with noise."""

    config: dict
    floor: float
    scale: float
    c0: float
    b: float

    def true_loss(self, c: float) -> float:
        return self.floor + self.scale * (1.0 + c / self.c0) ** -self.b


@dataclass(frozen=True)
class RecordedCurve:
    """A measured learning curve: loss after each report, reports `chunk_flops` apart (linear in between)."""

    config: dict
    losses: tuple[float, ...]
    chunk_flops: float

    def true_loss(self, c: float) -> float:
        k = c / self.chunk_flops  # reports done (fractional)
        if k <= 1:
            return float(self.losses[0])
        if k >= len(self.losses):
            return float(self.losses[-1])
        i = math.floor(k)
        frac = k - i
        return float(self.losses[i - 1] * (1 - frac) + self.losses[i] * frac)


@dataclass(frozen=True)
class SearchSpace:
    curves: list
    max_trial_flops: float  # R: one trial's full schedule
    chunk_flops: float  # FLOPs between two reports
    noise: float
    spike_prob: float
    spike_size: float

    def best_final(self) -> float:
        return min(c.true_loss(self.max_trial_flops) for c in self.curves)


def synthetic_space(n_configs: int, seed: int, reports_per_trial: int = 64,
                    max_trial_flops: float = 8e13, noise: float = 0.01) -> SearchSpace:
    """Learning rate x LoRA rank configs with realistic, crossing curves (seeded)."""
    rng = np.random.default_rng(seed)
    ranks = [4, 8, 16]
    lrs = np.geomspace(1e-5, 1e-2, max(1, math.ceil(n_configs / len(ranks))))
    best_lr = 10 ** rng.uniform(-3.5, -2.7)
    curves = []
    for lr in lrs:
        for rank in ranks:
            if len(curves) == n_configs:
                break
            dist = math.log10(lr / best_lr)
            curves.append(Curve(
                config={"learning_rate": float(lr), "lora_rank": rank},
                floor=0.9 + 0.12 * dist**2 + 0.02 * math.log2(16 / rank) + rng.normal(0, 0.01),
                scale=1.6 + rng.normal(0, 0.05),
                c0=max_trial_flops * 0.03 * (best_lr / lr) ** 0.8,  # low lr: slow start
                b=0.6 + 0.3 * rng.uniform(),
            ))
    order = rng.permutation(len(curves))  # the order trials are proposed in
    return SearchSpace([curves[i] for i in order], max_trial_flops, max_trial_flops / reports_per_trial,
                       noise, spike_prob=0.03, spike_size=0.1)


def recorded_noise(curves: list[dict]) -> float:
    """Eval noise of recorded curves: the median over curves of the robust residual scale of each curve's fit."""
    scales = []
    for c in curves:
        y = np.asarray(c["losses"], dtype=float)
        if y.size >= 4:
            scales.append(fit_learning_curve(np.arange(1, y.size + 1, dtype=float), y).noise)
    return float(np.median(scales)) if scales else 0.0


def recorded_space(recording: dict, seed: int, noise: float | None = None) -> SearchSpace:
    """A SearchSpace of recorded curves (the JSON `bench/tune_compare.py --record` writes), reordered by `seed`.

    Every config's curve is cut to the shortest recording so all trials share one schedule R.
    """
    curves = recording["curves"]
    n_reports = min(len(c["losses"]) for c in curves)
    chunk = float(np.mean([np.mean(np.diff([0.0, *c["flops"][:n_reports]])) for c in curves]))
    built = [RecordedCurve(dict(c["config"]), tuple(float(v) for v in c["losses"][:n_reports]), chunk) for c in curves]
    order = np.random.default_rng(seed).permutation(len(built))
    sd = recorded_noise(curves) if noise is None else noise
    return SearchSpace([built[i] for i in order], chunk * n_reports, chunk, sd, spike_prob=0.0, spike_size=0.0)


# -- methods ---------------------------------------------------------------------------------------


class Method:
    """What a scheduler decides in the replay loop."""

    name = "base"

    def start(self, space: SearchSpace, cap: float) -> None:
        self.space, self.cap = space, cap
        self.next_new = 0
        self.spent = 0.0

    def next_trial(self) -> int | None:
        """A config index to start or resume, or None."""
        if self.next_new < len(self.space.curves) and self.cap - self.spent >= self.space.chunk_flops:
            self.next_new += 1
            return self.next_new - 1
        return None

    def reserve(self, i: int) -> bool:
        if self.spent + self.space.chunk_flops > self.cap:
            return False
        self.spent += self.space.chunk_flops
        return True

    def result(self, i: int, flops: float, loss: float) -> Decision:
        return Decision.STOP if flops >= self.space.max_trial_flops else Decision.CONTINUE

    def finished(self, i: int) -> None:
        pass


class Fifo(Method):
    name = "fifo"


class RandomSearch(Method):
    """Random search: `n_samples` configs drawn with replacement (seeded), each trained to its full budget."""

    name = "random"

    def __init__(self, seed: int, n_samples: int | None = None):
        self.seed, self.n_samples = seed, n_samples

    def start(self, space, cap):
        super().start(space, cap)
        n = self.n_samples or len(space.curves)
        self.draws = [int(i) for i in np.random.default_rng(self.seed + 104729).integers(0, len(space.curves), n)]
        self.slot_config: dict[int, int] = {}

    def next_trial(self):
        if self.next_new < len(self.draws) and self.cap - self.spent >= self.space.chunk_flops:
            self.next_new += 1
            return self.next_new - 1  # a slot: replay() maps it to its drawn config
        return None


class Plateau(Method):
    """FIFO order with ray.tune.stopper.TrialPlateauStopper's rule (its defaults: std 0.01, 4 results, grace 4)."""

    name = "plateau"

    def __init__(self, std: float = 0.01, num_results: int = 4, grace_period: int = 4):
        self.std, self.num_results, self.grace = std, num_results, grace_period

    def start(self, space, cap):
        super().start(space, cap)
        self.history: dict[int, list[float]] = {}

    def result(self, i, flops, loss):
        if flops >= self.space.max_trial_flops:
            return Decision.STOP
        h = self.history.setdefault(i, [])
        h.append(loss)
        if len(h) < self.grace or len(h) < self.num_results:
            return Decision.CONTINUE
        return Decision.STOP if float(np.std(h[-self.num_results:])) < self.std else Decision.CONTINUE


class Asha(Method):
    """Asynchronous successive halving with FLOPs as time, the rule of Ray's ASHAScheduler bracket."""

    name = "asha"

    def __init__(self, grace_flops: float, reduction_factor: float = 3.0):
        self.grace, self.rf = grace_flops, reduction_factor

    def start(self, space, cap):
        super().start(space, cap)
        rungs = int(math.log(space.max_trial_flops / self.grace) / math.log(self.rf) + 1)
        self.milestones = [self.grace * self.rf**k for k in reversed(range(rungs))]
        self.recorded: dict[float, dict[int, float]] = {m: {} for m in self.milestones}

    def result(self, i, flops, loss):
        if flops >= self.space.max_trial_flops:
            return Decision.STOP
        for m in self.milestones:  # descending, like Ray's bracket
            if flops < m or i in self.recorded[m]:
                continue
            seen = list(self.recorded[m].values())
            # Ray keeps the top 1/rf by reward (-loss): stop when loss is above this percentile.
            stop = bool(seen) and loss > np.nanpercentile(seen, 100 / self.rf)
            self.recorded[m][i] = loss
            return Decision.STOP if stop else Decision.CONTINUE
        return Decision.CONTINUE


class Marginal(Method):
    name = "marginal"

    def __init__(self, grace_flops: float, pausable: bool = True, **options):
        self.grace, self.pausable, self.options = grace_flops, pausable, options

    def start(self, space, cap):
        super().start(space, cap)
        self.policy = MarginalGainPolicy(MarginalGainSettings(
            flop_cap=cap, grace_flops=self.grace, max_trial_flops=space.max_trial_flops,
            pausable=self.pausable, **self.options))
        for i in range(len(space.curves)):
            self.policy.trial_added(str(i))

    def next_trial(self):
        chosen = self.policy.choose_next()
        if chosen is None:
            return None
        state = self.policy.trials[chosen]
        if state.status == "pending":
            if not self.policy.admit(chosen):
                return None
        else:
            self.policy.trial_resumed(chosen)
        return int(chosen)

    def reserve(self, i):
        return self.policy.request(str(i), self.space.chunk_flops)

    def result(self, i, flops, loss):
        return self.policy.trial_result(str(i), flops, loss)

    def finished(self, i):
        self.policy.trial_finished(str(i), "cap")


# -- the replay loop -------------------------------------------------------------------------------


@dataclass
class ReplayRun:
    method: str
    cap: float
    spent: float
    trace: list[tuple[float, float]] = field(default_factory=list)  # (cumulative FLOPs, true loss of best)
    trials_started: int = 0
    final_true: float = math.inf

    def flops_to_reach(self, target: float) -> float:
        """Cumulative FLOPs when the reported best first got within target (inf: never)."""
        return next((c for c, v in self.trace if v <= target), math.inf)


def replay(space: SearchSpace, method: Method, cap: float, seed: int, workers: int = 4,
           stop_at_loss: float | None = None) -> ReplayRun:
    """Run `method` on `space` until it ends or the cap refuses every chunk.

    `stop_at_loss`: end as soon as the reported best's true loss reaches it (what happens
    after does not change "FLOPs to reach it", and skipping it saves time).
    """
    rng = np.random.default_rng(seed + 7919)
    method.start(space, cap)
    # A trial slot -> the config it trains (random search draws configs with replacement).
    config_of = getattr(method, "draws", None) or list(range(len(space.curves)))
    flops = [0.0] * len(config_of)
    last_seen: dict[int, float] = {}
    running: list[int] = []
    run = ReplayRun(method.name, cap, 0.0)
    total = 0.0

    def fill():
        while len(running) < workers:
            i = method.next_trial()
            if i is None:
                return
            if flops[i] == 0:
                run.trials_started += 1
            running.append(i)

    fill()
    reached = False
    while running and not reached:
        for i in list(running):
            if not method.reserve(i):  # the cap refuses the next chunk: this trial ends
                running.remove(i)
                method.finished(i)
                continue
            flops[i] += space.chunk_flops
            total += space.chunk_flops
            curve = space.curves[config_of[i]]
            observed = curve.true_loss(flops[i]) + rng.normal(0, space.noise)
            if rng.uniform() < space.spike_prob:
                observed += space.spike_size
            last_seen[i] = observed
            best = min(last_seen, key=last_seen.get)
            run.trace.append((total, space.curves[config_of[best]].true_loss(flops[best])))
            if method.result(i, flops[i], observed) != Decision.CONTINUE:
                running.remove(i)
            if stop_at_loss is not None and run.trace[-1][1] <= stop_at_loss:
                reached = True
                break
        if not reached:
            fill()
    if total > cap * (1 + 1e-12):
        raise AssertionError(f"{method.name} spent {total:.4g} > cap {cap:.4g}")  # never hidden
    run.spent = total
    run.final_true = run.trace[-1][1] if run.trace else math.inf
    return run


def oracle_flops_to_reach(space: SearchSpace, target: float) -> float:
    """FLOPs an oracle that knows the curves needs to get a trial within `target`: the fewest
    chunks any one config needs (inf if none ever does). A lower bound for every method."""
    n_chunks = round(space.max_trial_flops / space.chunk_flops)
    best = math.inf
    for curve in space.curves:
        for k in range(1, n_chunks + 1):
            if curve.true_loss(k * space.chunk_flops) <= target:
                best = min(best, k * space.chunk_flops)
                break
    return best


def grace_flops(space: SearchSpace) -> float:
    """The grace period ASHA and marginal get: R/16, but never under two reports (one noisy eval decides nothing)."""
    return max(space.max_trial_flops / 16, 2 * space.chunk_flops)


METHODS: dict[str, Callable[..., Method]] = {
    "fifo": lambda s, seed=0: Fifo(),
    "random": lambda s, seed=0: RandomSearch(seed),
    "plateau": lambda s, seed=0: Plateau(),
    "asha": lambda s, seed=0: Asha(grace_flops=grace_flops(s)),
    "marginal": lambda s, seed=0: Marginal(grace_flops=grace_flops(s), pausable=True),
    "marginal_nopause": lambda s, seed=0: Marginal(grace_flops=grace_flops(s), pausable=False),
}
