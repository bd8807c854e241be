"""Scaling-law fits: planted laws recovered, bootstrap coverage, approach-3 optimiser, frontier and IsoFLOP."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize

from analysis import fit as F
from analysis.runs import AnalysisWarning
from analysis.synthetic import PlantedLaw, chinchilla_sample

CHINCHILLA_TRUTH = PlantedLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_grid_is_the_full_approach3_grid():
    grid = F.CHINCHILLA_GRID
    # alpha, beta in 0..2 step .5 (5 each), e in -1..1 step .5 (5), a, b in 0..25 step 5 (6 each)
    assert grid.shape == (5 * 5 * 5 * 6 * 6, 5) == (4500, 5)
    assert sorted(set(grid[:, 3])) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert sorted(set(grid[:, 2])) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert sorted(set(grid[:, 0])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    assert len(np.unique(grid, axis=0)) == len(grid)


def test_power_law_recovers_planted_exponent_under_noise():
    rng = np.random.default_rng(1)
    x = np.geomspace(0.02, 2.0, 20)  # billions of parameters, as in the paper
    y = (2.0 * x) ** -0.23 * np.exp(rng.normal(0, 0.01, x.size))
    result = F.fit_power_law(x, y)
    assert _relative(result["b"], -0.23) < 0.02
    assert _relative(result["a"], 2.0) < 0.10
    assert result["r"] < -0.99
    assert isinstance(result, dict) and result["form"] == "power_law"
    assert "r = " in result.label("N", "L")


def test_a_nearly_flat_power_law_stays_finite_and_readable():
    # FID at toy scale: y ~ 250 N^-0.004; the paper's a = c^(1/b) underflows to 0, the c x^b form does not
    x = np.geomspace(1e-4, 1e-2, 6)
    y = 250.0 * x**-0.004 * np.exp(np.random.default_rng(0).normal(0, 1e-4, 6))
    with np.errstate(all="raise"):
        result = F.fit_power_law(x, y, bootstrap=50)
    assert result["b"] == pytest.approx(-0.004, abs=2e-4)
    assert result["c"] == pytest.approx(250.0, rel=1e-2)
    np.testing.assert_allclose(result.predict(x), y, rtol=1e-3)
    assert result.label("N", "FID").startswith("FID = 250 N^-0.004")


def test_saturating_law_recovers_planted_parameters_under_noise():
    rng = np.random.default_rng(2)
    x = np.geomspace(1e6, 1e10, 16)
    y = (1.8 + 300.0 * x**-0.3) * np.exp(rng.normal(0, 0.002, x.size))
    result = F.fit_saturating(x, y)
    assert _relative(result["alpha"], 0.3) < 0.02
    assert _relative(result["E"], 1.8) < 0.02
    assert _relative(result["A"], 300.0) < 0.15
    assert result["r"] < -0.99


def test_saturating_with_fixed_irreducible_is_the_power_law_of_the_reducible_part():
    x = np.geomspace(1e6, 1e9, 10)
    y = 2.0 + 50.0 * x**-0.25
    result = F.fit_saturating(x, y, E=2.0)
    assert result["E"] == 2.0
    assert _relative(result["alpha"], 0.25) < 1e-6
    assert _relative(result["A"], 50.0) < 1e-5


def test_chinchilla_objective_gradient_matches_finite_differences():
    N, D, L = chinchilla_sample(60, CHINCHILLA_TRUTH, noise=0.01, seed=3)
    lN, lD, lL = np.log(N), np.log(D), np.log(L)
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 3, size=len(N)).astype(float)
    for theta in [np.array([6.0, 6.0, 0.5, 0.34, 0.28]), np.array([3.0, 9.0, -0.5, 0.8, 0.4])]:
        for w in (None, weights):

            def f(t, w=w):
                return F.chinchilla_objective(t[None], lN, lD, lL, w)[0][0]

            analytic = F.chinchilla_objective(theta[None], lN, lD, lL, w)[1][0]
            numeric = optimize.approx_fprime(theta, f, 1e-7)
            np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-8)


@pytest.fixture(scope="module")
def planted_fit():
    N, D, L = chinchilla_sample(120, CHINCHILLA_TRUTH, noise=0.002, seed=4)
    return F.fit_chinchilla(N, D, L)


@pytest.mark.slow
def test_chinchilla_recovers_planted_law(planted_fit):
    result = planted_fit
    assert result["n_starts"] == 4500
    assert _relative(result["alpha"], 0.34) < 0.02
    assert _relative(result["beta"], 0.28) < 0.02
    assert _relative(result["E"], 1.69) < 0.01
    assert _relative(result["A"], 406.4) < 0.10
    assert _relative(result["B"], 410.7) < 0.10
    # derived quantities are consistent with the fitted parameters
    assert result["a_opt"] == pytest.approx(result["beta"] / (result["alpha"] + result["beta"]))


@pytest.mark.slow
def test_batched_lbfgs_finds_the_same_optimum_as_scipy_from_every_start():
    N, D, L = chinchilla_sample(80, CHINCHILLA_TRUTH, noise=0.01, seed=5)
    starts = F.CHINCHILLA_GRID[np.random.default_rng(0).choice(len(F.CHINCHILLA_GRID), 60, replace=False)]
    batched = F.fit_chinchilla(N, D, L, starts=starts, method="batched", workers=1)
    scipy_every = F.fit_chinchilla(N, D, L, starts=starts, method="scipy", workers=1)
    assert batched["objective"] <= scipy_every["objective"] * (1 + 1e-9)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert _relative(batched[name], scipy_every[name]) < 1e-4


@pytest.mark.slow
def test_chinchilla_bootstrap_intervals_contain_truth():
    N, D, L = chinchilla_sample(80, CHINCHILLA_TRUTH, noise=0.005, seed=6)
    result = F.fit_chinchilla(N, D, L, bootstrap=40, seed=0, workers=1)
    assert result["bootstrap"] == 40
    for name in ("E", "alpha", "beta"):
        lo, hi = result[f"{name}_ci"]
        assert lo <= getattr(CHINCHILLA_TRUTH, name) <= hi, name
        assert lo <= result[name] <= hi
    for name in ("A", "B", "a_opt", "b_opt", "G"):
        assert f"{name}_ci" in result


@pytest.mark.parametrize("n_runs", [10, 40])
def test_bootstrap_interval_coverage_of_power_law_exponent(n_runs):
    # 95% intervals should contain the truth in at least 90% of 50 independent synthetic studies, also with few runs
    # (where the plain percentile interval is too narrow: see the "percentile" check below)
    x = np.geomspace(0.01, 3.0, n_runs)
    covered = covered_plain = 0
    for trial in range(50):
        noise = np.random.default_rng(trial).normal(0, 0.02, x.size)
        y = (2.5 * x) ** -0.2 * np.exp(noise)
        result = F.fit_power_law(x, y, bootstrap=1000, seed=trial)
        lo, hi = result["b_ci"]
        covered += lo <= -0.2 <= hi
        lo_plain, hi_plain = F.percentile_interval(result.samples["b"], 0.95)
        covered_plain += lo_plain <= -0.2 <= hi_plain
        assert lo <= lo_plain and hi_plain <= hi  # the expanded interval contains the plain one
    assert covered >= 45, f"coverage {covered}/50"
    assert covered >= covered_plain


def test_expanded_interval_level():
    # g runs, p parameters: z' = sqrt(g / (g - p)) t_{g-p}
    assert F.interval_level(0.95, 10, 2) == pytest.approx(0.9901, abs=1e-4)
    assert F.interval_level(0.95, 1000, 2) == pytest.approx(0.95, abs=1e-3)
    assert F.interval_level(0.95, 3, 5) == 0.95  # too few runs: plain percentile
    assert F.interval_level(0.95, 10, 2, "percentile") == 0.95


def test_paper_fid_table_refit_reports_r():
    # docs/var_reference.md: d16 310M 3.30, d20 600M 2.57, d24 1.0B 2.09, d30 2.0B 1.92
    N = np.array([0.31, 0.6, 1.0, 2.0])
    fid = np.array([3.30, 2.57, 2.09, 1.92])
    result = F.fit_power_law(N, fid, bootstrap=200)
    slope, intercept = np.polyfit(np.log(N), np.log(fid), 1)
    assert result["b"] == pytest.approx(slope)
    assert result["a"] == pytest.approx(np.exp(intercept / slope))
    assert result["r"] == pytest.approx(np.corrcoef(np.log(N), np.log(fid))[0, 1])
    assert -1 < result["r"] < -0.95
    assert "r = -0.97" in result.label("N", "FID")
    lo, hi = result["b_ci"]
    assert lo < result["b"] < hi


def test_nan_points_are_dropped_with_a_warning():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    y = 3.0 * x**-0.5
    y_bad = y.copy()
    y_bad[2] = np.nan
    x_bad = x.copy()
    x_bad[4] = -1.0
    with pytest.warns(AnalysisWarning, match="dropped 2 of 6 points"):
        result = F.fit_power_law(x_bad, y_bad)
    clean = F.fit_power_law(np.delete(x, [2, 4]), np.delete(y, [2, 4]))
    assert result["b"] == pytest.approx(clean["b"])
    assert result["n_points"] == 4


def test_too_few_points_raise_a_clear_error():
    with pytest.raises(F.InsufficientDataError, match="at least 4 usable points"):
        F.fit_saturating([1.0, 2.0, 3.0], [3.0, 2.0, 1.5])
    with pytest.raises(F.InsufficientDataError, match="distinct values of D"):
        F.fit_chinchilla(np.geomspace(1e7, 1e9, 8), np.full(8, 1e10), np.linspace(3, 2, 8))
    with pytest.raises(ValueError, match="y has 2 values"):
        F.fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0])


def test_bootstrap_resamples_whole_runs():
    groups = np.array(["a", "a", "b", "b", "b", "c"])
    weights = F._bootstrap_weights(groups, 200, np.random.default_rng(0))
    # points of one run always carry the same multiplicity, and every replicate draws 3 runs
    assert np.all(weights[:, 0] == weights[:, 1])
    assert np.all(weights[:, 2] == weights[:, 4])
    assert np.all(weights[:, [0, 2, 5]].sum(1) == 3)


@pytest.mark.slow
def test_compute_optimal_matches_closed_form_under_6nd(planted_fit):
    result = planted_fit
    C = np.array([1e20, 1e22, 1e24])
    table = F.compute_optimal(result, C)
    closed = result["G"] * (C / 6) ** result["a_opt"]
    np.testing.assert_allclose(table["N_opt"], closed, rtol=1e-5)
    np.testing.assert_allclose(table["N_opt"] * table["D_opt"] * 6, C, rtol=1e-9)
    # a model-specific FLOPs-per-token changes D for the same C
    fpt = F.FlopsPerToken([1e7, 1e9], [4.0e7, 4.2e9])
    other = F.compute_optimal(result, C, fpt)
    np.testing.assert_allclose(other["D_opt"] * fpt(other["N_opt"]), C, rtol=1e-9)


def test_extrapolation_has_an_interval():
    x = np.geomspace(0.01, 1.0, 12)
    y = (2.0 * x) ** -0.2 * np.exp(np.random.default_rng(9).normal(0, 0.01, x.size))
    result = F.fit_power_law(x, y, bootstrap=200)
    out = F.extrapolate(result, [2.0, 10.0])
    assert np.all(out["y_lo"] < out["y"]) and np.all(out["y"] < out["y_hi"])
    assert out["y"].iloc[0] == pytest.approx((result["a"] * 2.0) ** result["b"])
    # the interval widens the further the extrapolation goes
    assert (out["y_hi"] - out["y_lo"]).iloc[1] > (out["y_hi"] - out["y_lo"]).iloc[0]


def _history(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    rows = []
    for run_id, (compute, value) in curves.items():
        for step, (c, v) in enumerate(zip(compute, value), start=1):
            rows.append((run_id, step, c, "val/L_mean", v))
    return pd.DataFrame(rows, columns=["run_id", "step", "compute", "metric", "value"])


def test_frontier_is_the_lower_envelope():
    c = np.geomspace(0.01, 10, 30)
    history = _history(
        {"small": (c, 3 + 1 / c**0.3), "big": (4 * c, 2.5 + 3 / c**0.5), "nan": (c, np.full(30, np.nan))}
    )
    front = F.compute_frontier(history, bins=None)
    assert np.all(np.diff(front["value"]) < 0) and np.all(np.diff(front["compute"]) >= 0)
    for _, point in front.iterrows():  # nothing with less compute is lower
        earlier = history[(history["compute"] <= point["compute"]) & history["value"].notna()]
        assert earlier["value"].min() == pytest.approx(point["value"])
    assert set(front["run_id"]) == {"small", "big"}
    assert len(F.compute_frontier(history, bins=5)) <= 5


def test_isoflop_minima_find_the_planted_optimum():
    # at every budget the loss is a parabola in log N with its vertex at N = 1e8
    rows = []
    for budget in (1.0, 10.0):
        for N in np.geomspace(1e7, 1e9, 5):
            rows.append({"run_id": f"{budget}-{N:.0f}", "params_total": N, "compute_pflops": budget * (1 + 0.01),
                         "final:val/L_mean": 3.0 / budget**0.1 + 0.05 * (np.log(N) - np.log(1e8)) ** 2})  # fmt: skip
    table = F.isoflop_minima(pd.DataFrame(rows))
    assert len(table) == 2 and set(table["method"]) == {"parabola"}
    np.testing.assert_allclose(table["N_opt"], 1e8, rtol=1e-6)


def test_batched_lbfgs_solves_many_rosenbrock_starts_at_once():
    """analysis.lbfgs on its own: 200 starts of the 4-d Rosenbrock function, each to the minimum at (1, 1, 1, 1)."""
    from analysis.lbfgs import batched_lbfgs, distinct_best, scipy_lbfgs

    calls = []

    def fg(x, index):
        calls.append(len(index))
        a, b = x[:, :-1], x[:, 1:]
        f = (100 * (b - a**2) ** 2 + (1 - a) ** 2).sum(1)
        g = np.zeros_like(x)
        g[:, :-1] += -400 * a * (b - a**2) - 2 * (1 - a)
        g[:, 1:] += 200 * (b - a**2)
        return f, g

    x0 = np.random.default_rng(0).uniform(-2, 2, (200, 4))
    x, f, iters = batched_lbfgs(fg, x0, max_iter=2000)
    # Rosenbrock in 4-d has a second local minimum near (-0.78, 0.61, 0.38, 0.14); every start ends in one of them.
    at_global = np.abs(x - 1).max(1) < 1e-4
    assert at_global.mean() > 0.7 and np.all(f[at_global] < 1e-8)
    assert max(calls) == 200 and iters.max() < 2000  # one call for all the starts; all of them stopped
    best = distinct_best(x, f, 2)
    assert np.abs(x[best[0]] - 1).max() < 1e-4
    polished = scipy_lbfgs(lambda t: tuple(v[0] for v in fg(t[None], np.arange(1))), x[best[0]])
    assert polished.fun < 1e-12
