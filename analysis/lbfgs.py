"""A batched L-BFGS: thousands of independent starts of one smooth objective advanced together (NumPy).

The Chinchilla fit (:func:`analysis.fit.fit_chinchilla`) runs L-BFGS from the 4,500 points of Hoffmann et al.'s
grid; its objective and gradient are vectorised over starts, so one call of ``fg`` evaluates every start that is still
active, and each start keeps its own memory, direction and weak-Wolfe step. The best distinct optima are then polished
with SciPy's L-BFGS-B (:func:`scipy_lbfgs`), so a reported optimum is always a converged SciPy result.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import optimize


def batched_lbfgs(
    fg: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    x0: np.ndarray,
    memory: int = 10,
    max_iter: int = 1000,
    gtol: float = 1e-9,
    ftol: float = 1e-10,
    max_line_search: int = 40,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-BFGS on many independent starts at once (each start has its own memory, direction and step).

    Args:
        fg: (theta (S', P), index (S',)) -> (f (S',), grad (S', P)) for any subset of starts (``index`` says which
            starts the rows are, for objectives that differ per start).
        x0: (S, P) starting points.

    Returns:
        x (S, P), f (S,), iterations (S,).
    """
    x = np.array(x0, dtype=np.float64)
    S, P = x.shape
    f, g = fg(x, np.arange(S))
    s_mem = np.zeros((S, memory, P))
    y_mem = np.zeros((S, memory, P))
    rho = np.zeros((S, memory))
    gamma = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1.0)  # first step: unit length at most
    iters = np.zeros(S, np.int64)
    active = np.isfinite(f) & (np.abs(g).max(1) > gtol)
    c1, c2 = 1e-4, 0.9
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        gi, xi, fi = g[idx], x[idx], f[idx]
        # two-loop recursion over the slots written in the last min(it, memory) iterations (all active starts were
        # active then too; a slot a start rejected has rho = 0 and drops out)
        slots = [(it - 1 - j) % memory for j in range(min(it, memory))]
        q = gi.copy()
        alphas = {}
        for slot in slots:
            alphas[slot] = rho[idx, slot] * np.einsum("sp,sp->s", s_mem[idx, slot], q)
            q -= alphas[slot][:, None] * y_mem[idx, slot]
        d = gamma[idx, None] * q
        for slot in reversed(slots):
            beta = rho[idx, slot] * np.einsum("sp,sp->s", y_mem[idx, slot], d)
            d += s_mem[idx, slot] * (alphas[slot] - beta)[:, None]
        d = -d
        slope = np.einsum("sp,sp->s", gi, d)
        uphill = ~(slope < 0)
        if uphill.any():  # memory gone stale: fall back to steepest descent
            d[uphill] = -gi[uphill] * gamma[idx[uphill], None]
            slope[uphill] = np.einsum("sp,sp->s", gi[uphill], d[uphill])
        # weak Wolfe line search by bracketing (expand while the slope is still steep, bisect when the decrease is
        # too small), every start with its own step; Armijo-only backtracking crawls in the long flat valleys
        # that the Huber loss makes far from the optimum
        step = np.ones(len(idx))
        low = np.zeros(len(idx))
        high = np.full(len(idx), np.inf)
        x_new, f_new, g_new = xi.copy(), fi.copy(), gi.copy()
        accepted = np.zeros(len(idx), bool)
        pending = np.arange(len(idx))
        for _ in range(max_line_search):
            trial = xi[pending] + step[pending, None] * d[pending]
            ft, gt = fg(trial, idx[pending])
            armijo = np.isfinite(ft) & (ft <= fi[pending] + c1 * step[pending] * slope[pending])
            steep = np.einsum("sp,sp->s", gt, d[pending]) < c2 * slope[pending]
            # any Armijo point is a fallback in case the bracket collapses
            better = armijo & (ft < f_new[pending])
            keep = pending[better]
            x_new[keep], f_new[keep], g_new[keep] = trial[better], ft[better], gt[better]
            accepted[keep] = True
            wolfe = armijo & ~steep
            shrink = ~armijo
            grow = armijo & steep
            high[pending[shrink]] = step[pending[shrink]]
            low[pending[grow]] = step[pending[grow]]
            pending = pending[~wolfe]
            if not pending.size:
                break
            finite_high = np.isfinite(high[pending])
            step[pending] = np.where(finite_high, 0.5 * (low[pending] + high[pending]), 2.0 * low[pending])
        s = x_new - xi
        yv = g_new - gi
        sy = np.einsum("sp,sp->s", s, yv)
        slot = it % memory
        store = accepted & (sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(yv, axis=1)) & (sy > 0)
        s_mem[idx, slot] = np.where(store[:, None], s, 0.0)
        y_mem[idx, slot] = np.where(store[:, None], yv, 0.0)
        rho[idx, slot] = np.where(store, 1.0 / np.where(store, sy, 1.0), 0.0)
        yy = np.einsum("sp,sp->s", yv, yv)
        gamma[idx[store]] = sy[store] / yy[store]
        x[idx], f[idx], g[idx] = x_new, f_new, g_new
        iters[idx] += 1
        decrease = fi - f_new
        converged = (
            ~accepted
            | (np.abs(g_new).max(1) <= gtol)
            | (decrease <= ftol * np.maximum(np.maximum(np.abs(fi), np.abs(f_new)), 1e-300))
        )
        active[idx[converged]] = False
    return x, f, iters


def scipy_lbfgs(fg1: Callable, x0: np.ndarray, max_iter: int = 10000) -> optimize.OptimizeResult:
    """SciPy L-BFGS-B at tight tolerances (the objective is a sum of tiny Huber terms: scale-free stopping)."""
    return optimize.minimize(
        fg1, x0, jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "maxfun": 4 * max_iter, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20},
    )  # fmt: skip


def distinct_best(x: np.ndarray, f: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best starts whose optima differ (rounded to 3 decimals)."""
    order = np.argsort(np.where(np.isfinite(f), f, np.inf))
    seen, chosen = set(), []
    for i in order:
        if not np.isfinite(f[i]):
            break
        key = tuple(np.round(x[i], 3))
        if key in seen:
            continue
        seen.add(key)
        chosen.append(i)
        if len(chosen) == k:
            break
    return np.array(chosen, dtype=np.int64)
