"""Scaling-law fits across a sweep's trials, the compute-optimal token count, and a fit-based stop rule.

Pure numpy (no Ray, no scipy):

- `fit_scaling(points, ...)`: the compute frontier of a sweep (the best loss any trial had
  reached after c FLOPs of its own training) fitted as L(C) = E + A * (C / C_ref)^-alpha, and
  the same against training tokens; parameters and fit error (RMSE, relative RMSE).
- compute-optimal training tokens for the fixed model: with F FLOPs per training token
  (`frugalray.budget.flops.train_flops_per_token`, the project's C = 6ND-style accounting),
  the tokens D = C / F at which (a) the predicted remaining gain falls within `tolerance` of
  the fitted floor, and (b) with a rate lambda, the gain per FLOP -dL/dC falls to lambda.
  Chinchilla's 20 tokens per parameter is given as a reference only: it is a pre-training
  rule, not one for a LoRA fine-tune.
- `fit_chinchilla` / `chinchilla_split`: L(N, D) = E + A/N^alpha + B/D^beta from several
  model sizes, and the compute-optimal N/D split under C = k N D. A sweep's search space
  cannot vary the model (one model per sweep), so the sweep report says the split does
  not apply; the math is unit-tested on synthetic data.
- `SweepStopRule`: stop the whole sweep once the predicted gain of every remaining option
  (continuing a live trial to the end of its schedule, or starting a new configuration)
  is below a threshold in metric units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from frugalray.tune.marginal import CurveFit, fit_learning_curve, fit_power_curve

CHINCHILLA_TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = floor + a * (x / x_ref)^-alpha, with its error on the points it was fitted to."""

    axis: str  # "flops" or "tokens"
    a: float
    alpha: float
    floor: float
    x_ref: float
    n: int
    rmse: float
    rel_rmse: float  # rmse / mean |loss|

    def predict(self, x):
        return self.floor + self.a * np.power(np.asarray(x, dtype=float) / self.x_ref, -self.alpha)

    def x_within(self, tolerance: float) -> float:
        """x where the predicted remaining gain a*(x/x_ref)^-alpha is `tolerance` x |floor|."""
        gap = tolerance * max(abs(self.floor), 1e-12)
        return self.x_ref * (self.a / gap) ** (1.0 / self.alpha)

    def x_at_rate(self, rate: float) -> float:
        """x where the gain per unit of x, -dL/dx = alpha*a/x_ref*(x/x_ref)^-(alpha+1), equals `rate`."""
        return self.x_ref * (self.alpha * self.a / (self.x_ref * rate)) ** (1.0 / (self.alpha + 1.0))

    def as_dict(self) -> dict:
        return {"axis": self.axis, "form": f"L = E + A * ({self.axis} / x_ref)^-alpha", "E": self.floor,
                "A": self.a, "alpha": self.alpha, "x_ref": self.x_ref, "points": self.n,
                "rmse": self.rmse, "rel_rmse": self.rel_rmse}


def frontier(x, loss) -> tuple[np.ndarray, np.ndarray]:
    """The record-setting points: sorted by x, those whose loss beats every point with smaller x."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(x) & np.isfinite(loss) & (x > 0)
    x, loss = x[keep], loss[keep]
    order = np.lexsort((loss, x))
    xs, ys, best = [], [], math.inf
    for i in order:
        if loss[i] < best:
            best = loss[i]
            xs.append(x[i])
            ys.append(loss[i])
    return np.array(xs), np.array(ys)


def fit_power_law(x, loss, axis: str = "flops") -> PowerLaw | None:
    """Robust fit of L = E + A (x/x_ref)^-alpha (None: fewer than 3 points or no improving fit)."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if x.size < 3:
        return None
    order = np.argsort(x)
    fit: CurveFit | None = fit_power_curve(x[order], loss[order])
    if fit is None:
        return None
    pred = fit.a * np.power(x / fit.c_ref, -fit.b) + fit.l_inf
    rmse = float(np.sqrt(np.mean((pred - loss) ** 2)))
    return PowerLaw(axis=axis, a=fit.a, alpha=fit.b, floor=fit.l_inf, x_ref=fit.c_ref, n=int(x.size),
                    rmse=rmse, rel_rmse=rmse / max(float(np.mean(np.abs(loss))), 1e-12))


def fit_scaling(
    points: list[tuple[float, float, float]],
    mode: Literal["min", "max"] = "min",
    flops_per_token: float | None = None,
    model_params: int | None = None,
    tolerance: float = 0.01,
    stop_rate: float | None = None,
    model_sizes: int = 1,
) -> dict:
    """Fit metric vs FLOPs and vs tokens over every trial's (flops, tokens, metric) reports.

    The fit is made on the frontier (the best metric reached at each compute level) when
    it has >= 4 points, else on every point. Metrics are turned into losses (negated for
    mode="max") and the parameters are reported in loss space.
    """
    sign = 1.0 if mode == "min" else -1.0
    arr = np.array([(f, t, sign * m) for f, t, m in points if m is not None and math.isfinite(m)], dtype=float)
    out: dict = {"mode": mode, "points": len(arr), "loss_space": "metric" if mode == "min" else "-metric"}
    if len(arr) == 0:
        out["note"] = "no finite metric reported; nothing to fit"
        return out
    for axis, col in (("flops", 0), ("tokens", 1)):
        fx, fy = frontier(arr[:, col], arr[:, 2])
        use_frontier = fx.size >= 4
        x, y = (fx, fy) if use_frontier else (arr[:, col], arr[:, 2])
        fit = fit_power_law(x, y, axis)
        out[f"vs_{axis}"] = None if fit is None else {**fit.as_dict(), "fitted_on": "frontier" if use_frontier else "all points"}
        out[f"_{axis}_fit"] = fit
    fit_c: PowerLaw | None = out.pop("_flops_fit")
    out.pop("_tokens_fit")
    optimal: dict = {}
    if flops_per_token:
        optimal["flops_per_token"] = flops_per_token
        if fit_c is not None:
            c_tol = fit_c.x_within(tolerance)
            optimal[f"tokens_within_{tolerance:g}_of_floor"] = c_tol / flops_per_token
            optimal[f"flops_within_{tolerance:g}_of_floor"] = c_tol
            if stop_rate:
                c_rate = fit_c.x_at_rate(stop_rate)
                optimal["tokens_at_stop_rate"] = c_rate / flops_per_token
                optimal["flops_at_stop_rate"] = c_rate
                optimal["stop_rate"] = stop_rate
    if model_params:
        optimal["chinchilla_reference_tokens"] = CHINCHILLA_TOKENS_PER_PARAM * model_params
        optimal["chinchilla_note"] = ("20 tokens per parameter is Chinchilla's pre-training rule for the whole "
                                      "model; a LoRA fine-tune is not that regime, shown for scale only")
    out["compute_optimal_tokens"] = optimal
    out["n_d_split"] = ("not applicable: the sweep trains one model size (the search space cannot vary the "
                        "model), so no N/D trade-off can be fitted; see fit_chinchilla for several sizes"
                        if model_sizes < 2 else "fit with fit_chinchilla over the model sizes searched")
    return out


# -- Chinchilla-style L(N, D) ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChinchillaFit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rmse: float

    def predict(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta


def _nonneg_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Least squares with every coefficient >= 0 (3 unknowns: try every active set)."""
    best, best_err = None, math.inf
    k = X.shape[1]
    for mask in range(1, 2**k):
        cols = [j for j in range(k) if mask >> j & 1]
        coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(k)
        full[cols] = coef
        err = float(np.sum((X @ full - y) ** 2))
        if err < best_err:
            best, best_err = full, err
    return best


def fit_chinchilla(n_params, tokens, loss) -> ChinchillaFit:
    """L = E + A N^-alpha + B D^-beta: a grid over (alpha, beta), linear in (E, A, B) for each; refined once."""
    n = np.asarray(n_params, dtype=float)
    d = np.asarray(tokens, dtype=float)
    y = np.asarray(loss, dtype=float)
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or y.size < 5:
        raise ValueError("fit_chinchilla: need >= 5 points over >= 2 model sizes and >= 2 token counts")
    # Normalised axes keep the least squares well conditioned.
    n0, d0 = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))

    def solve(alphas, betas):
        best = (math.inf, None)
        for a in alphas:
            xa = (n / n0) ** -a
            for b in betas:
                X = np.column_stack([np.ones_like(y), xa, (d / d0) ** -b])
                coef = _nonneg_lstsq(X, y)
                if coef is None:
                    continue
                err = float(np.mean((X @ coef - y) ** 2))
                if err < best[0]:
                    best = (err, (a, b, coef))
        return best

    grid = np.geomspace(0.05, 2.0, 40)
    err, found = solve(grid, grid)
    if found is None:
        raise ValueError("fit_chinchilla: no non-negative fit")
    ratio = grid[1] / grid[0]
    a0, b0, _ = found
    err2, found2 = solve(np.geomspace(a0 / ratio, a0 * ratio, 21), np.geomspace(b0 / ratio, b0 * ratio, 21))
    if found2 is not None and err2 <= err:
        err, found = err2, found2
    a, b, (E, A, B) = found
    return ChinchillaFit(E=float(E), A=float(A * n0**a), alpha=float(a), B=float(B * d0**b), beta=float(b),
                         rmse=float(math.sqrt(err)))


def chinchilla_split(fit: ChinchillaFit, compute: float, flops_per_param_token: float = 6.0) -> tuple[float, float]:
    """Compute-optimal (N, D) for C = k N D: minimise E + A N^-a + B D^-b on that curve (closed form)."""
    if compute <= 0 or flops_per_param_token <= 0:
        raise ValueError("chinchilla_split: compute and flops_per_param_token must be > 0")
    a, b = fit.alpha, fit.beta
    budget = compute / flops_per_param_token  # = N * D
    g = (a * fit.A / (b * fit.B)) ** (1.0 / (a + b))
    n_opt = g * budget ** (b / (a + b))
    return n_opt, budget / n_opt


# -- a sweep-level stopping rule from the fits -----------------------------------------------------


@dataclass
class _Trial:
    flops: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    done: bool = False


class SweepStopRule:
    """Stop the sweep when no remaining option is predicted to improve the best by `threshold`.

    Options: each live trial run to the end of its schedule (or of the budget), and, while
    configurations are left to start, a new one, optimistically assumed to follow the best
    curve fitted so far. Predictions are each trial's learning-curve fit minus one residual
    sigma (optimistic), so noise alone does not end a sweep. Never stops before
    `min_fitted` trials have at least `min_points` reports each.
    """

    def __init__(self, threshold: float, mode: Literal["min", "max"], flop_cap: float,
                 max_trial_flops: float, total_trials: int, min_fitted: int = 2, min_points: int = 4):
        if not threshold > 0:
            raise ValueError(f"threshold: must be > 0 metric units (got {threshold!r})")
        if mode not in ("min", "max"):
            raise ValueError(f"mode: must be 'min' or 'max' (got {mode!r})")
        self.threshold, self.sign = float(threshold), (1.0 if mode == "min" else -1.0)
        self.cap, self.max_trial = float(flop_cap), float(max_trial_flops)
        self.total_trials, self.min_fitted, self.min_points = total_trials, min_fitted, min_points
        self.trials: dict[str, _Trial] = {}
        self.sweep_flops = 0.0
        self.why = ""

    def observe(self, trial_id: str, flops: float, metric: float | None, sweep_flops: float | None = None,
                done: bool = False) -> None:
        t = self.trials.setdefault(trial_id, _Trial())
        if metric is not None and math.isfinite(metric) and flops > 0:
            t.flops.append(float(flops))
            t.losses.append(self.sign * float(metric))
        if sweep_flops is not None:
            self.sweep_flops = max(self.sweep_flops, float(sweep_flops))
        t.done = t.done or done

    def predicted_gains(self) -> dict[str, float]:
        """Predicted improvement of the best loss per option (metric units)."""
        remaining = max(0.0, self.cap - self.sweep_flops)
        fits = {tid: fit_learning_curve(t.flops, t.losses) for tid, t in self.trials.items() if t.flops}
        if not fits:
            return {}
        best = min(f.level for f in fits.values())  # smoothed: one lucky eval is not the best
        gains = {}
        for tid, fit in fits.items():
            t = self.trials[tid]
            if t.done:
                continue
            horizon = min(t.flops[-1] + remaining, self.max_trial)
            gains[tid] = best - (float(fit.predict(horizon)) - fit.noise)
        if len(self.trials) < self.total_trials and remaining > 0:
            horizon = min(remaining, self.max_trial)
            gains["new configuration"] = best - min(float(f.predict(horizon)) - f.noise for f in fits.values())
        return gains

    def should_stop(self) -> bool:
        fitted = [t for t in self.trials.values() if len(t.flops) >= self.min_points]
        if len(fitted) < self.min_fitted:
            return False
        gains = self.predicted_gains()
        top = max(gains.values(), default=-math.inf)
        if top < self.threshold:
            self.why = (f"the best remaining option is predicted to gain {top:.4g} < threshold {self.threshold:.4g}"
                        if gains else "no option is left")
            return True
        return False
