"""A whole scaling analysis of a loaded study: fits, plots, CSVs and a markdown report.

:func:`analyze` runs every fit the study supports and writes everything into one folder; parts that the study cannot
support (too few sizes for a two-variable law, no FID logged, ...) are skipped with a note in the report instead of
failing. Every fit, table, plot and report section goes through one :class:`_Recorder`: a part that cannot be made
is a note (what, why, what would make it possible), and a part that fails for any other reason is a note saying it
failed unexpectedly, with its traceback in ``errors.log``; ``report.md`` is always written. Fits carry their caveats
into the report (bootstrap replicates dropped, parameters on a bound, intervals that do not constrain). Units follow
the VAR paper so that fitted laws compare directly with its numbers: N in billions of parameters, C in PFLOPs of
training compute, D in tokens.

Folder layout::

    report.md                       fitted laws with intervals, frontier, IsoFLOP minima, FID table, notes
    runs.csv                        the runs frame (every run, with ``used`` and ``flag``)
    fits.csv                        one row per fit: target, form, parameters, intervals, r, caveats
    frontier_<metric>.csv           compute-optimal frontier points
    isoflop.csv, compute_optimal.csv, extrapolation.csv, fid_by_size.csv
    plots/*.png, plots/*.svg
    errors.log                      only when a part failed unexpectedly: its traceback
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import traceback
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import fit as F
from analysis import plots as P
from analysis.runs import AnalysisWarning, Study, parse_patch_nums, usable_runs

#: the VAR paper's reported FIDs (ImageNet 256, docs/var_reference.md): depth, parameters, FID (paper and README)
PAPER_FID = pd.DataFrame(
    {
        "depth": [16, 20, 24, 30],
        "N": [310e6, 600e6, 1.0e9, 2.0e9],
        "fid": [3.30, 2.57, 2.09, 1.92],
        "fid_readme": [3.55, 2.95, 2.33, 1.97],
    }
)
#: the paper's laws against N in billions (r about -0.998 each)
PAPER_PARAM_LAWS = {
    "L_tail": "(2.0 N)^-0.23",
    "L_mean": "(2.5 N)^-0.20",
    "err_tail": "(4.9e2 N)^-0.016",
    "err_mean": "(6.5e2 N)^-0.010",
}
N_UNIT = 1e9  # fits use N in billions, as the paper


@dataclass
class AnalysisOptions:
    """What :func:`analyze` fits and how."""

    loss_metrics: tuple[str, ...] = ("val/L_mean", "val/L_tail")
    """Loss metrics (final value per run, and histories for the frontier)."""
    error_metrics: tuple[str, ...] | None = None
    """Accuracy metrics whose ``1 - acc`` is fitted; None: val/acc_mean and val/acc_tail, else train/acc_*."""
    fid_metric: str = "eval/fid"
    params_column: str = "params_total"
    """Runs column used as N."""
    irreducible: float | None = None
    """Subtract this irreducible loss before the power-law fits (the paper's reducible loss)."""
    bootstrap: int = 200
    """Bootstrap replicates of the one-variable fits."""
    chinchilla_bootstrap: int = 100
    """Bootstrap replicates of the two-variable fit."""
    chinchilla_points: str = "auto"
    """``final`` (one point per run), ``history`` (points along each run's history), ``auto`` (final when it has
    enough distinct N and D, else history) or ``off``."""
    seed: int = 0
    paper_reference: bool = False
    """Add the paper's FIDs and laws as a reference column."""
    exclude_kinds: tuple[str, ...] = ("tokenizer", "analysis", "sweep")
    holdout_largest: bool = False
    """Ladder-style check: refit every law in N (and the loss frontier in C) without the largest size and predict
    that size's final loss and FID (``holdout.csv`` and a report section)."""


@dataclass
class AnalysisResult:
    out_dir: Path
    runs: pd.DataFrame
    used: pd.DataFrame
    fits: pd.DataFrame
    fit_objects: dict[str, F.FitResult] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: Path | None = None


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def _short(metric: str) -> str:
    return metric.split("/", 1)[-1]


def _longest_per_size(runs: pd.DataFrame, params_column: str) -> pd.DataFrame:
    """One run per model size: the one trained longest (most tokens), so a law in N does not mix training lengths."""
    if not len(runs):
        return runs
    order = runs.assign(_t=runs["tokens_seen"].astype(float).fillna(-1)).sort_values("_t")
    return order.groupby(params_column, sort=True).tail(1).drop(columns="_t").sort_values(params_column)


#: what would make a skipped part possible, by what it needs
HINT_SIZES = "runs of more model sizes would make it possible"
HINT_HISTORY = "more logged validation points along each run would make it possible"
HINT_CHINCHILLA = "more model sizes, each trained for several lengths, would make it possible"
HINT_FID = "run `var-lab eval` on each run's checkpoint to log eval/fid"
#: the words that mark a failure no study should cause (a bug to report), as opposed to a part the study cannot support
UNEXPECTED = "failed unexpectedly"


class _Recorder:
    """Collects the fits, tables' notes and failures of one analysis: the one path every derived part takes.

    :meth:`run` makes a fit and records it with its caveats (dropped replicates, parameters on a bound, intervals
    that do not constrain); :meth:`guard` wraps a table, plot or report section so that anything it cannot make
    becomes a note (what, why and what would make it possible) instead of ending the analysis.
    """

    def __init__(self, options: AnalysisOptions):
        self.options = options
        self.rows: list[dict] = []
        self.objects: dict[str, F.FitResult] = {}
        self.notes: list[str] = []
        self.tracebacks: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def failure(self, what: str, error: BaseException, hint: str = "") -> None:
        """Record why ``what`` was not made: a skip when the study lacks something, else an unexpected failure."""
        if isinstance(error, F.InsufficientDataError):
            self.note(f"{what}: skipped ({error})" + (f"; {hint}" if hint else ""))
        elif isinstance(error, F.DivergedFitError):
            self.note(f"{what}: not fitted, the fit diverged ({error})" + (f"; {hint}" if hint else ""))
        else:
            self.tracebacks.append(f"{what}:\n" + "".join(traceback.format_exception(error)))
            self.note(f"{what}: {UNEXPECTED} ({type(error).__name__}: {error}); the traceback is in errors.log")

    @contextlib.contextmanager
    def guard(self, what: str, hint: str = ""):
        """Run the body; an exception becomes a note about ``what`` (see :meth:`failure`) and the analysis goes on."""
        try:
            yield
        except Exception as error:  # one part failing must not cost the rest of the report
            self.failure(what, error, hint)

    def run(self, key: str, target: str, x: str, x_unit: str, func, *args, hint: str = HINT_SIZES,
            **kwargs) -> F.FitResult | None:  # fmt: skip
        """Fit ``func(*args, **kwargs)`` as ``key`` (``target|x|form``); None (and a note) when it cannot be made."""
        what = f"{target} vs {x} ({key.rsplit('|', 1)[-1]})"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # overflow in a replicate: handled by FitResult
                result = func(*args, **kwargs)
            if result.diverged:
                raise F.DivergedFitError(", ".join(f"{k} = {result.get(k)}" for k in F.DEFINING_PARAMS[result.form]))
        except Exception as error:
            self.failure(what, error, hint)
            return None
        self.objects[key] = result
        caveats = result.caveats()
        if caveats:
            self.note(f"{what}: " + "; ".join(caveats))
        row = {"key": key, "target": target, "x": x, "x_unit": x_unit, "law": result.label(x, target)}
        row.update(result.to_row())
        row["caveats"] = "; ".join(caveats)
        self.rows.append(row)
        return result


def analyze(study: Study, out_dir: str | Path, options: AnalysisOptions | None = None) -> AnalysisResult:
    """Fit, plot and report a loaded study into ``out_dir``; ``report.md`` is always written.

    Args:
        study: output of :func:`analysis.runs.load_study` (with histories for the frontier).
        out_dir: folder to write (created).
        options: what to fit; defaults as :class:`AnalysisOptions`.

    Returns:
        AnalysisResult with the frames, fits, figure paths, notes and the report path. Warnings raised while
        fitting (dropped runs and points) are collected into ``notes`` and re-issued. A part the study cannot
        support is a note; a part that fails for another reason is a note saying so, with its traceback in
        ``errors.log``.
    """
    options = options or AnalysisOptions()
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = _Recorder(options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        result = None
        with rec.guard("the analysis"):
            result = _analyze(study, out_dir, plots_dir, options, rec)
        if result is None:  # only an unexpected failure gets here: still write what is known
            runs = study.runs.assign(used=False)
            result = AnalysisResult(out_dir, runs, runs.iloc[:0], pd.DataFrame(rec.rows), rec.objects, notes=rec.notes)
    for item in caught:
        if issubclass(item.category, AnalysisWarning):
            result.notes.append(str(item.message))
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    result.report = write_report(study, result, options, rec)
    errors = out_dir / "errors.log"
    if rec.tracebacks:
        errors.write_text("\n".join(rec.tracebacks))
    elif errors.exists():
        errors.unlink()  # from an earlier analysis into the same folder
    return result


def _analyze(study: Study, out_dir: Path, plots_dir: Path, options: AnalysisOptions, rec: _Recorder) -> AnalysisResult:
    for note in study.notes:
        rec.note(note)
    runs = study.runs
    if options.exclude_kinds and "kind" in runs.columns:
        runs = runs[~runs["kind"].isin(options.exclude_kinds)].reset_index(drop=True)
    pcol = options.params_column
    losses = [m for m in options.loss_metrics if f"final:{m}" in runs.columns]
    for m in options.loss_metrics:
        if m not in losses:
            rec.note(f"loss metric {m} was not logged by any run; skipped")
    used = usable_runs(runs, [pcol]) if len(runs) else runs
    runs = runs.assign(used=runs["run_id"].isin(used["run_id"]))
    tables: dict[str, pd.DataFrame] = {}
    figures: list[Path] = []
    if not len(used):
        rec.note("no usable run (finished, finite losses, parameter count logged): nothing to fit")
    sizes = _longest_per_size(used, pcol) if len(used) else used
    N_b = sizes[pcol].to_numpy(dtype=float) / N_UNIT if len(sizes) else np.zeros(0)
    E = options.irreducible
    boot, seed = options.bootstrap, options.seed
    if len(used) and len(sizes) < 2:
        rec.note(f"only {len(sizes)} model size among the usable runs: no law in N can be fitted; {HINT_SIZES}")

    # ---- loss vs parameters
    param_fits = []
    for metric in losses:
        y = sizes[f"final:{metric}"].to_numpy(dtype=float)
        y_fit = y - E if E is not None else y
        if E is not None and np.any(y_fit <= 0):
            rec.note(f"{metric}: irreducible E = {E} is not below every final loss; those runs are left out")
        pl = rec.run(f"{metric}|N|power_law", metric, "N", "billions", F.fit_power_law, N_b, y_fit,
                     bootstrap=boot, seed=seed)  # fmt: skip
        param_fits.append(pl)
        if E is None:
            rec.run(f"{metric}|N|saturating", metric, "N", "billions", F.fit_saturating, N_b, y,
                    bootstrap=boot, seed=seed)  # fmt: skip
    if losses and len(sizes):
        with rec.guard("plot of loss vs parameters"):
            fig = P.plot_metric_vs(
                sizes, pcol, [(m, sizes[f"final:{m}"].to_numpy(dtype=float) - (E or 0.0)) for m in losses],
                param_fits, x_name="N", x_scale=1 / N_UNIT, title="Loss vs parameters (longest run of each size)",
                y_label="reducible loss L - E (nats)" if E is not None else "loss (nats)",
            )  # fmt: skip
            figures += P.save_figure(fig, plots_dir, "loss_vs_params")

    # ---- loss vs compute: every run's curve and the frontier
    history = study.history
    for metric in losses:
        if not len(history) or not (history["metric"] == metric).any():
            rec.note(f"{metric}: no history loaded; the compute-optimal frontier needs it")
            continue
        with rec.guard(f"{metric}: compute-optimal frontier and loss-vs-compute plot", HINT_HISTORY):
            frontier = F.compute_frontier(history, metric, run_ids=used["run_id"])
            tables[f"frontier_{_slug(metric)}"] = frontier.assign(metric=metric)
            frontier_fit = None
            if len(frontier):
                values = frontier["value"].to_numpy(dtype=float) - (E or 0.0)
                frontier_fit = rec.run(f"{metric}|C|power_law", metric, "C", "PFLOPs", F.fit_power_law,
                                       frontier["compute"], values, bootstrap=boot, seed=seed,
                                       hint=HINT_HISTORY)  # fmt: skip
                if E is None:
                    rec.run(f"{metric}|C|saturating", metric, "C", "PFLOPs", F.fit_saturating, frontier["compute"],
                            frontier["value"], bootstrap=boot, seed=seed, hint=HINT_HISTORY)  # fmt: skip
            else:
                rec.note(f"{metric}: no usable run has a finite {metric} with a known compute: no frontier")
            fig = P.plot_loss_vs_compute(history, used, metric, frontier, frontier_fit, params_column=pcol,
                                         irreducible=E)  # fmt: skip
            figures += P.save_figure(fig, plots_dir, f"loss_vs_compute_{_slug(metric)}")

    # ---- IsoFLOP minima
    if losses and len(used):
        with rec.guard("IsoFLOP minima", HINT_SIZES):
            tables["isoflop"] = _isoflop(used, history, losses[0], pcol, rec)

    # ---- two-variable law and compute-optimal allocation
    if losses and len(used):
        with rec.guard(f"two-variable fit L(N, D) of {losses[0]}", HINT_CHINCHILLA):
            _chinchilla(used, history, losses[0], pcol, options, rec, tables)

    # ---- token error vs parameters
    error_metrics = options.error_metrics
    if error_metrics is None:
        error_metrics = tuple(m for m in ("val/acc_mean", "val/acc_tail") if f"final:{m}" in runs.columns) or tuple(
            m for m in ("train/acc_mean", "train/acc_tail") if f"final:{m}" in runs.columns
        )
    error_metrics = tuple(m for m in error_metrics if f"final:{m}" in runs.columns)
    if error_metrics and len(sizes):
        err_fits = []
        for metric in error_metrics:
            err = 1.0 - sizes[f"final:{metric}"].to_numpy(dtype=float)
            name = metric.replace("acc", "err")
            err_fits.append(rec.run(f"{name}|N|power_law", name, "N", "billions", F.fit_power_law, N_b, err,
                                    bootstrap=boot, seed=seed))  # fmt: skip
        with rec.guard("plot of token error vs parameters"):
            series = [(m.replace("acc", "err"), 1.0 - sizes[f"final:{m}"].to_numpy(dtype=float)) for m in error_metrics]
            fig = P.plot_metric_vs(sizes, pcol, series, err_fits, x_name="N", x_scale=1 / N_UNIT,
                                   y_label="token error rate", title="Token error vs parameters")  # fmt: skip
            figures += P.save_figure(fig, plots_dir, "error_vs_params")
    elif not error_metrics:
        rec.note("no accuracy metric (val/acc_* or train/acc_*) logged; token error not fitted")

    # ---- FID across model sizes
    with rec.guard("FID across model sizes", HINT_FID):
        figures += _fid(runs, used, pcol, options, rec, tables, plots_dir)

    # ---- loss per scale vs depth
    with rec.guard("loss per scale vs depth"):
        scale_cols = [c for c in used.columns if c.startswith("final:val/L_scale_")]
        with_depth = sizes.dropna(subset=["depth"]) if len(sizes) else sizes
        if not scale_cols:
            rec.note("loss per scale vs depth: no run logged val/L_scale_<k>; not drawn")
        elif not len(with_depth):
            rec.note("loss per scale vs depth: no usable run logged model.depth; not drawn")
        else:
            known = used["patch_nums"].dropna()
            patch = parse_patch_nums(known.iloc[0]) if len(known) else None
            fig = P.plot_scale_losses(with_depth, patch_nums=patch,
                                      title="Loss per scale vs depth (longest run of each size)")  # fmt: skip
            figures += P.save_figure(fig, plots_dir, "loss_per_scale_vs_depth")
            tables["scale_losses"] = (
                used.dropna(subset=["depth"])
                .groupby("depth")[sorted(scale_cols, key=lambda c: int(c.rsplit("_", 1)[1]))]
                .mean()
            )

    # ---- ladder prediction: the largest size held out
    if options.holdout_largest:
        with rec.guard("ladder prediction of the largest size", HINT_SIZES):
            tables["holdout"] = _holdout(sizes, used, history, losses, pcol, options, rec)

    # ---- extrapolation
    with rec.guard("extrapolation table"):
        tables["extrapolation"] = _extrapolations(rec, sizes, used, pcol)

    fits = pd.DataFrame(rec.rows)
    # ---- files
    with rec.guard("CSV files"):
        runs.to_csv(out_dir / "runs.csv", index=False)
        fits.to_csv(out_dir / "fits.csv", index=False)
        for name, table in tables.items():
            if table is not None and len(table):
                table.to_csv(out_dir / f"{name}.csv", index=name == "scale_losses")
    return AnalysisResult(out_dir, runs, used, fits, rec.objects, tables, figures, rec.notes)


def _isoflop(used, history, metric, pcol, rec: _Recorder) -> pd.DataFrame:
    table = F.isoflop_minima(used, metric=metric, params_column=pcol)
    source = "runs sharing a final compute budget"
    if not len(table) and len(history) and used[pcol].nunique() >= 3:
        # no shared budgets: slice every run's history at common budgets instead
        finals = used["compute_pflops"].astype(float)
        finals = finals[np.isfinite(finals) & (finals > 0)]
        if len(finals) >= 3:
            budgets = np.geomspace(finals.min(), finals.max(), 8)
            table = F.isoflop_minima(used, history, metric, budgets=budgets, params_column=pcol)
            source = "each run's history interpolated at common budgets"
    if len(table):
        table = table.assign(source=source, N_opt_billions=table["N_opt"] / N_UNIT)
        inside = table[table["method"] == "parabola"]
        if len(inside) >= 3:
            rec.run("N_opt|C|power_law", "N_opt", "C", "PFLOPs", F.fit_power_law, inside["compute"],
                    inside["N_opt"] / N_UNIT)  # fmt: skip
    else:
        rec.note(
            "IsoFLOP minima: no compute budget reached by 3 or more model sizes; 3 or more sizes trained to a "
            "common compute budget (an IsoFLOP sweep), or longer histories that overlap in compute, would make it "
            "possible"
        )
    return table


HISTORY_POINTS_NOTE = (
    "two-variable fit: the runs' final values have too few distinct (N, D), so points along each run's history are "
    "used (warm-up skipped; the learning-rate schedule is not matched to each D, which biases beta; the bootstrap "
    "resamples whole runs)"
)


def _float(value) -> float:
    """A frame cell as a float: None, NaN and pandas' <NA> become NaN."""
    return math.nan if value is None or pd.isna(value) else float(value)


def chinchilla_points(
    used: pd.DataFrame,
    history: pd.DataFrame,
    metric: str = "val/L_mean",
    mode: str = "auto",
    params_column: str = "params_total",
    per_run: int = 16,
) -> tuple[pd.DataFrame, str]:
    """(N, D, loss, run_id) points for :func:`analysis.fit.fit_chinchilla`.

    Args:
        used: usable runs.
        history: long history frame (for ``mode="history"``).
        metric: loss metric.
        mode: ``final`` (each run's final value and tokens seen), ``history`` (up to ``per_run`` log-spaced points
            along each run after the first 10% of training, D = tokens seen at that step) or ``auto`` (final when it
            has at least 8 points with 3 distinct N and 3 distinct D, else history).
        params_column: runs column used as N.
        per_run: history points kept per run.

    Returns:
        The points frame and a description of where they come from.
    """
    final = used[[params_column, "tokens_seen", f"final:{metric}", "run_id"]]
    final = final.astype({params_column: float, "tokens_seen": float})
    final = final.rename(columns={params_column: "N", "tokens_seen": "D", f"final:{metric}": "loss"}).dropna()
    enough = (
        len(final) >= 8
        and final["N"].nunique() >= 3
        and np.unique(np.round(np.log(final["D"][final["D"] > 0]), 3)).size >= 3
    )
    if mode == "final" or (mode == "auto" and enough) or not len(history):
        return final.reset_index(drop=True), "final value of each run"
    rows = history[(history["metric"] == metric) & history["run_id"].isin(used["run_id"])]
    info = used.set_index("run_id")
    points = []
    for run_id, part in rows.groupby("run_id", observed=True):
        part = part[np.isfinite(part["value"])].sort_values("step")
        if not len(part):
            continue
        last = part["step"].max()
        part = part[part["step"] >= 0.1 * last]  # skip warm-up
        if len(part) > per_run:
            picks = np.searchsorted(part["step"].to_numpy(), np.geomspace(part["step"].min(), last, per_run))
            part = part.iloc[np.unique(np.clip(picks, 0, len(part) - 1))]
        # nullable params (a run logged without model.patch_nums has tokens_per_image <NA>) read as NaN
        tokens = _float(info.at[run_id, "tokens_per_image"])
        per_image = _float(info.at[run_id, "flops_per_image"])
        batch = _float(info.at[run_id, "global_batch"])
        # tokens seen at each step: from the logged compute when there is one, as tokens_seen is
        images = part["compute"].to_numpy() * 1e15 / per_image
        images = np.where(np.isfinite(images), images, part["step"].to_numpy() * batch)
        for D, value in zip(images * tokens, part["value"]):
            points.append((_float(info.at[run_id, params_column]), float(D), float(value), run_id))
    frame = pd.DataFrame(points, columns=["N", "D", "loss", "run_id"])
    frame = frame[np.isfinite(frame["D"]) & (frame["D"] > 0)].reset_index(drop=True)
    return frame, "points along each run's history"


def _chinchilla(used, history, metric, pcol, options: AnalysisOptions, rec: _Recorder, tables) -> None:
    if options.chinchilla_points == "off":
        rec.note("two-variable fit: turned off")
        return
    no_tokens = used[pd.to_numeric(used["tokens_per_image"], errors="coerce").isna()]
    if len(no_tokens):
        rec.note(
            f"two-variable fit L(N, D) of {metric}: {len(no_tokens)} usable run(s) logged no model.patch_nums, so "
            "their tokens seen D are unknown and they are left out"
        )
    points, source = chinchilla_points(used, history, metric, options.chinchilla_points, pcol)
    if options.chinchilla_points == "auto" and source.startswith("points along"):
        rec.note(HISTORY_POINTS_NOTE)
    n_sizes = points["N"].nunique() if len(points) else 0
    if len(points) < 8 or n_sizes < 3:
        rec.note(
            f"two-variable fit L(N, D) of {metric}: skipped, it needs at least 8 points and 3 distinct model sizes "
            f"(have {len(points)} points, {n_sizes} sizes); {HINT_CHINCHILLA}"
        )
        return
    result = rec.run(f"{metric}|N,D|chinchilla", metric, "N,D", "parameters, tokens", F.fit_chinchilla,
                     points["N"], points["D"], points["loss"], bootstrap=options.chinchilla_bootstrap,
                     seed=options.seed, groups=points["run_id"], hint=HINT_CHINCHILLA)  # fmt: skip
    if result is None:
        return
    rec.rows[-1]["points"] = source
    implausible = [f"{k} = {result[k]:.3g}" for k in ("alpha", "beta") if not 0.0 < result[k] <= 2.0]
    if implausible:  # the approach-3 grid spans exponents 0..2; published fits find 0.2..0.8
        rec.note(
            f"two-variable fit L(N, D) of {metric}: {', '.join(implausible)} lies outside (0, 2]: these {n_sizes} "
            f"model sizes and their training lengths do not determine the law; read its N(C), D(C) with care"
        )
    fpt_text = "C = 6 N D"
    fpt = F.six_n
    try:
        model_fpt = F.FlopsPerToken.from_runs(used, pcol)
        fpt, fpt_text = model_fpt, f"C = f(N) D with f = {model_fpt.describe()}"
    except F.InsufficientDataError:
        rec.note("compute-optimal allocation uses C = 6ND: no run logged model.flops_per_image and model.patch_nums")
    rec.rows[-1]["flops_per_token"] = fpt_text
    compute = used["compute_flops"].astype(float)
    compute = compute[np.isfinite(compute) & (compute > 0)]
    if not len(compute):
        rec.note("compute-optimal allocation: no usable run logged its training compute (compute/flops); not made")
        return
    with rec.guard("compute-optimal allocation"):
        budgets = np.geomspace(compute.min(), compute.max() * 100, 7)
        table = F.compute_optimal(result, budgets, fpt)
        table.insert(1, "C_pflops", table["C"] / 1e15)
        tables["compute_optimal"] = table
        if table.attrs.get("diverged"):
            rec.note(
                f"compute-optimal allocation: {table.attrs['diverged']} of {table.attrs['replicates']} bootstrap "
                "replicates have no finite optimum at some budget and were left out of its intervals"
            )
        if not np.isfinite(table["N_opt"]).all():
            rec.note("compute-optimal allocation: the fitted law has no finite optimum at some budgets (shown as -)")
        if "N_opt_lo" in table.columns:
            lo, hi = table["N_opt_lo"].to_numpy(dtype=float), table["N_opt_hi"].to_numpy(dtype=float)
            valid = np.isfinite(lo) & ~np.isnan(hi)
            with np.errstate(all="ignore"):  # the widest interval speaks for the table
                span = np.where(valid, np.where(lo > 0, np.log10(hi / lo), np.inf), -np.inf)
            i = int(np.argmax(span))
            worst = F.interval_caveat(lo[i], hi[i], "scale", level=result.level) if valid.any() else None
            if worst:
                rec.note(f"compute-optimal allocation: N_opt is {worst} at some budgets; read N(C) as unknown")


def _fid(runs, used, pcol, options: AnalysisOptions, rec: _Recorder, tables, plots_dir) -> list[Path]:
    metric = options.fid_metric
    column = f"final:{metric}"
    figures: list[Path] = []
    reference_fit = None
    if options.paper_reference:
        reference_fit = rec.run("paper FID|N|power_law", "paper FID", "N", "billions", F.fit_power_law,
                                PAPER_FID["N"] / N_UNIT, PAPER_FID["fid"], bootstrap=options.bootstrap,
                                seed=options.seed)  # fmt: skip
    if column not in runs.columns:
        rec.note(f"no run logged {metric}; the FID table and fits are skipped; {HINT_FID}")
        return figures
    with_fid = used[np.isfinite(used[column].astype(float))]
    if not len(with_fid):
        rec.note(f"no usable run has a finite {metric}; the FID table and fits are skipped; {HINT_FID}")
        return figures
    table = with_fid[["point", "depth", pcol, "tokens_seen", "compute_pflops", column]].copy()
    table = table.rename(columns={pcol: "N", column: "fid"}).sort_values("N")
    if options.paper_reference:
        ref = PAPER_FID.set_index("depth")
        table["paper_fid"] = [ref["fid"].get(int(d), np.nan) if pd.notna(d) else np.nan for d in table["depth"]]
    tables["fid_by_size"] = table.reset_index(drop=True)
    fid_by_size = _longest_per_size(with_fid, pcol)
    N_b = fid_by_size[pcol].to_numpy(dtype=float) / N_UNIT
    fid_n = rec.run("fid|N|power_law", "FID", "N", "billions", F.fit_power_law, N_b, fid_by_size[column],
                    bootstrap=options.bootstrap, seed=options.seed)  # fmt: skip
    fid_c = rec.run("fid|C|power_law", "FID", "C", "PFLOPs", F.fit_power_law, with_fid["compute_pflops"],
                    with_fid[column], bootstrap=options.bootstrap, seed=options.seed)  # fmt: skip
    reference = PAPER_FID.assign(N=PAPER_FID["N"] / N_UNIT) if options.paper_reference else None
    with rec.guard("plot of FID vs parameters"):
        fig = P.plot_fid(fid_by_size, fid_n, x_column=pcol, metric=metric, x_scale=1 / N_UNIT, reference=reference,
                         reference_fit=reference_fit, title="FID vs parameters")  # fmt: skip
        figures += P.save_figure(fig, plots_dir, "fid_vs_params")
    with rec.guard("plot of FID vs training compute"):
        fig = P.plot_fid(with_fid, fid_c, x_column="compute_pflops", metric=metric, title="FID vs training compute")
        figures += P.save_figure(fig, plots_dir, "fid_vs_compute")
    return figures


#: sizes a ladder prediction needs: the held-out largest one and at least three to fit
HOLDOUT_MIN_SIZES = 4


def _holdout(sizes, used, history, losses, pcol, options: AnalysisOptions, rec: _Recorder) -> pd.DataFrame:
    """Fit on every size but the largest, predict the largest: one row per (target, against, form).

    Loss against N (power law, and the saturating law when no irreducible loss is given) from the longest run of
    each smaller size; loss against C from the compute-optimal frontier of the other runs' histories, evaluated at
    the held-out run's final compute; FID against N (power law). ``error`` is predicted / measured - 1; the interval
    is the bootstrap interval of the refitted law at the held-out size (the fit's uncertainty, not the held-out
    run's own noise).
    """
    if len(sizes) < HOLDOUT_MIN_SIZES:
        raise F.InsufficientDataError(f"it needs {HOLDOUT_MIN_SIZES} or more model sizes, have {len(sizes)}")
    E = options.irreducible
    boot, seed = options.bootstrap, options.seed
    largest, rest = sizes.iloc[-1], sizes.iloc[:-1]
    N_held = float(largest[pcol]) / N_UNIT
    C_held = _float(largest.get("compute_pflops"))
    rows = []

    def attempt(what, make_fit, target, against, form, at, measured, offset=0.0, n_fit=len(rest)):
        """Fit with ``make_fit()`` and add the prediction at ``at``; a fit that cannot be made is a note."""
        with warnings.catch_warnings(), rec.guard(f"ladder prediction: {what}", HINT_SIZES):
            warnings.simplefilter("ignore", RuntimeWarning)
            fit = make_fit()
            pred = F.extrapolate(fit, [at])
            y = float(pred["y"].iloc[0]) + offset
            lo = float(pred["y_lo"].iloc[0]) + offset if "y_lo" in pred else math.nan
            hi = float(pred["y_hi"].iloc[0]) + offset if "y_hi" in pred else math.nan
            rows.append({"target": target, "against": against, "form": form, "held_out": largest.get("point"),
                         "at": at, "n_fit": n_fit, "measured": measured, "predicted": y, "lo": lo, "hi": hi,
                         "error": y / measured - 1.0, "inside": bool(lo <= measured <= hi) if np.isfinite(lo) else None,
                         "law": fit.label(against, target)})  # fmt: skip

    N_rest = rest[pcol].to_numpy(dtype=float) / N_UNIT
    off = E or 0.0
    for metric in losses:
        measured = float(largest[f"final:{metric}"])
        y = rest[f"final:{metric}"].to_numpy(dtype=float)
        attempt(f"{metric} vs N (power_law)", partial(F.fit_power_law, N_rest, y - off, bootstrap=boot, seed=seed),
                metric, "N", "power_law", N_held, measured, off)  # fmt: skip
        if E is None:
            attempt(f"{metric} vs N (saturating)", partial(F.fit_saturating, N_rest, y, bootstrap=boot, seed=seed),
                    metric, "N", "saturating", N_held, measured)  # fmt: skip
        if len(history) and (history["metric"] == metric).any() and np.isfinite(C_held):
            others = used[used[pcol].astype(float) < float(largest[pcol])]["run_id"]
            frontier = F.compute_frontier(history, metric, run_ids=others)
            fit_c = partial(F.fit_power_law, frontier["compute"], frontier["value"].to_numpy(dtype=float) - off,
                            bootstrap=boot, seed=seed)  # fmt: skip
            attempt(f"{metric} vs C (frontier, power_law)", fit_c, metric, "C", "power_law", C_held, measured, off,
                    len(frontier))  # fmt: skip
    column = f"final:{options.fid_metric}"
    if column in used.columns:
        with_fid = used[np.isfinite(used[column].astype(float))]
        fid_sizes = _longest_per_size(with_fid, pcol) if len(with_fid) else with_fid
        if len(fid_sizes) >= HOLDOUT_MIN_SIZES and float(fid_sizes[pcol].max()) == float(largest[pcol]):
            fid_rest = fid_sizes.iloc[:-1]
            fit_fid = partial(F.fit_power_law, fid_rest[pcol].to_numpy(dtype=float) / N_UNIT, fid_rest[column],
                              bootstrap=boot, seed=seed)  # fmt: skip
            attempt("FID vs N (power_law)", fit_fid, "FID", "N", "power_law", N_held,
                    float(fid_sizes[column].iloc[-1]), n_fit=len(fid_rest))  # fmt: skip
        else:
            rec.note("ladder prediction of FID: skipped, it needs a FID for the largest size and for 3 or more others")
    return pd.DataFrame(rows)


def _extrapolations(rec: _Recorder, sizes, used, pcol) -> pd.DataFrame:
    rows = []
    largest = float(sizes[pcol].max()) / N_UNIT if len(sizes) else np.nan
    max_c = float(used["compute_pflops"].max()) if len(used) else np.nan
    for key, result in rec.objects.items():
        target, x, form = key.split("|")
        if form not in ("power_law", "saturating") or target.startswith("paper") or target == "N_opt":
            continue
        anchor = largest if x == "N" else max_c
        if not np.isfinite(anchor):
            continue
        for factor in (2.0, 10.0):
            out = F.extrapolate(result, [anchor * factor])
            row = {"target": target, "x": x, "form": form, "factor": factor, "at": anchor * factor}
            row.update({k: float(v.iloc[0]) for k, v in out.items() if k != "x"})
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------------
# markdown


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    value = float(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    return f"{value:.3e}"


def _with_ci(row: pd.Series, name: str) -> str:
    value = _num(row.get(name))
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if lo is not None and pd.notna(lo):
        value += f" [{_num(lo)}, {_num(hi)}]"
    return value


def _param_cell(row: pd.Series, name: str, fit: F.FitResult | None) -> str:
    """``value [lo, hi]``, flagged when the parameter is on a bound; an interval that does not constrain the
    parameter is replaced by the reason (``unconstrained: the 95% interval spans 117 decades``)."""
    caveat = fit.interval_caveat(name) if fit is not None else None
    tags = []
    if fit is not None and name in fit.at_bound:
        tags.append("on its " + fit.at_bound[name].split(" (")[0])
    if caveat and caveat.startswith("unconstrained"):
        value = _num(row.get(name))
        tags.append(caveat)
    else:
        value = _with_ci(row, name)
        if caveat:
            tags.append(caveat.split(":")[0])
    return value + (f" ({'; '.join(tags)})" if tags else "")


def _table(frame: pd.DataFrame, columns: list[str], headers: list[str] | None = None) -> str:
    headers = headers or columns
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in frame.iterrows():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(_num(v) if isinstance(v, (int, float, np.integer, np.floating)) else ("-" if v is None or
                         pd.isna(v) else str(v)))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(result: AnalysisResult, name: str, alt: str) -> str | None:
    """Markdown image of ``plots/<name>.png`` when the analysis drew it, else None (the notes say why)."""
    drawn = any(Path(f).name == f"{name}.png" for f in result.figures)
    return f"![{alt}](plots/{name}.png)" if drawn else None


def write_report(study: Study, result: AnalysisResult, options: AnalysisOptions, rec: _Recorder | None = None) -> Path:
    """Write ``report.md`` into the result's folder and return its path.

    Every section is written under :meth:`_Recorder.guard`: one that cannot be written becomes a note, and the
    notes section comes last, so the report is always written.
    """
    rec = rec if rec is not None else _Recorder(options)
    rec.notes = result.notes  # section failures join the analysis' notes
    out: list[str | None] = []
    sections = [("header", _report_header), ("runs table", _report_runs), ("fitted laws", _report_fits),
                ("frontier section", _report_frontier), ("IsoFLOP section", _report_isoflop),
                ("L(N, D) section", _report_chinchilla), ("ladder prediction section", _report_holdout),
                ("extrapolation section", _report_extrapolation),
                ("token error section", _report_error), ("FID section", _report_fid),
                ("loss-per-scale section", _report_scales)]  # fmt: skip
    for name, section in sections:
        with rec.guard(f"report: {name}"):
            out += section(study, result, options)
    if result.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(result.notes)] + [""]
    path = result.out_dir / "report.md"
    path.write_text("\n".join(line for line in out if line is not None))
    return path


def _report_header(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    level = 95
    out = [f"# Scaling report: {', '.join(study.experiments)}", ""]
    out.append(
        f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} from `{study.tracking_uri}` "
        f"({study.backend} reader, {study.load_seconds:.1f} s). Units as in the VAR paper: N in billions of "
        f"parameters, C in PFLOPs of training compute, D in tokens; losses in nats"
        + (f", minus the irreducible E = {options.irreducible}" if options.irreducible is not None else "")
        + f". Intervals are {level}% bootstrap intervals resampling runs ({options.bootstrap} replicates; "
        f"{options.chinchilla_bootstrap} for L(N, D)), expanded for few runs (Hesterberg 2015: the percentile "
        "interval at the level whose normal quantile is sqrt(g/(g-p)) t_(g-p) of the nominal one, g runs, p "
        "parameters); with one or two runs more than parameters that is the full range of the replicates. "
        "Replicates that diverge (non-finite parameters) are dropped and counted in the notes; an interval that "
        "reaches 0 or infinity or spans "
        f"{F.UNCONSTRAINED_DECADES:g} or more decades is reported as unconstrained."
    )
    out.append("")
    return out


def _report_runs(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    runs, used = result.runs, result.used
    out = ["## Runs", "", f"{len(runs)} runs loaded, {len(used)} used in fits."]
    dropped = runs[~runs["used"]] if "used" in runs.columns else runs.iloc[:0]
    if len(dropped):
        out.append("Left out: " + ", ".join(f"`{r.run_name or r.run_id}` ({r.flag})" for r in dropped.itertuples()))
    out.append("")
    cols = ["point", "depth", "params_total", "tokens_seen", "compute_pflops", "flag"]
    cols += [f"final:{m}" for m in options.loss_metrics if f"final:{m}" in runs.columns]
    if f"final:{options.fid_metric}" in runs.columns:
        cols.append(f"final:{options.fid_metric}")
    cols = [c for c in cols if c in runs.columns]
    order = [c for c in ("params_total", "tokens_seen") if c in runs.columns]
    out += [_table(runs.sort_values(order) if order else runs, cols), ""]
    return out


def _report_fits(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    fits = result.fits
    if not len(fits):
        return []
    out = ["## Fitted laws", ""]
    out.append("| target | against | form | law | parameters (95% interval) | r | points |")
    out.append("|---|---|---|---|---|---|---|")
    names = {"power_law": ["a", "b", "c"], "saturating": ["E", "A", "alpha"], "chinchilla": F.CHINCHILLA_PARAMS[:5]}
    for _, row in fits.iterrows():
        fit = result.fit_objects.get(row["key"])
        params = "; ".join(f"{n} = {_param_cell(row, n, fit)}" for n in names[row["form"]])
        r = _param_cell(row, "r", fit) if "r" in row and pd.notna(row.get("r")) else "-"
        out.append(
            f"| {row['target']} | {row['x']} ({row['x_unit']}) | {row['form']} | `{row['law']}` | {params} | "
            f"{r} | {int(row['n_points'])} |"
        )
    out.append("")
    if options.paper_reference:
        out.append(
            "Paper (ImageNet 256, N in billions): "
            + ", ".join(f"{k} = {v}" for k, v in PAPER_PARAM_LAWS.items())
            + "; against the compute-optimal frontier L = (2.2e-5 C)^-0.13 and (1.5e-5 C)^-0.16 "
            "(r about -0.99; the pairing with avg/last is uncertain)."
        )
        out.append("")
    out += [_figure(result, "loss_vs_params", "loss vs parameters"), ""]
    return out


def _report_frontier(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    frontier_keys = [k for k in result.tables if k.startswith("frontier_")]
    if not frontier_keys:
        return []
    runs = result.runs
    out = ["## Compute-optimal frontier", ""]
    out.append(
        "Lower envelope of the loss against training compute over every used run's history (a point is on it "
        "when no run reached a lower loss with less compute), thinned to one point per log-spaced compute bin."
    )
    out.append("")
    for key in frontier_keys:
        table = result.tables[key]
        if not len(table):
            continue
        metric = table["metric"].iloc[0]
        summary = table.groupby("run_id").agg(first_C=("compute", "min"), last_C=("compute", "max"))
        summary = summary.join(runs.set_index("run_id")[["point", "params_total"]]).sort_values("first_C")
        out.append(f"**{metric}**: {len(table)} frontier points from {len(summary)} runs.")
        out.append("")
        out.append(_table(summary.reset_index(), ["point", "params_total", "first_C", "last_C"],
                          ["run (point)", "N", "on frontier from C (PFLOPs)", "to C"]))  # fmt: skip
        out += ["", _figure(result, f"loss_vs_compute_{_slug(metric)}", "loss vs compute"), ""]
    return out


def _report_isoflop(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    iso = result.tables.get("isoflop")
    if iso is None or not len(iso):
        return []
    out = ["## IsoFLOP minima", "", f"Source: {iso['source'].iloc[0]}; parabola of loss in log N per budget.", ""]
    out += [_table(iso, ["compute", "n_runs", "N_opt_billions", "loss_opt", "method"],
                   ["C (PFLOPs)", "sizes", "N_opt (billions)", "loss at N_opt", "method"]), ""]  # fmt: skip
    return out


def _report_chinchilla(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    fits = result.fits
    chin = fits[fits["form"] == "chinchilla"] if len(fits) else fits
    out = ["## Two-variable law L(N, D) (Hoffmann et al. approach 3)", ""]
    if not len(chin):
        return out + ["Not fitted (see notes).", ""]
    row = chin.iloc[0]
    fit = result.fit_objects.get(row["key"])
    out.append(
        f"Fitted on {row.get('points', 'final values')} ({int(row['n_points'])} points): "
        f"`{row['law']}`; Huber (delta 1e-3) on log loss, L-BFGS from {int(row['n_starts'])} starts."
    )
    out.append("")
    for name in F.CHINCHILLA_PARAMS:
        out.append(f"- {name} = {_param_cell(row, name, fit)}")
    out.append("")
    opt = result.tables.get("compute_optimal")
    if opt is not None and len(opt):
        out.append(f"Compute-optimal allocation, {row.get('flops_per_token', 'C = 6ND')}:")
        out.append("")
        out.append(_table(opt.assign(N_b=opt["N_opt"] / N_UNIT, N_lo=opt.get("N_opt_lo", np.nan) / N_UNIT,
                                     N_hi=opt.get("N_opt_hi", np.nan) / N_UNIT),
                          ["C_pflops", "N_b", "N_lo", "N_hi", "D_opt", "loss_opt"],
                          ["C (PFLOPs)", "N_opt (billions)", "lo", "hi", "D_opt (tokens)", "loss"]))  # fmt: skip
        out.append("")
    return out


def _report_holdout(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    table = result.tables.get("holdout")
    if not options.holdout_largest:
        return []
    out = ["## Ladder prediction (largest size held out)", ""]
    if table is None or not len(table):
        return out + ["Not made (see notes).", ""]
    out.append(
        f"Every law refitted without the largest size (`{table['held_out'].iloc[0]}`), then evaluated there and "
        "compared with what that size measured; error = predicted / measured - 1. Against C the law is the "
        "compute-optimal frontier of the other runs, evaluated at the held-out run's final compute. The interval is "
        "the refitted law's bootstrap interval (its parameters' uncertainty, not the held-out run's own noise)."
    )
    out.append("")
    shown = table.assign(error_pct=100.0 * table["error"],
                         inside=table["inside"].map({True: "yes", False: "no"}).fillna("-"))  # fmt: skip
    out += [_table(shown, ["target", "against", "form", "n_fit", "at", "measured", "predicted", "lo", "hi",
                           "error_pct", "inside"],
                   ["target", "against", "form", "points fitted", "at", "measured", "predicted", "lo", "hi",
                    "error (%)", "measured inside"]), ""]  # fmt: skip
    return out


def _report_extrapolation(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    ext = result.tables.get("extrapolation")
    if ext is None or not len(ext):
        return []
    out = ["## Extrapolation", "", "Predictions beyond the largest model / compute, with bootstrap intervals.", ""]
    out += [_table(ext, ["target", "x", "form", "factor", "at", "y", "y_lo", "y_hi"],
                   ["target", "against", "form", "times max", "at", "prediction", "lo", "hi"]), ""]  # fmt: skip
    return out


def _report_error(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    figure = _figure(result, "error_vs_params", "token error")
    return ["## Token error vs parameters", "", figure, ""] if figure else []


def _report_fid(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    fits = result.fits
    out = ["## FID across model sizes", ""]
    fid = result.tables.get("fid_by_size")
    if fid is not None and len(fid):
        cols = ["point", "depth", "N", "tokens_seen", "compute_pflops", "fid"]
        heads = ["run (point)", "depth", "N", "tokens", "C (PFLOPs)", "FID"]
        if "paper_fid" in fid.columns:
            cols.append("paper_fid")
            heads.append("paper FID (ImageNet 256)")
        out += [_table(fid, cols, heads), ""]
        figures = [_figure(result, "fid_vs_params", "FID vs parameters"),
                   _figure(result, "fid_vs_compute", "FID vs compute")]  # fmt: skip
        out += [" ".join(f for f in figures if f), ""]
    else:
        out += ["No FID logged by the used runs.", ""]
    if options.paper_reference:
        text = "Paper's reported FIDs (ImageNet 256): " + ", ".join(
            f"d{int(r.depth)} ({r.N / 1e9:.2g}B) {r.fid}" for r in PAPER_FID.itertuples()
        )
        paper = fits[fits["target"] == "paper FID"] if len(fits) else fits
        if len(paper):
            text += f"; refitted in the paper's form: `{paper.iloc[0]['law']}`"
        out += [text + ".", ""]
    return out


def _report_scales(study: Study, result: AnalysisResult, options: AnalysisOptions) -> list[str | None]:
    figure = _figure(result, "loss_per_scale_vs_depth", "loss per scale")
    return ["## Loss per scale vs depth", "", figure, ""] if figure else []


__all__ = [
    "AnalysisOptions",
    "AnalysisResult",
    "PAPER_FID",
    "PAPER_PARAM_LAWS",
    "analyze",
    "chinchilla_points",
    "write_report",
]
