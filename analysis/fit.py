"""Scaling-law fits with bootstrap uncertainty.

Forms
-----
* ``power_law``: ``y = (a * x) ** b``, the VAR paper's form, by least squares in log-log space (a straight line
  ``log y = b log a + b log x``), with the Pearson r of ``(log x, log y)``.
* ``saturating``: ``y = E + A * x ** (-alpha)``, least squares on ``log y`` (relative errors), solved by variable
  projection (for a fixed alpha, E and A are a non-negative linear least-squares problem) and then polished jointly.
* ``chinchilla``: ``L(N, D) = E + A / N**alpha + B / D**beta`` fitted as Hoffmann et al. (2022) approach 3 and its
  replication (Besiroglu et al. 2024): parameters ``a = log A``, ``b = log B``, ``e = log E``; prediction
  ``log L = LSE(a - alpha log N, b - beta log D, e)``; Huber loss (delta 1e-3) of the log-loss residuals **summed**
  over points; L-BFGS from every point of the grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
  a, b in {0, 5, ..., 25} (``len(CHINCHILLA_GRID)`` = 6 * 6 * 5 * 5 * 5 = 4,500 starts); the best optimum is kept.

  The objective and its analytic gradient are vectorised over starts as well as points, so all 4,500 L-BFGS runs
  advance together (a batched L-BFGS with backtracking Armijo line search); the best few distinct optima are then
  polished with SciPy's L-BFGS-B at tight tolerances (the replication showed that loose tolerances stop early, so
  the reported optimum is always a converged SciPy L-BFGS-B result). ``method="scipy"`` runs SciPy's L-BFGS-B from
  every start instead (slower; kept as a reference, and compared in ``benchmarks/analysis_fit.py``).

Uncertainty
-----------
Every fit takes ``bootstrap=B`` and resamples *runs* with replacement (``groups`` says which points belong to one run;
by default every point is its own run), refits, and reports intervals ``<name>_ci = (lo, hi)`` at ``level`` for every
parameter and derived quantity. Extrapolations and compute-optimal allocations take their intervals from the same
bootstrap samples.

Scaling studies have few runs, and plain percentile intervals are too narrow then (measured for the power-law
exponent at nominal 95%: 89% coverage with 10 runs, 90% with 20). The default ``interval="expanded"`` is Hesterberg's
expanded percentile interval (The American Statistician 69, 2015): the percentile interval at the level whose normal
quantile is ``sqrt(g / (g - p)) * t_{g - p}`` of the nominal one (g runs, p fitted parameters), which restores
coverage (measured: 96% with 10 runs, 93% with 20, 96% with 40). ``interval="percentile"`` gives the plain one.

Compute-optimal allocation
--------------------------
``compute_optimal`` minimises ``L(N, D)`` at fixed training compute ``C = f(N) * D``. ``f`` is the FLOPs per token:
``6 N`` by default (Kaplan / Chinchilla) or, better for VAR, the model's own training FLOPs per token
(``model.flops_per_image / tokens per image`` from the runs, interpolated log-log in N: :class:`FlopsPerToken`).
The two differ for VAR because the AdaLN parameters (a third of the block parameters) run once per image, not per
token, and attention adds ``12 d L C`` per token.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize

from analysis.lbfgs import batched_lbfgs, distinct_best, scipy_lbfgs
from analysis.runs import AnalysisWarning


class InsufficientDataError(ValueError):
    """Too few usable points (or too few distinct x values) for the requested fit."""


class DivergedFitError(ArithmeticError):
    """The fit ran off to non-finite parameters (every start diverged, or the best optimum overflows)."""


# ----------------------------------------------------------------------------------------------------------------------
# the approach-3 grid

GRID_ALPHA = np.arange(0.0, 2.0 + 1e-9, 0.5)
GRID_BETA = np.arange(0.0, 2.0 + 1e-9, 0.5)
GRID_E = np.arange(-1.0, 1.0 + 1e-9, 0.5)
GRID_A = np.arange(0.0, 25.0 + 1e-9, 5.0)
GRID_B = np.arange(0.0, 25.0 + 1e-9, 5.0)
#: every start of the approach-3 fit as rows (a, b, e, alpha, beta)
CHINCHILLA_GRID = np.array(list(itertools.product(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA)), dtype=np.float64)
HUBER_DELTA = 1e-3

POWER_LAW_PARAMS = ("a", "b", "r", "c")
SATURATING_PARAMS = ("E", "A", "alpha", "r")
CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta", "a_opt", "b_opt", "G")
#: the parameters a prediction uses: a fit or replicate with any of them non-finite has diverged
DEFINING_PARAMS = {"power_law": ("b", "c"), "saturating": ("E", "A", "alpha"),
                   "chinchilla": ("E", "A", "B", "alpha", "beta")}  # fmt: skip
#: how an interval of each parameter is read: ``scale`` (positive, judged in decades), ``exponent``, ``correlation``
PARAM_KINDS = {"a": "scale", "c": "scale", "A": "scale", "B": "scale", "E": "scale", "G": "scale", "b": "exponent",
               "alpha": "exponent", "beta": "exponent", "r": "correlation", "a_opt": "fraction",
               "b_opt": "fraction"}  # fmt: skip
#: a positive parameter whose interval spans this many decades (or reaches 0 or infinity) is unconstrained
UNCONSTRAINED_DECADES = 6.0


# ----------------------------------------------------------------------------------------------------------------------
# law evaluation


def power_law(x, a: float, b: float) -> np.ndarray:
    """``(a * x) ** b``; x (n,) -> (n,)."""
    return (a * np.asarray(x, dtype=float)) ** b


def saturating(x, E: float, A: float, alpha: float) -> np.ndarray:
    """``E + A * x ** (-alpha)``; x (n,) -> (n,)."""
    return E + A * np.asarray(x, dtype=float) ** (-alpha)


def chinchilla_loss(N, D, E: float, A: float, B: float, alpha: float, beta: float) -> np.ndarray:
    """``E + A / N**alpha + B / D**beta``; N, D broadcastable -> loss."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    return E + A / N**alpha + B / D**beta


# ----------------------------------------------------------------------------------------------------------------------
# result type


class FitResult(dict):
    """A fit: a plain dict of parameters (``"E"``, ``"alpha"``, ...), ``"<name>_ci"`` intervals when bootstrapped,
    ``"form"`` and ``"n_points"``; plus attributes ``form``, ``samples`` (one bootstrap replicate per row, or None)
    and ``level``, and methods to predict and label.

    Bootstrap replicates with a non-finite defining parameter (:data:`DEFINING_PARAMS`: a replicate that ran off to
    ``A = inf``, or drew a single distinct x) are dropped here, once, so that no interval, prediction,
    compute-optimal allocation or extrapolation sees them; ``"bootstrap"`` is the number drawn,
    ``"bootstrap_degenerate"`` how many were dropped because they drew too few distinct x (``degenerate``, given by
    the fit) and ``"bootstrap_diverged"`` how many others were dropped. :meth:`caveats` says in words what the
    reader must know: dropped replicates, parameters on a bound (``at_bound``), intervals that do not constrain
    their parameter.
    """

    def __init__(
        self,
        form: str,
        values: dict,
        n_points: int,
        samples: pd.DataFrame | None = None,
        level: float = 0.95,
        extra: dict | None = None,
        *,
        n_groups: int | None = None,
        n_free: int = 0,
        interval: str = "expanded",
        bounds: dict[str, tuple[float, float]] | None = None,
        at_bound: dict[str, str] | None = None,
        degenerate: np.ndarray | None = None,
    ):
        super().__init__()
        if interval not in ("expanded", "percentile"):
            raise ValueError(f"interval must be 'expanded' or 'percentile', got {interval!r}")
        self.form = form
        self.level = level
        self.n_groups = int(n_groups if n_groups is not None else n_points)
        self.n_free = n_free
        self.interval = interval
        self.bounds = dict(bounds or {})
        """Allowed range of constrained parameters, e.g. ``{"alpha": (0, 10)}``."""
        self.at_bound = dict(at_bound or {})
        """Parameters whose estimate sits on a bound: name -> which bound, e.g. ``{"E": "lower bound 0"}``."""
        self.n_diverged = 0
        self.n_degenerate = 0
        self["form"] = form
        self.update({k: float(v) for k, v in values.items()})
        self["n_points"] = int(n_points)
        if samples is not None and len(samples):
            defining = [c for c in DEFINING_PARAMS.get(form, ()) if c in samples.columns]
            finite = np.isfinite(samples[defining].to_numpy(dtype=float)).all(axis=1)
            # a replicate that drew too few distinct x has no law to fit: counted apart from true divergence
            degenerate = np.zeros(len(samples), bool) if degenerate is None else np.asarray(degenerate, bool)
            self.n_degenerate = int((~finite & degenerate).sum())
            self.n_diverged = int((~finite & ~degenerate).sum())
            self["bootstrap"] = len(samples)
            self["bootstrap_diverged"] = self.n_diverged
            self["bootstrap_degenerate"] = self.n_degenerate
            samples = samples[finite].reset_index(drop=True)
            self["interval"] = interval
            self["percentile_level"] = self.percentile_level()
            if len(samples):
                for name in samples.columns:
                    self[f"{name}_ci"] = percentile_interval(samples[name].to_numpy(), self["percentile_level"])
        self.samples = samples
        if extra:
            self.update(extra)

    @property
    def diverged(self) -> bool:
        """Whether the point estimate itself has a non-finite defining parameter (no usable law)."""
        return not all(np.isfinite(self.get(k, np.nan)) for k in DEFINING_PARAMS.get(self.form, ()))

    def interval_caveat(self, name: str) -> str | None:
        """Why ``<name>_ci`` does not pin the parameter down (see :func:`interval_caveat`), or None."""
        ci = self.get(f"{name}_ci")
        if not isinstance(ci, tuple):
            return None
        return interval_caveat(ci[0], ci[1], PARAM_KINDS.get(name, "scale"), self.bounds.get(name), self.level)

    def caveats(self) -> list[str]:
        """What a reader of this fit must know, one sentence each: dropped replicates, parameters on a bound,
        intervals that do not constrain their parameter. Empty for a well-determined fit."""
        out = []
        if "bootstrap" in self and (self.n_diverged or self.n_degenerate):
            n = self["bootstrap"]
            if self.n_degenerate:
                out.append(f"{self.n_degenerate} of {n} bootstrap replicates drew a single distinct x (no slope to "
                           "fit) and were dropped")  # fmt: skip
            if self.n_diverged:
                out.append(f"{self.n_diverged} of {n} bootstrap replicates diverged (non-finite parameters) and were "
                           "dropped")  # fmt: skip
            if self.samples is None or not len(self.samples):
                out.append("no bootstrap replicate is left: no intervals")
        for name, where in self.at_bound.items():
            out.append(f"{name} = {self[name]:.3g} lies on its {where}")
        for name in dict.fromkeys((*self.params, *(k[:-3] for k in self if k.endswith("_ci")))):
            text = self.interval_caveat(name)
            if text:
                out.append(f"{name}: {text}")
        return out

    def percentile_level(self, level: float | None = None) -> float:
        """Percentile level that gives nominal coverage ``level`` (default the fit's) under this fit's interval."""
        return interval_level(level or self.level, self.n_groups, self.n_free, self.interval)

    @property
    def params(self) -> dict[str, float]:
        names = {"power_law": POWER_LAW_PARAMS, "saturating": SATURATING_PARAMS, "chinchilla": CHINCHILLA_PARAMS}
        return {k: self[k] for k in names[self.form] if k in self}

    def predict(self, *x) -> np.ndarray:
        """Evaluate the fitted law: ``predict(x)`` for one-variable forms, ``predict(N, D)`` for chinchilla."""
        return _evaluate(self.form, self, *x)

    def predict_interval(self, *x, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval of the prediction over the bootstrap replicates; (lo, hi) with x's shape."""
        if self.samples is None or not len(self.samples):
            raise ValueError("this fit has no bootstrap replicates: refit with bootstrap > 0")
        with np.errstate(all="ignore"):
            preds = np.stack([_evaluate(self.form, row, *x) for row in self.samples.to_dict("records")])
        lo, hi = percentile_interval(preds, self.percentile_level(level), axis=0)
        return lo, hi

    def label(self, x: str = "x", y: str = "y", digits: int = 3) -> str:
        """Legend text, e.g. ``L = (2.0e-09 N)^-0.230, r = -0.998``."""
        if self.form == "power_law" and not 1e-300 < abs(self["a"]) < 1e300:
            text = f"{y} = {_fmt(self['c'])} {x}^{self['b']:.{digits}f}"  # the paper's (a x)^b has no float a
        elif self.form == "power_law":
            text = f"{y} = ({_fmt(self['a'])} {x})^{self['b']:.{digits}f}"
        elif self.form == "saturating":
            text = f"{y} = {self['E']:.{digits}g} + {_fmt(self['A'])} {x}^-{self['alpha']:.{digits}f}"
        else:
            text = (
                f"{y} = {self['E']:.{digits}g} + {_fmt(self['A'])}/N^{self['alpha']:.{digits}f}"
                f" + {_fmt(self['B'])}/D^{self['beta']:.{digits}f}"
            )
        if "r" in self and np.isfinite(self["r"]):
            text += f", r = {self['r']:.3f}"
        return text

    def to_row(self) -> dict:
        """Flat dict for a CSV row: intervals split into ``<name>_lo`` and ``<name>_hi``."""
        row = {}
        for key, value in self.items():
            if key.endswith("_ci") and isinstance(value, tuple):
                row[f"{key[:-3]}_lo"], row[f"{key[:-3]}_hi"] = value
            else:
                row[key] = value
        return row


def _fmt(value: float) -> str:
    return f"{value:.3g}" if 1e-2 <= abs(value) < 1e4 else f"{value:.2e}"


def _evaluate(form: str, p, *x) -> np.ndarray:
    if form == "power_law":
        return p["c"] * np.asarray(x[0], dtype=float) ** p["b"]  # exact where a = c^(1/b) over- or underflows
    if form == "saturating":
        return saturating(x[0], p["E"], p["A"], p["alpha"])
    if form == "chinchilla":
        if len(x) != 2:
            raise TypeError("a chinchilla fit predicts from (N, D)")
        return chinchilla_loss(x[0], x[1], p["E"], p["A"], p["B"], p["alpha"], p["beta"])
    raise ValueError(f"unknown form {form!r}")


def interval_level(level: float, n_groups: int, n_free: int, interval: str = "expanded") -> float:
    """Percentile level of the ``expanded`` interval (Hesterberg 2015) for nominal ``level``, g runs, p parameters.

    ``z' = sqrt(g / (g - p)) * t_{1 - alpha/2, g - p}`` and the level is ``1 - 2 * Phi(-z')``; with g <= p (or
    ``interval="percentile"``) it is ``level`` itself. With one or two runs more than parameters the level reaches 1
    (the full range of the replicates): so few runs cannot pin the law down.
    """
    from scipy import stats

    if interval == "percentile" or n_groups <= n_free or n_free <= 0:
        return level
    z = math.sqrt(n_groups / (n_groups - n_free)) * stats.t.ppf(1 - (1 - level) / 2, n_groups - n_free)
    return float(min(1.0, 1 - 2 * stats.norm.sf(z)))


def interval_caveat(
    lo: float, hi: float, kind: str = "scale", bounds: tuple[float, float] | None = None, level: float = 0.95
) -> str | None:
    """Why an interval ``[lo, hi]`` does not pin its parameter down, in words; None when it does.

    Args:
        lo, hi: the interval.
        kind: ``scale`` (a positive coefficient: unconstrained when the interval reaches 0 or infinity or spans
            :data:`UNCONSTRAINED_DECADES` decades), ``exponent`` (unconstrained when it spans the whole of
            ``bounds``; its sign is open when it contains 0), ``correlation`` (uninformative when it is [-1, 1];
            its sign is open when it contains 0) or ``fraction`` (never flagged).
        bounds: allowed range of the parameter, if any.
        level: nominal coverage, for the wording.
    """
    pct = f"{100 * level:g}%"
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi):  # no finite replicate: nothing to read
        return None
    if kind == "correlation":
        if lo <= -0.999 and hi >= 0.999:
            return f"uninformative: the {pct} bootstrap interval of r is [-1, 1] (too few runs to tell a trend)"
        if lo < 0 < hi:
            return f"the {pct} interval of r includes 0: the direction of the trend is not established"
        return None
    if kind == "exponent":
        if bounds is not None:
            b_lo, b_hi = bounds
            tol = 1e-6 * max(1.0, abs(b_hi - b_lo))
            if lo <= b_lo + tol and hi >= b_hi - tol:
                return f"unconstrained: the {pct} interval spans its whole allowed range [{b_lo:g}, {b_hi:g}]"
        if lo < 0 < hi:
            return f"the {pct} interval includes 0: the sign of the exponent is not established"
        return None
    if kind != "scale":
        return None
    # a subnormal lower end is a coefficient that underflowed to 0 in some replicate
    ends = [what for what, hit in (("0", lo < np.finfo(float).tiny), ("infinity", math.isinf(hi))) if hit]
    if ends:
        return f"unconstrained: the {pct} interval reaches {' and '.join(ends)}"
    decades = math.log10(hi) - math.log10(lo)  # not log10(hi / lo): that overflows for a subnormal lo
    if decades >= UNCONSTRAINED_DECADES:
        return f"unconstrained: the {pct} interval spans {decades:.0f} decades"
    return None


def percentile_interval(values, level: float = 0.95, axis=None):
    """Two-sided percentile interval at ``level`` ignoring NaNs; a tuple (lo, hi). Level 1 is the full range."""
    if not 0 < level <= 1:
        raise ValueError(f"level must be in (0, 1], got {level}")
    tail = 100 * (1 - level) / 2
    values = np.asarray(values, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(values, [tail, 100 - tail], axis=axis)
        if np.isinf(values).any():  # interpolating next to an infinite value gives NaN (inf - inf): take the value
            near_lo, near_hi = np.nanpercentile(values, [tail, 100 - tail], axis=axis, method="nearest")
            lo, hi = np.where(np.isnan(lo), near_lo, lo), np.where(np.isnan(hi), near_hi, hi)
    if axis is None:
        return float(lo), float(hi)
    return lo, hi


# ----------------------------------------------------------------------------------------------------------------------
# input handling and resampling


def _clean(*arrays, names: Sequence[str], groups=None, what: str = "fit"):
    """Drop points that are not finite and positive in every array, warning with how many and which."""
    arrays = [np.asarray(a, dtype=float).ravel() for a in arrays]
    n = len(arrays[0])
    for name, a in zip(names, arrays):
        if len(a) != n:
            raise ValueError(f"{what}: {name} has {len(a)} values but {names[0]} has {n}")
    groups = np.arange(n) if groups is None else np.asarray(groups).ravel()
    if len(groups) != n:
        raise ValueError(f"{what}: groups has {len(groups)} values but {names[0]} has {n}")
    ok = np.ones(n, bool)
    for a in arrays:
        ok &= np.isfinite(a) & (a > 0)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        warnings.warn(
            f"{what}: dropped {len(bad)} of {n} points with NaN, infinite or non-positive values "
            f"(indices {bad[:10].tolist()}{' ...' if len(bad) > 10 else ''})",
            AnalysisWarning,
            stacklevel=3,
        )
    return [a[ok] for a in arrays], groups[ok]


def _bootstrap_weights(groups: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicity of every point in each replicate when whole groups (runs) are drawn with replacement.

    Returns:
        weights (replicates, n) of non-negative integers.
    """
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = inverse.max() + 1
    draws = rng.integers(0, n_groups, size=(replicates, n_groups))
    counts = np.zeros((replicates, n_groups))
    np.add.at(counts, (np.arange(replicates)[:, None], draws), 1.0)
    return counts[:, inverse]


def _distinct_drawn(log_x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Distinct x values each replicate drew; log_x (n,), weights (R, n) -> (R,) counts."""
    _, code = np.unique(np.round(log_x, 6), return_inverse=True)
    present = np.zeros((len(weights), code.max() + 1), bool)
    rows, cols = np.nonzero(weights > 0)
    present[rows, code[cols]] = True
    return present.sum(1)


def _check_distinct(x: np.ndarray, minimum: int, name: str, what: str) -> None:
    distinct = len(np.unique(np.round(np.log(x), 6)))
    if distinct < minimum:
        raise InsufficientDataError(f"{what} needs at least {minimum} distinct values of {name}, got {distinct}")


# ----------------------------------------------------------------------------------------------------------------------
# power law y = (a x)^b


def _power_law_weighted(lx: np.ndarray, ly: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares line in log-log space for many weightings at once.

    Args:
        lx, ly: (n,) logs of x and y.
        w: (R, n) weights (multiplicities).

    Returns:
        (R, 4) rows (a, b, r, c): ``y = (a x)^b = c x^b``. ``a = c^(1/b)`` leaves the floats when b is near 0 (a
        flat law such as FID at toy scale), so ``c`` is kept too and predictions use it.
    """
    wsum = w.sum(1)
    mx = (w * lx).sum(1) / wsum
    my = (w * ly).sum(1) / wsum
    dx = lx[None] - mx[:, None]
    dy = ly[None] - my[:, None]
    sxx = (w * dx * dx).sum(1)
    syy = (w * dy * dy).sum(1)
    sxy = (w * dx * dy).sum(1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore", under="ignore"):
        b = sxy / sxx
        intercept = my - b * mx
        a = np.exp(intercept / b)
        r = sxy / np.sqrt(sxx * syy)
        c = np.exp(intercept)
    return np.stack([a, b, r, c], axis=1)


def fit_power_law(
    x, y, *, bootstrap: int = 0, seed: int = 0, groups=None, level: float = 0.95, interval: str = "expanded"
) -> FitResult:
    """Fit ``y = (a * x) ** b`` by least squares on ``log y = b log a + b log x``.

    Args:
        x: (n,) positive abscissae (parameters, PFLOPs, ...).
        y: (n,) positive values (loss, error, FID).
        bootstrap: number of bootstrap replicates (0: none).
        seed: seed of the bootstrap.
        groups: (n,) run of each point; replicates draw whole runs. None: each point is a run.
        level: coverage of the ``*_ci`` intervals.
        interval: ``"expanded"`` (default: percentile interval widened for few runs) or ``"percentile"``.

    Returns:
        FitResult with ``a``, ``b``, ``r`` (Pearson r of log x, log y), ``c`` (the same law as ``c x^b``: finite
        where ``a`` is not) and, when bootstrapping, ``a_ci``, ``b_ci``, ``r_ci``, ``c_ci``.

    Raises:
        InsufficientDataError: fewer than 2 usable points or a single distinct x.
    """
    (x, y), groups = _clean(x, y, names=("x", "y"), groups=groups, what="power-law fit")
    if len(x) < 2:
        raise InsufficientDataError(f"power-law fit needs at least 2 usable points, got {len(x)}")
    _check_distinct(x, 2, "x", "power-law fit")
    lx, ly = np.log(x), np.log(y)
    a, b, r, c = _power_law_weighted(lx, ly, np.ones((1, len(x))))[0]
    samples = degenerate = None
    if bootstrap:
        w = _bootstrap_weights(groups, bootstrap, np.random.default_rng(seed))
        samples = pd.DataFrame(_power_law_weighted(lx, ly, w), columns=list(POWER_LAW_PARAMS))
        degenerate = _distinct_drawn(lx, w) < 2
    params = {"a": a, "b": b, "r": r, "c": c}
    n_groups = len(np.unique(groups))
    return FitResult("power_law", params, len(x), samples, level, n_groups=n_groups, n_free=2, interval=interval,
                     degenerate=degenerate)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# saturating y = E + A x^-alpha

_ALPHA_SCAN = np.geomspace(1e-3, 4.0, 80)
SATURATING_ALPHA_MAX = 10.0
#: a coefficient below this fraction of the smallest value is on its bound 0
BOUND_RTOL = 1e-6


def _saturating_once(x: np.ndarray, y: np.ndarray, w: np.ndarray, E_fixed: float | None) -> tuple[float, ...]:
    """One weighted fit of ``y = E + A x^-alpha`` (x already divided by its geometric mean).

    Variable projection: for every alpha of a log grid (all at once), E >= 0 and A >= 0 solve a two-variable
    non-negative least-squares problem in relative error; the best alpha by log-space cost then seeds a joint
    least-squares polish of the log residuals (analytic Jacobian).
    """
    sw = np.sqrt(w)
    log_x = np.log(x)
    U = np.exp(-_ALPHA_SCAN[:, None] * log_x[None, :])  # (K, n) x^-alpha for every alpha of the scan
    c1 = 1.0 / y  # design columns of E and A in relative error: (E + A u - y) / y = E c1 + A c2 - 1
    c2 = U / y
    s22 = (w * c2 * c2).sum(1)
    b2 = (w * c2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if E_fixed is None:
            s11 = float((w * c1 * c1).sum())
            b1 = float((w * c1).sum())
            s12 = (w * c1 * c2).sum(1)
            det = s11 * s22 - s12 * s12
            E = (b1 * s22 - b2 * s12) / det
            A = (s11 * b2 - s12 * b1) / det
            # outside the feasible quadrant the NNLS optimum lies on an edge: E = 0 or A = 0
            edge = ~((E >= 0) & (A >= 0) & np.isfinite(E) & np.isfinite(A))
            A_edge = np.maximum(b2 / s22, 0.0)
            E[edge], A[edge] = 0.0, A_edge[edge]
        else:
            target = (y - E_fixed) / y
            A = np.maximum((w * c2 * target).sum(1) / s22, 0.0)
            E = np.full(len(_ALPHA_SCAN), float(E_fixed))
        pred = E[:, None] + A[:, None] * U
        cost = np.where(np.all(pred > 0, axis=1), (w * np.log(pred / y) ** 2).sum(1), np.inf)
    k = int(np.nanargmin(cost)) if np.isfinite(cost).any() else 0
    E0, A0, alpha0 = float(E[k]), max(float(A[k]), 1e-12 * float(np.median(y))), float(_ALPHA_SCAN[k])
    fixed = E_fixed is not None

    def unpack(p):
        return (E_fixed if fixed else p[0]), math.exp(p[-2]), p[-1]

    def residuals(p):
        E_, A_, alpha_ = unpack(p)
        pred = E_ + A_ * np.exp(-alpha_ * log_x)
        return sw * (np.log(np.maximum(pred, 1e-300)) - np.log(y))

    def jacobian(p):
        E_, A_, alpha_ = unpack(p)
        term = A_ * np.exp(-alpha_ * log_x)
        inv = sw / np.maximum(E_ + term, 1e-300)
        cols = [inv * term, -inv * term * log_x]
        return np.stack(cols if fixed else [inv] + cols, axis=1)

    if fixed:
        p0, lower, upper = [math.log(A0), alpha0], [-np.inf, 0.0], [np.inf, SATURATING_ALPHA_MAX]
    else:
        p0, lower, upper = [E0, math.log(A0), alpha0], [0.0, -np.inf, 0.0], [np.inf, np.inf, SATURATING_ALPHA_MAX]
    p0 = np.clip(p0, np.array(lower) + 1e-12, np.array(upper) - 1e-12)
    sol = optimize.least_squares(residuals, p0, jac=jacobian, bounds=(lower, upper), method="trf", x_scale="jac",
                                 xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=500)  # fmt: skip
    E_, A_, alpha_ = unpack(sol.x)
    return float(E_), float(A_), float(alpha_)


def fit_saturating(
    x,
    y,
    *,
    E: float | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    groups=None,
    level: float = 0.95,
    interval: str = "expanded",
) -> FitResult:
    """Fit ``y = E + A * x ** (-alpha)`` (least squares on log y).

    Args:
        x: (n,) positive abscissae.
        y: (n,) positive values.
        E: irreducible term held fixed (None: fitted, E >= 0).
        bootstrap, seed, groups, level, interval: as in :func:`fit_power_law`.

    Returns:
        FitResult with ``E``, ``A``, ``alpha`` and ``r`` (Pearson r of log x against log(y - E), the straightness of
        the reducible part) plus ``*_ci`` when bootstrapping.

    Raises:
        InsufficientDataError: fewer than 4 usable points (3 with E fixed) or fewer distinct x.
    """
    (x, y), groups = _clean(x, y, names=("x", "y"), groups=groups, what="saturating fit")
    need = 3 if E is not None else 4
    if len(x) < need:
        raise InsufficientDataError(f"saturating fit needs at least {need} usable points, got {len(x)}")
    _check_distinct(x, need - 1, "x", "saturating fit")
    scale = float(np.exp(np.log(x).mean()))  # conditioning: x / geometric mean is O(1)
    xs = x / scale

    def one(w: np.ndarray) -> list[float]:
        E_, A_, alpha_ = _saturating_once(xs, y, w, E)
        A_ = A_ * scale**alpha_  # back to the caller's units of x
        reducible = y - E_
        r = np.nan
        if np.all(reducible > 0):
            sel = w > 0
            if sel.sum() > 2:
                r = float(np.corrcoef(np.log(x[sel]), np.log(reducible[sel]))[0, 1])
        return [E_, A_, alpha_, r]

    values = one(np.ones(len(x)))
    samples = None
    if bootstrap:
        w = _bootstrap_weights(groups, bootstrap, np.random.default_rng(seed))
        samples = pd.DataFrame([one(wi) for wi in w], columns=list(SATURATING_PARAMS))
    E_, _, alpha_, _ = values
    at_bound = {}
    if E is None and E_ <= BOUND_RTOL * y.min():
        at_bound["E"] = "lower bound 0 (no saturation is visible: a pure power law fits as well)"
    if alpha_ >= SATURATING_ALPHA_MAX * (1 - BOUND_RTOL):
        at_bound["alpha"] = f"upper bound {SATURATING_ALPHA_MAX:g}"
    elif alpha_ <= BOUND_RTOL:
        at_bound["alpha"] = "lower bound 0 (y does not fall with x)"
    return FitResult("saturating", dict(zip(SATURATING_PARAMS, values)), len(x), samples, level,
                     extra={"E_fixed": E is not None}, n_groups=len(np.unique(groups)), n_free=need - 1,
                     interval=interval, bounds={"alpha": (0.0, SATURATING_ALPHA_MAX)},
                     at_bound=at_bound)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# chinchilla approach 3


def chinchilla_objective(
    theta: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_L: np.ndarray, weights: np.ndarray | None = None,
    delta: float = HUBER_DELTA, block: int = 128,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Summed Huber loss of log-loss residuals and its analytic gradient, for many parameter vectors at once.

    Args:
        theta: (S, 5) rows ``(a, b, e, alpha, beta)``.
        log_N, log_D, log_L: (n,) logs of parameters, tokens and loss.
        weights: (n,) multiplicity of each point, or (S, n) one weighting per start (bootstrap replicates solved
            together), None for ones.
        delta: Huber threshold.
        block: starts evaluated together; (block, n) temporaries stay in cache, which is ~7x faster than one pass
            over (S, n) arrays.

    Returns:
        f (S,) and grad (S, 5) with columns d/da, d/db, d/de, d/dalpha, d/dbeta.
    """
    theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
    f = np.empty(len(theta))
    grad = np.empty((len(theta), 5))
    per_start = weights is not None and np.ndim(weights) == 2
    for lo in range(0, len(theta), block):
        w = weights[lo : lo + block] if per_start else weights
        f[lo : lo + block], grad[lo : lo + block] = _objective_block(
            theta[lo : lo + block], log_N, log_D, log_L, w, delta
        )
    return f, grad


def _objective_block(theta, log_N, log_D, log_L, weights, delta):
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    # log L_hat = LSE(t1, t2, e) = m + log(w1 + w2 + w3), w_i = exp(t_i - m), m = max(t1, t2, e)
    w1 = alpha * log_N
    np.subtract(a, w1, out=w1)
    w2 = beta * log_D
    np.subtract(b, w2, out=w2)
    m = np.maximum(w1, w2)
    np.maximum(m, e, out=m)
    w1 -= m
    np.exp(w1, out=w1)
    w2 -= m
    np.exp(w2, out=w2)
    w3 = e - m
    np.exp(w3, out=w3)
    total = w1 + w2
    total += w3
    r = np.log(total)
    r += m
    r -= log_L
    abs_r = np.abs(r)
    huber = np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))
    np.clip(r, -delta, delta, out=r)  # Huber derivative
    if weights is not None:
        huber *= weights
        r *= weights
    r /= total
    # d log L_hat / d t_i = w_i / total (softmax); t1 = a - alpha log N, t2 = b - beta log D
    w1 *= r
    w2 *= r
    w3 *= r
    grad = np.stack([w1.sum(1), w2.sum(1), w3.sum(1), -(w1 @ log_N), -(w2 @ log_D)], axis=1)
    return huber.sum(1), grad


@dataclass
class _ChinchillaSolve:
    theta: np.ndarray  # (5,) a, b, e, alpha, beta
    objective: float
    candidates: np.ndarray  # (k, 5) distinct good optima, best first (seeds for bootstrap refits)
    iterations: int


def _solve_chinchilla(
    log_N, log_D, log_L, weights, starts: np.ndarray, method: str, polish: int, delta: float, workers: int = 1,
    keep: int = 8,
) -> _ChinchillaSolve:  # fmt: skip
    """Run L-BFGS from every start, polish the ``polish`` best distinct optima with SciPy, keep the best."""
    if method not in ("batched", "scipy"):
        raise ValueError(f"method must be 'batched' or 'scipy', got {method!r}")
    data = (log_N, log_D, log_L, weights, delta)
    if workers > 1 and len(starts) >= 2 * workers:
        import concurrent.futures as futures
        import multiprocessing

        # fork: workers need only numpy/scipy and the arrays, and it works from python -c and notebooks
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        chunks = np.array_split(starts, workers if method == "batched" else 4 * workers)
        with futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            outs = list(pool.map(_starts_chunk, [method] * len(chunks), [data] * len(chunks), chunks))
    else:
        outs = [_starts_chunk(method, data, starts)]
    x = np.concatenate([o[0] for o in outs])
    f = np.concatenate([o[1] for o in outs])
    total_iters = int(sum(o[2] for o in outs))
    best = distinct_best(x, f, max(polish, keep, 1))
    if not len(best):
        raise DivergedFitError("every L-BFGS start diverged (non-finite objective)")
    candidates = x[best]
    finals = [(float(f[best[0]]), x[best[0]])]
    for theta0 in candidates[:polish]:
        sol = scipy_lbfgs(lambda theta: _objective_one(theta, data), theta0)
        if np.isfinite(sol.fun):
            finals.append((float(sol.fun), sol.x))
    objective, theta = min(finals, key=lambda t: t[0])
    return _ChinchillaSolve(np.asarray(theta, float), objective, candidates, total_iters)


def _objective_one(theta: np.ndarray, data: tuple) -> tuple[float, np.ndarray]:
    """The objective and its gradient at one parameter vector (5,), the form SciPy's L-BFGS takes."""
    f, g = chinchilla_objective(theta[None], *data)
    return float(f[0]), g[0]


def _starts_chunk(method: str, data: tuple, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """L-BFGS from each of some starts (also a worker process's body): optima (S, 5), objectives (S,), iterations."""
    log_N, log_D, log_L, weights, delta = data

    def fg(theta, index):
        return chinchilla_objective(theta, log_N, log_D, log_L, weights, delta)

    if method == "batched":
        x, f, iters = batched_lbfgs(fg, starts)
        return x, f, int(iters.sum())

    xs, fs, iters = [], [], 0
    for theta0 in starts:
        sol = scipy_lbfgs(lambda theta: _objective_one(theta, data), theta0, max_iter=1000)
        xs.append(sol.x)
        fs.append(sol.fun)
        iters += sol.nit
    return np.array(xs), np.array(fs), iters


def _bootstrap_chinchilla(log_N, log_D, log_L, weights, solve: _ChinchillaSolve, n_seeds: int, delta: float):
    """Refit every replicate from the full-data optimum and ``n_seeds`` other distinct optima of the full grid.

    All replicates x seeds run as one batch of L-BFGS starts, each start with its replicate's weights, at tighter
    tolerances than the grid stage (no SciPy polish per replicate).

    Returns:
        (R, 5) best parameters ``(a, b, e, alpha, beta)`` of each replicate.
    """
    seeds = np.vstack([solve.theta[None], solve.candidates[: max(n_seeds, 0)]])
    R, K = len(weights), len(seeds)
    theta0 = np.tile(seeds, (R, 1))  # replicate-major: rows r*K .. r*K + K-1 belong to replicate r
    per_start = np.repeat(weights, K, axis=0)

    def fg(theta, index):
        return chinchilla_objective(theta, log_N, log_D, log_L, per_start[index], delta)

    x, f, _ = batched_lbfgs(fg, theta0, gtol=1e-11, ftol=1e-13)
    best = np.argmin(np.where(np.isfinite(f), f, np.inf).reshape(R, K), axis=1)
    return x.reshape(R, K, 5)[np.arange(R), best]


def _chinchilla_values(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta)
    with np.errstate(over="ignore"):
        # A bootstrap replicate can run off to a huge log-coefficient: report inf rather than crash.
        values = {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}
    total = alpha + beta
    if total > 0:
        values["a_opt"] = beta / total  # N_opt ~ C^a_opt under C = 6 N D
        values["b_opt"] = alpha / total  # D_opt ~ C^b_opt
        with np.errstate(all="ignore"):
            ratio = (alpha * values["A"]) / (beta * values["B"]) if beta > 0 else np.inf
            values["G"] = float(ratio ** (1.0 / total)) if ratio > 0 else np.nan
    else:
        values.update({"a_opt": np.nan, "b_opt": np.nan, "G": np.nan})
    return values


def fit_chinchilla(
    N,
    D,
    loss,
    bootstrap: int = 0,
    seed: int = 0,
    *,
    groups=None,
    level: float = 0.95,
    interval: str = "expanded",
    delta: float = HUBER_DELTA,
    method: str = "batched",
    starts: np.ndarray | None = None,
    polish: int = 5,
    bootstrap_starts: int = 8,
    workers: int | None = None,
) -> FitResult:
    """Fit ``L(N, D) = E + A / N**alpha + B / D**beta`` by Hoffmann et al. approach 3.

    ``log L`` is predicted as ``LSE(a - alpha log N, b - beta log D, e)`` with ``A = exp(a)``, ``B = exp(b)``,
    ``E = exp(e)``; the Huber loss (``delta``) of ``log L`` residuals is summed over points and minimised by L-BFGS
    from every start of :data:`CHINCHILLA_GRID` (4,500 starts); the best optimum is kept. See the module docstring
    for how the starts are run (batched L-BFGS, then SciPy L-BFGS-B polish of the ``polish`` best distinct optima).

    Args:
        N: (n,) parameters of each point.
        D: (n,) training tokens of each point.
        loss: (n,) loss in nats (the fit is on log loss, so the units only move E, A, B).
        bootstrap: replicates that resample runs with replacement (0: no intervals).
        seed: seed of the bootstrap.
        groups: (n,) run of each point (several points of one run's history move together); None: one run per point.
        level: coverage of the intervals.
        interval: ``"expanded"`` (default) or ``"percentile"``, see the module docstring.
        delta: Huber threshold on log-loss residuals.
        method: ``"batched"`` (default) or ``"scipy"`` (SciPy L-BFGS-B from every start).
        starts: (S, 5) custom starts ``(a, b, e, alpha, beta)``; None: the full grid.
        polish: distinct best optima re-run with SciPy L-BFGS-B at tight tolerances.
        bootstrap_starts: each replicate starts from the full-data optimum and this many other distinct optima found
            on the full grid (the full grid per replicate costs ``bootstrap`` times the fit).
        workers: processes sharing the starts of the full-data fit; None: one per core (at most 4) when
            the problem is large enough to repay starting them.

    Returns:
        FitResult (a dict) with ``E``, ``A``, ``B``, ``alpha``, ``beta``, derived ``a_opt = beta / (alpha + beta)``,
        ``b_opt = alpha / (alpha + beta)``, ``G = (alpha A / (beta B)) ** (1 / (alpha + beta))`` (under C = 6ND:
        ``N_opt = G (C/6)^a_opt``), ``objective``, ``n_points``, ``n_starts``, and ``<name>_ci`` intervals for all
        of them when ``bootstrap > 0``.

    Raises:
        InsufficientDataError: fewer than 6 usable points, or fewer than 2 distinct N or D.
    """
    (N, D, loss), groups = _clean(N, D, loss, names=("N", "D", "loss"), groups=groups, what="chinchilla fit")
    if len(N) < 6:
        raise InsufficientDataError(f"chinchilla fit has 5 parameters and needs at least 6 usable points, got {len(N)}")
    _check_distinct(N, 2, "N", "chinchilla fit")
    _check_distinct(D, 2, "D", "chinchilla fit")
    log_N, log_D, log_L = np.log(N), np.log(D), np.log(loss)
    grid = CHINCHILLA_GRID if starts is None else np.atleast_2d(np.asarray(starts, dtype=float))
    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if len(grid) * len(N) >= 100_000 else 1
    solve = _solve_chinchilla(log_N, log_D, log_L, None, grid, method, polish, delta, workers, bootstrap_starts)
    values = _chinchilla_values(solve.theta)
    values["objective"] = solve.objective
    overflow = [k for k in DEFINING_PARAMS["chinchilla"] if not np.isfinite(values[k])]
    if overflow:
        raise DivergedFitError(
            "the best optimum overflows (" + ", ".join(f"{k} = {values[k]:.3g}" for k in overflow) + ")"
        )
    at_bound = {}
    if values["E"] <= BOUND_RTOL * loss.min():
        at_bound["E"] = "lower bound 0 (the fit finds no irreducible loss in these runs)"
    for k, what in (("alpha", "N"), ("beta", "D")):
        if abs(values[k]) <= BOUND_RTOL:
            at_bound[k] = f"lower bound 0 (the loss does not fall with {what})"
    samples = None
    if bootstrap:
        weights = _bootstrap_weights(groups, bootstrap, np.random.default_rng(seed))
        samples = pd.DataFrame(
            [_chinchilla_values(t) for t in _bootstrap_chinchilla(log_N, log_D, log_L, weights, solve, bootstrap_starts,
                                                                  delta)],
            columns=list(CHINCHILLA_PARAMS),
        )  # fmt: skip
    extra = {"n_starts": len(grid), "method": method}
    return FitResult("chinchilla", values, len(N), samples, level, extra=extra, n_groups=len(np.unique(groups)),
                     n_free=5, interval=interval, at_bound=at_bound)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# compute-optimal allocation


class FlopsPerToken:
    """Training FLOPs per token as a function of N, interpolated log-log over the runs (power-law extrapolation).

    Args:
        N: (m,) parameter counts.
        flops_per_token: (m,) training FLOPs per token (``flops_per_image / tokens_per_image``).
    """

    def __init__(self, N, flops_per_token):
        (N, fpt), _ = _clean(N, flops_per_token, names=("N", "flops_per_token"), what="FLOPs-per-token model")
        if not len(N):
            raise InsufficientDataError("no run with both a parameter count and FLOPs per image")
        frame = pd.DataFrame({"N": N, "f": fpt}).groupby("N", as_index=False)["f"].median()
        self.log_N = np.log(frame["N"].to_numpy())
        self.log_f = np.log(frame["f"].to_numpy())

    def __call__(self, N) -> np.ndarray:
        lN = np.log(np.asarray(N, dtype=float))
        if len(self.log_N) == 1:  # proportional to N
            return np.exp(self.log_f[0] + lN - self.log_N[0])
        out = np.interp(lN, self.log_N, self.log_f)
        lo_slope = (self.log_f[1] - self.log_f[0]) / (self.log_N[1] - self.log_N[0])
        hi_slope = (self.log_f[-1] - self.log_f[-2]) / (self.log_N[-1] - self.log_N[-2])
        out = np.where(lN < self.log_N[0], self.log_f[0] + (lN - self.log_N[0]) * lo_slope, out)
        out = np.where(lN > self.log_N[-1], self.log_f[-1] + (lN - self.log_N[-1]) * hi_slope, out)
        return np.exp(out)

    def describe(self) -> str:
        ratio = np.exp(self.log_f - self.log_N)
        return (
            f"model FLOPs per token interpolated log-log over {len(self.log_N)} sizes "
            f"({ratio.min():.2f} N to {ratio.max():.2f} N)"
        )

    @staticmethod
    def from_runs(runs: pd.DataFrame, params_column: str = "params_total") -> FlopsPerToken:
        """From a runs frame's ``flops_per_image`` / ``tokens_per_image`` and ``params_column``."""
        return FlopsPerToken(
            runs[params_column].to_numpy(dtype=float),
            runs["flops_per_image"].to_numpy(dtype=float) / runs["tokens_per_image"].to_numpy(dtype=float),
        )


def six_n(N) -> np.ndarray:
    """The 6N FLOPs-per-token rule (forward 2N + backward 4N)."""
    return 6.0 * np.asarray(N, dtype=float)


def _optimal_one(p, C: float, fpt: Callable) -> tuple[float, float, float]:
    """Compute-optimal (N, D, loss) of the law ``p`` at compute C; NaNs when the law has no finite loss there."""

    def loss_at(log_N):
        N = math.exp(log_N)
        with np.errstate(all="ignore"):
            value = float(chinchilla_loss(N, C / float(fpt(N)), p["E"], p["A"], p["B"], p["alpha"], p["beta"]))
        return value if math.isfinite(value) else math.inf

    # a coarse log grid brackets the minimum (the curve is unimodal), then Brent refines it
    grid = np.linspace(math.log(1e2), math.log(1e16), 141)
    N_grid = np.exp(grid)
    with np.errstate(all="ignore"):
        vals = chinchilla_loss(N_grid, C / np.asarray(fpt(N_grid), dtype=float), p["E"], p["A"], p["B"], p["alpha"],
                               p["beta"])  # fmt: skip
    vals = np.where(np.isfinite(vals), vals, np.nan)
    if np.isnan(vals).all():  # the law overflows at every size (e.g. A = inf, or N^alpha overflowing)
        return math.nan, math.nan, math.nan
    i = int(np.nanargmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    sol = optimize.minimize_scalar(loss_at, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    if not math.isfinite(sol.fun):
        return math.nan, math.nan, math.nan
    N = math.exp(sol.x)
    return N, C / float(fpt(N)), float(sol.fun)


def compute_optimal(fit: FitResult, C, flops_per_token: Callable | None = None, level: float | None = None):
    """Compute-optimal N(C), D(C) and loss from a chinchilla fit, with bootstrap intervals when available.

    Args:
        fit: result of :func:`fit_chinchilla`.
        C: (m,) training compute budgets in FLOPs.
        flops_per_token: ``f(N)`` with ``C = f(N) * D``; None uses :func:`six_n`. With 6N the closed form
            ``N_opt = G (C/6)^a_opt`` holds; any other f is minimised numerically.
        level: interval coverage (default: the fit's).

    Returns:
        DataFrame with columns C, N_opt, D_opt, loss_opt and, when the fit was bootstrapped, ``*_lo`` / ``*_hi``.
        ``attrs["replicates"]`` is the number of finite bootstrap replicates of the fit and ``attrs["diverged"]``
        how many of them have no finite optimum at some budget (they are left out of the intervals).
    """
    if fit.form != "chinchilla":
        raise ValueError(f"compute_optimal needs a chinchilla fit, got {fit.form!r}")
    fpt = flops_per_token or six_n
    C = np.atleast_1d(np.asarray(C, dtype=float))
    rows = [_optimal_one(fit, c, fpt) for c in C]
    out = pd.DataFrame(rows, columns=["N_opt", "D_opt", "loss_opt"])
    out.insert(0, "C", C)
    if fit.samples is not None and len(fit.samples):
        per_sample = np.array(
            [[_optimal_one(p, c, fpt) for c in C] for p in fit.samples.to_dict("records")]
        )  # (R, m, 3)
        finite = np.isfinite(per_sample).all(axis=(1, 2))
        out.attrs["replicates"], out.attrs["diverged"] = len(per_sample), int((~finite).sum())
        if finite.any():
            for j, name in enumerate(["N_opt", "D_opt", "loss_opt"]):
                lo, hi = percentile_interval(per_sample[finite, :, j], fit.percentile_level(level), axis=0)
                out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    return out


def extrapolate(
    fit: FitResult,
    x=None,
    *,
    N=None,
    D=None,
    C=None,
    flops_per_token: Callable | None = None,
    level: float | None = None,
) -> pd.DataFrame:
    """Predict a fitted law beyond the data, with a bootstrap interval.

    * one-variable forms: ``extrapolate(fit, x)``;
    * chinchilla: ``N`` and ``D`` (loss of that model trained on that many tokens), ``N`` alone (trained
      compute-optimally: the D whose compute-optimal N is N), or ``C`` alone (compute-optimal N and D).

    Returns:
        DataFrame with the inputs, the prediction (``y`` or ``loss``) and ``*_lo`` / ``*_hi`` when bootstrapped.
    """
    has_samples = fit.samples is not None and len(fit.samples)
    if fit.form in ("power_law", "saturating"):
        if x is None:
            raise TypeError(f"a {fit.form} fit extrapolates to x")
        x = np.atleast_1d(np.asarray(x, dtype=float))
        out = pd.DataFrame({"x": x, "y": fit.predict(x)})
        if has_samples:
            out["y_lo"], out["y_hi"] = fit.predict_interval(x, level=level)
        return out
    fpt = flops_per_token or six_n
    if C is not None:
        return compute_optimal(fit, C, fpt, level)
    if N is None:
        raise TypeError("a chinchilla fit extrapolates to N (and optionally D) or to C")
    N = np.atleast_1d(np.asarray(N, dtype=float))

    def d_for(p, n):
        if D is not None:
            return np.broadcast_to(np.asarray(D, dtype=float), n.shape)
        # compute-optimal D for this N: invert N_opt(C) on a log grid of C
        return np.array([_d_for_optimal_n(p, ni, fpt) for ni in n])

    D_est = d_for(fit, N)
    out = pd.DataFrame({"N": N, "D": D_est, "loss": fit.predict(N, D_est)})
    if has_samples:
        with np.errstate(all="ignore"):  # a replicate without a finite prediction is NaN: left out below
            preds = np.array([chinchilla_loss(N, d_for(p, N), p["E"], p["A"], p["B"], p["alpha"], p["beta"])
                              for p in fit.samples.to_dict("records")])  # fmt: skip
        preds = np.where(np.isfinite(preds), preds, np.nan)
        out["loss_lo"], out["loss_hi"] = percentile_interval(preds, fit.percentile_level(level), axis=0)
    return out


def _d_for_optimal_n(p, N: float, fpt: Callable) -> float:
    def gap(log_C):
        return math.log(_optimal_one(p, math.exp(log_C), fpt)[0]) - math.log(N)

    lo, hi = math.log(float(fpt(N)) * 1.0), math.log(float(fpt(N)) * 1e20)
    try:
        log_C = optimize.brentq(gap, lo, hi, xtol=1e-10)
    except (ValueError, RuntimeError):  # no sign change (or NaN): this law never makes N compute-optimal
        return np.nan
    return math.exp(log_C) / float(fpt(N))


# ----------------------------------------------------------------------------------------------------------------------
# frontier and IsoFLOP


def compute_frontier(
    history: pd.DataFrame, metric: str = "val/L_mean", run_ids=None, bins: int | None = 60
) -> pd.DataFrame:
    """Lower envelope of a metric against training compute over every run's history.

    A point is on the frontier when no point of any run reached a lower value with less or equal compute (a running
    minimum over compute). ``bins`` thins the frontier to the last point of each of that many log-spaced compute bins
    so that a densely logged stretch does not dominate a fit (None keeps every point).

    Args:
        history: long frame with ``run_id, step, compute, metric, value`` (compute in PFLOPs).
        metric: metric name.
        run_ids: runs to consider (e.g. the usable ones); None: all.
        bins: number of log-spaced bins, or None.

    Returns:
        DataFrame with columns compute, value, run_id, step sorted by compute.
    """
    rows = history[history["metric"] == metric]
    if run_ids is not None:
        rows = rows[rows["run_id"].isin(list(run_ids))]
    rows = rows[np.isfinite(rows["value"]) & np.isfinite(rows["compute"]) & (rows["compute"] > 0)]
    columns = ["compute", "value", "run_id", "step"]
    if not len(rows):
        return pd.DataFrame(columns=columns)
    rows = rows.sort_values(["compute", "value"], kind="stable")
    values = rows["value"].to_numpy()
    previous_min = np.r_[np.inf, np.minimum.accumulate(values)[:-1]]
    front = rows[values < previous_min][columns].copy()
    front["run_id"] = front["run_id"].astype(str)
    if bins and len(front) > bins:
        edges = np.geomspace(front["compute"].min(), front["compute"].max() * (1 + 1e-12), bins + 1)
        which = np.clip(np.searchsorted(edges, front["compute"].to_numpy(), side="right") - 1, 0, bins - 1)
        front = front.groupby(which).tail(1)
    return front.reset_index(drop=True)


def isoflop_minima(
    runs: pd.DataFrame,
    history: pd.DataFrame | None = None,
    metric: str = "val/L_mean",
    *,
    budgets=None,
    params_column: str = "params_total",
    rtol: float = 0.05,
    min_sizes: int = 3,
) -> pd.DataFrame:
    """Loss-optimal model size at fixed compute budgets (IsoFLOP profiles), by a parabola in log N.

    Without ``budgets``, runs whose final compute agrees within ``rtol`` share a budget (an IsoFLOP sweep). With
    ``budgets`` (PFLOPs) and a history, every run whose history spans the budget contributes its metric interpolated
    (log-log) at that compute.

    Returns:
        DataFrame with columns compute (PFLOPs), n_runs, N_opt, loss_opt, method (``parabola`` when the vertex lies
        inside the sizes tried, else ``min``: the best run); empty when no budget has ``min_sizes`` distinct sizes.
    """
    points = []  # (budget, N, value)
    if budgets is None:
        final = f"final:{metric}"
        if final not in runs.columns:
            raise KeyError(f"runs frame has no column {final!r}")
        frame = runs[[params_column, "compute_pflops", final]].astype(float).dropna()
        frame = frame[(frame[params_column] > 0) & (frame["compute_pflops"] > 0)].sort_values("compute_pflops")
        log_c = np.log(frame["compute_pflops"].to_numpy())
        cluster = np.r_[0, np.cumsum(np.diff(log_c) > math.log1p(rtol))] if len(log_c) else np.zeros(0, int)
        for k in np.unique(cluster):
            sel = frame[cluster == k]
            budget = float(np.exp(np.log(sel["compute_pflops"]).mean()))
            points += [(budget, n, v) for n, v in zip(sel[params_column], sel[final])]
    else:
        if history is None:
            raise ValueError("isoflop_minima with explicit budgets needs the history frame")
        rows = history[(history["metric"] == metric) & np.isfinite(history["value"]) & (history["compute"] > 0)]
        sizes = runs.set_index("run_id")[params_column].astype(float)
        for run_id, part in rows.groupby("run_id", observed=True):
            if run_id not in sizes.index or not np.isfinite(sizes[run_id]):
                continue
            part = part.sort_values("compute")
            c, v = part["compute"].to_numpy(), part["value"].to_numpy()
            for budget in np.atleast_1d(budgets):
                if c[0] <= budget <= c[-1] and np.all(v > 0):
                    value = float(np.exp(np.interp(np.log(budget), np.log(c), np.log(v))))
                    points.append((float(budget), float(sizes[run_id]), value))
    out = []
    frame = pd.DataFrame(points, columns=["compute", "N", "value"])
    for budget, part in frame.groupby("compute"):
        part = part.groupby("N", as_index=False)["value"].min()
        if len(part) < min_sizes:
            continue
        lN = np.log(part["N"].to_numpy())
        v = part["value"].to_numpy()
        c2, c1, c0 = np.polyfit(lN, v, 2)
        method, N_opt, loss_opt = "min", float(part["N"].iloc[np.argmin(v)]), float(v.min())
        if c2 > 0:
            vertex = -c1 / (2 * c2)
            if lN.min() <= vertex <= lN.max():
                method, N_opt, loss_opt = "parabola", float(np.exp(vertex)), float(c0 + c1 * vertex + c2 * vertex**2)
        out.append({"compute": budget, "n_runs": len(part), "N_opt": N_opt, "loss_opt": loss_opt, "method": method})
    return pd.DataFrame(out, columns=["compute", "n_runs", "N_opt", "loss_opt", "method"])


__all__ = [
    "CHINCHILLA_GRID",
    "DEFINING_PARAMS",
    "DivergedFitError",
    "FitResult",
    "FlopsPerToken",
    "HUBER_DELTA",
    "InsufficientDataError",
    "chinchilla_loss",
    "chinchilla_objective",
    "compute_frontier",
    "compute_optimal",
    "extrapolate",
    "fit_chinchilla",
    "fit_power_law",
    "fit_saturating",
    "isoflop_minima",
    "interval_caveat",
    "interval_level",
    "percentile_interval",
    "power_law",
    "saturating",
    "six_n",
]
