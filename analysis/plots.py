"""Scaling plots (matplotlib), each saved as PNG and SVG.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot, no GUI backend): they render with Agg
in scripts, on clusters and in tests, and a notebook still shows them inline. Every axis is log-log, every fitted law
is drawn over its data (and a little beyond) with the law and its Pearson r in the legend.

* :func:`plot_metric_vs` (the generic one) / :func:`plot_loss_vs_params`: final value per run against parameters;
* :func:`plot_loss_vs_compute`: every run's curve against training compute plus the compute-optimal frontier;
* :func:`plot_error_vs_params`: token error rate ``1 - acc`` against parameters;
* :func:`plot_fid`: FID against parameters or compute (optionally with the paper's reported FIDs);
* :func:`plot_scale_losses`: loss of each scale (1x1 ... 16x16) against depth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors
from matplotlib import ticker as mticker
from matplotlib.figure import Figure

from analysis.fit import FitResult

AXIS_LABELS = {
    "params_total": "parameters N",
    "params_blocks": "block parameters",
    "compute_pflops": "training compute C (PFLOPs)",
    "tokens_seen": "training tokens D",
    "depth": "depth",
}
_MARKERS = ("o", "s", "^", "D", "v", "P")


def new_figure(width: float = 6.4, height: float = 4.6) -> tuple[Figure, object]:
    """A figure with one log-log axis and a light grid."""
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.25)
    return fig, ax


#: mantissas of labelled ticks on a short log axis, coarse to fine: the first set that covers the axis is used
_TICK_MANTISSAS = (
    (1.0,),
    (1.0, 3.0),
    (1.0, 2.0, 5.0),
    (1.0, 2.0, 3.0, 5.0),
    tuple(float(m) for m in range(1, 10)),
    (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0),
)
#: a log axis spanning fewer decades than this gets plain labelled ticks (matplotlib labels only whole decades)
_SHORT_LOG_DECADES = 2.0


def _tick_label(value: float, _pos=None) -> str:
    """Plain numbers where they read well (0.7, 2, 150), scientific notation otherwise (2e-05, 3e+06)."""
    return f"{value:g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3g}"


def _short_log_ticks(lo: float, hi: float, minimum: int = 4) -> np.ndarray:
    """Tick values for a log axis from lo to hi (less than ~2 decades).

    The coarsest 1-2-5-like set with at least ``minimum`` ticks inside and no stretch of the axis (in log, ends
    included) over a third of it without a tick; ticks closer than a tenth of the axis are thinned. An axis too
    short for any set (e.g. FID 245..280) gets evenly spaced nice ticks.
    """
    span = math.log10(hi / lo)
    decades = np.arange(np.floor(np.log10(lo)) - 1, np.ceil(np.log10(hi)) + 1)
    for mantissas in _TICK_MANTISSAS:
        ticks = np.array([m * 10.0**d for d in decades for m in mantissas])
        inside = ticks[(ticks >= lo * (1 - 1e-9)) & (ticks <= hi * (1 + 1e-9))]
        if len(inside) < minimum:
            continue
        gaps = np.diff(np.log10(np.r_[lo, inside, hi]))
        if gaps.max() <= span / 3:
            kept = [inside[0]]  # the finer sets crowd the top of each decade: thin to a tenth of the axis
            for tick in inside[1:]:
                if math.log10(tick / kept[-1]) >= span / 10 * (1 - 1e-9):
                    kept.append(tick)
            return np.array(kept)
    for bins in (4, 5, 6, 8):
        ticks = mticker.MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        inside = ticks[(ticks >= lo) & (ticks <= hi) & (ticks > 0)]
        if len(inside) >= 3:
            break
    return inside


def _plain_ticks(ax) -> None:
    """Readable ticks on every log axis spanning less than ~2 decades.

    Matplotlib labels a log axis at whole decades only (and NullFormats the minor ticks once the axis spans more
    than a decade), so a loss axis from 0.6 to 3 shows the single label "1", and one from 0.2 to 0.6 none at all.
    Such an axis gets labelled ticks at 1-2-5-like values (or evenly spaced ones when it is shorter still) written
    as plain numbers; ticks placed by the caller (a FixedLocator, e.g. one tick per depth) keep their places and
    get the plain labels. Longer axes keep matplotlib's decade ticks.
    """
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        lo, hi = min(lo, hi), max(lo, hi)
        if axis.get_scale() != "log" or not (lo > 0 and np.isfinite(hi)) or hi / lo >= 10**_SHORT_LOG_DECADES:
            continue
        if not isinstance(axis.get_major_locator(), mticker.FixedLocator):
            ticks = _short_log_ticks(lo, hi)
            if len(ticks) < 2:
                continue
            axis.set_major_locator(mticker.FixedLocator(ticks))
        axis.set_major_formatter(mticker.FuncFormatter(_tick_label))
        axis.set_minor_formatter(mticker.NullFormatter())


def save_figure(fig: Figure, out_dir: str | Path, name: str, dpi: int = 150) -> list[Path]:
    """Write ``<out_dir>/<name>.png`` and ``.svg``; returns both paths."""
    for ax in fig.axes:
        _plain_ticks(ax)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    return paths


def _size_colors(values: np.ndarray):
    """value -> viridis colour on a log scale of the finite positive values (sizes)."""
    finite = values[np.isfinite(values) & (values > 0)]
    if not len(finite):
        return lambda v: "C0"
    norm = colors.LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001))
    cmap = matplotlib.colormaps["viridis"]
    return lambda v: cmap(0.9 * norm(v)) if np.isfinite(v) and v > 0 else "grey"


def _fit_line(ax, fit: FitResult, x_lo: float, x_hi: float, color, x_name: str, y_name: str, extend: float = 1.5):
    """Draw a one-variable fit from x_lo / extend to x_hi * extend, with its bootstrap band when available."""
    xs = np.geomspace(x_lo / extend, x_hi * extend, 200)
    ys = fit.predict(xs)
    ax.plot(xs, ys, "--", color=color, lw=1.5, label=fit.label(x_name, y_name))
    if fit.samples is not None and len(fit.samples):
        lo, hi = fit.predict_interval(xs)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.12, lw=0)


def plot_metric_vs(
    runs: pd.DataFrame,
    x_column: str,
    series: Sequence[tuple[str, np.ndarray | pd.Series]],
    fits: Sequence[FitResult | None] = (),
    *,
    x_name: str = "N",
    y_label: str = "",
    title: str = "",
    x_scale: float = 1.0,
) -> Figure:
    """Scatter of per-run values against a runs column, one series per metric, each with its fitted law.

    Args:
        runs: runs frame (rows aligned with every series).
        x_column: runs column on the x axis (``params_total``, ``compute_pflops``, ...).
        series: (label, values (n_runs,)) pairs.
        fits: one fit (or None) per series, fitted on ``x_column * x_scale``.
        x_name: symbol of x in the legend's law.
        y_label: y axis label.
        title: figure title.
        x_scale: factor applied to x before plotting (e.g. 1e-9 for billions), matching the fits.
    """
    fig, ax = new_figure()
    x = runs[x_column].to_numpy(dtype=float) * x_scale
    for i, (label, values) in enumerate(series):
        y = np.asarray(values, dtype=float)
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        color = f"C{i}"
        ax.scatter(x[ok], y[ok], color=color, marker=_MARKERS[i % len(_MARKERS)], s=28, zorder=3, label=label)
        fit = fits[i] if i < len(fits) else None
        if fit is not None and ok.any():
            _fit_line(ax, fit, x[ok].min(), x[ok].max(), color, x_name, label.split(" ")[0])
    unit = ""
    if x_scale == 1e-9 and x_column.startswith("params"):
        unit = " (billions)"
    elif x_scale != 1:
        unit = f" (x{x_scale:g})"
    ax.set_xlabel(AXIS_LABELS.get(x_column, x_column) + unit)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_loss_vs_params(
    runs: pd.DataFrame,
    metrics: Sequence[str] = ("val/L_mean", "val/L_tail"),
    fits: Sequence[FitResult | None] = (),
    *,
    params_column: str = "params_total",
    irreducible: float | None = None,
    title: str = "Loss vs parameters",
) -> Figure:
    """Final loss of every run against its parameter count, with the fitted laws (``fits`` aligned with metrics)."""
    series = []
    for metric in metrics:
        values = runs[f"final:{metric}"].to_numpy(dtype=float)
        if irreducible is not None:
            values = values - irreducible
        series.append((metric, values))
    ylabel = "reducible loss L - E (nats)" if irreducible is not None else "loss (nats)"
    return plot_metric_vs(runs, params_column, series, fits, x_name="N", y_label=ylabel, title=title)


def plot_error_vs_params(
    runs: pd.DataFrame,
    metrics: Sequence[str] = ("val/acc_mean", "val/acc_tail"),
    fits: Sequence[FitResult | None] = (),
    *,
    params_column: str = "params_total",
    title: str = "Token error rate vs parameters",
) -> Figure:
    """Token error ``1 - acc`` (final) against parameters."""
    series = [(metric.replace("acc", "err"), 1.0 - runs[f"final:{metric}"].to_numpy(dtype=float)) for metric in metrics]
    return plot_metric_vs(runs, params_column, series, fits, x_name="N", y_label="token error rate", title=title)


def plot_fid(
    runs: pd.DataFrame,
    fit: FitResult | None = None,
    *,
    x_column: str = "params_total",
    metric: str = "eval/fid",
    x_scale: float = 1.0,
    reference: pd.DataFrame | None = None,
    reference_fit: FitResult | None = None,
    title: str = "",
) -> Figure:
    """FID (final) against parameters or compute.

    Args:
        runs: runs frame with ``final:<metric>``.
        fit: law fitted on ``x_column * x_scale``.
        x_column: ``params_total`` or ``compute_pflops``.
        metric: FID metric name.
        x_scale: factor on x (1e-9: parameters in billions).
        reference: the paper's reported FIDs, columns ``N`` (already times x_scale) and ``fid``.
        reference_fit: law fitted on the reference.
        title: figure title.
    """
    x_name = "N" if x_column.startswith("params") else "C"
    fig = plot_metric_vs(
        runs, x_column, [(metric, runs[f"final:{metric}"])], [fit], x_name=x_name, x_scale=x_scale,
        y_label="FID", title=title or f"FID vs {AXIS_LABELS.get(x_column, x_column)}",
    )  # fmt: skip
    if reference is not None and x_name == "N":
        ax = fig.axes[0]
        ax.scatter(reference["N"], reference["fid"], marker="*", s=80, color="crimson", zorder=4,
                   label="paper (ImageNet 256)")  # fmt: skip
        if reference_fit is not None:
            _fit_line(ax, reference_fit, reference["N"].min(), reference["N"].max(), "crimson", "N", "paper FID", 1.2)
        ax.legend(fontsize=7, loc="best")
    return fig


def plot_loss_vs_compute(
    history: pd.DataFrame,
    runs: pd.DataFrame,
    metric: str = "val/L_mean",
    frontier: pd.DataFrame | None = None,
    fit: FitResult | None = None,
    *,
    params_column: str = "params_total",
    irreducible: float | None = None,
    title: str = "",
) -> Figure:
    """Every run's curve of ``metric`` against training compute, coloured by size, with the frontier and its law.

    Args:
        history: long frame (``run_id, step, compute, metric, value``), compute in PFLOPs.
        runs: runs frame (sizes for colours, names for the legend); only these runs are drawn.
        metric: metric name.
        frontier: output of :func:`analysis.fit.compute_frontier`, drawn as black points and a step envelope.
        fit: law fitted on the frontier.
        irreducible: subtracted from every value when given (reducible loss).
    """
    fig, ax = new_figure(7.0, 4.8)
    rows = history[(history["metric"] == metric) & history["run_id"].isin(runs["run_id"])]
    sizes = runs.set_index("run_id")[params_column].astype(float)
    color_of = _size_colors(sizes.to_numpy())
    shift = irreducible or 0.0
    labelled: set = set()
    for run_id, part in rows.groupby("run_id", observed=True):
        part = part[(part["compute"] > 0) & np.isfinite(part["value"])].sort_values("step")
        if not len(part):
            continue
        size = float(sizes.get(run_id, np.nan))
        label = None
        if np.isfinite(size) and size not in labelled:
            labelled.add(size)
            label = f"N = {size:.3g}"
        ax.plot(part["compute"], part["value"] - shift, color=color_of(size), lw=1.0, alpha=0.85, label=label)
    if frontier is not None and len(frontier):
        c = frontier["compute"].to_numpy(dtype=float)
        v = frontier["value"].to_numpy(dtype=float) - shift
        ax.step(c, v, where="post", color="black", lw=1.2, alpha=0.6)
        ax.scatter(c, v, color="black", s=10, zorder=4, label="compute-optimal frontier")
        if fit is not None:
            _fit_line(ax, fit, c.min(), c.max(), "crimson", "C", "L", extend=3.0)
    ax.set_xlabel(AXIS_LABELS["compute_pflops"])
    ax.set_ylabel(f"{metric}" + (" - E" if irreducible is not None else "") + " (nats)")
    ax.set_title(title or f"{metric} vs training compute")
    ax.legend(fontsize=6, loc="best", ncol=2)
    return fig


def plot_scale_losses(
    runs: pd.DataFrame,
    prefix: str = "val/L_scale_",
    *,
    x_column: str = "depth",
    patch_nums: Sequence[int] | None = None,
    title: str = "Loss per scale vs depth",
) -> Figure:
    """Final loss of each scale k (``<prefix><k>``) against depth; one line per scale, labelled with its side."""
    fig, ax = new_figure(7.0, 4.8)
    columns = sorted(
        (c for c in runs.columns if c.startswith(f"final:{prefix}")), key=lambda c: int(c.rsplit("_", 1)[-1])
    )
    if not columns:
        raise KeyError(f"no final:{prefix}<k> columns in the runs frame")
    frame = runs.groupby(x_column)[columns].mean(numeric_only=True).sort_index()
    x = frame.index.to_numpy(dtype=float)
    cmap = _size_colors(np.arange(1, len(columns) + 1, dtype=float))
    for k, column in enumerate(columns):
        side = patch_nums[k] if patch_nums is not None and k < len(patch_nums) else None
        label = f"scale {k}" + (f" ({side}x{side})" if side else "")
        y = frame[column].to_numpy(dtype=float)
        ok = np.isfinite(y) & (y > 0)
        ax.plot(x[ok], y[ok], marker="o", ms=3, color=cmap(k + 1.0), label=label)
    if 0 < len(x) <= 12 and np.all(x > 0):  # one labelled tick per depth (a log axis labels only decades)
        ax.xaxis.set_major_locator(mticker.FixedLocator(x))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(_tick_label))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.set_xlabel(AXIS_LABELS.get(x_column, x_column))
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="best", ncol=2)
    return fig


__all__ = [
    "new_figure",
    "plot_error_vs_params",
    "plot_fid",
    "plot_loss_vs_compute",
    "plot_loss_vs_params",
    "plot_metric_vs",
    "plot_scale_losses",
    "save_figure",
]
