"""``var-lab analyze`` never crashes on a study it can read: regression tests and a property-based fuzz.

Studies are written into a real sqlite MLflow store through :class:`mlflow.tracking.MlflowClient` with the tags,
params and step metrics that training and evaluation log (the MLflow contract in the README), then analysed through
the real entry point :func:`analysis.cli.analyze_main`.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from analysis import fit as F
from analysis.cli import analyze_main
from analysis.synthetic import var_flops_per_image, var_param_counts

PATCH_NUMS = (1, 2, 3, 4)
SHAPES = ("decreasing", "flat", "increasing", "noisy")
#: params a run may lack (a run logged by an older version, or by hand)
OPTIONAL_PARAMS = ("model.params_total", "model.patch_nums", "model.flops_per_image", "train.global_batch",
                   "model.depth")  # fmt: skip
#: what can go wrong with a loss history: NaN or inf at the last or a middle point, or every point NaN
CORRUPTIONS = ("none", "nan_last", "inf_last", "nan_middle", "inf_middle", "all_nan")
_EXPERIMENTS = itertools.count()


@dataclass
class RunSpec:
    """One run of a generated study."""

    depth: int
    steps: int = 40
    points: int = 6
    """Logged validation points (log-spaced steps up to ``steps``)."""
    status: str = "FINISHED"
    shape: str = "decreasing"
    level: float = 1.0
    """Loss at the end of training, before the size dependence."""
    size_slope: float = -0.08
    """Exponent of the final loss in parameters (positive: bigger models are worse)."""
    corruption: str = "none"
    missing: frozenset = field(default_factory=frozenset)
    fid: float | None = 250.0
    """FID at the last step (None: not evaluated; NaN allowed)."""
    accuracy: bool = True
    scales: bool = True
    compute: bool = True
    seed: int = 0


def write_study(uri: str, experiment: str, runs: list[RunSpec]) -> list[str]:
    """Log ``runs`` into ``experiment`` of the store at ``uri`` as training and ``var-lab eval`` do; returns run ids."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(experiment)
    experiment_id = existing.experiment_id if existing else client.create_experiment(experiment)
    ids = []
    for i, spec in enumerate(runs):
        rng = np.random.default_rng(spec.seed)
        point = f"depth={spec.depth}"
        tags = {"var_lab.sweep": experiment, "var_lab.point": point, "var_lab.kind": "var"}
        run = client.create_run(experiment_id, start_time=1_000 + i, tags=tags, run_name=f"d{spec.depth}-{i}")
        rid = run.info.run_id
        counts = var_param_counts(spec.depth, vocab_size=64, patch_nums=PATCH_NUMS)
        flops_per_image = var_flops_per_image(spec.depth, vocab_size=64, patch_nums=PATCH_NUMS)
        batch = 16
        params = {
            "model.depth": str(spec.depth),
            "model.width": str(64 * spec.depth),
            "model.heads": str(spec.depth),
            "model.params_total": str(counts["total"]),
            "model.params_blocks": str(counts["blocks"]),
            "model.flops_per_image": repr(flops_per_image),
            "model.patch_nums": str(PATCH_NUMS),
            "data.name": "generated",
            "data.resolution": "64",
            "train.global_batch": str(batch),
        }
        params = {k: v for k, v in params.items() if k not in spec.missing}
        client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
        steps = np.unique(np.round(np.geomspace(1, max(spec.steps, 1), max(spec.points, 1))).astype(int))
        t = steps / steps[-1]
        final = spec.level * (counts["total"] / 1e5) ** spec.size_slope
        curve = {
            "decreasing": final * (1 + 0.5 * (1 - t)),
            "flat": np.full(len(steps), final),
            "increasing": final * (0.7 + 0.3 * t),
            "noisy": final * np.exp(rng.normal(0, 0.3, len(steps))),
        }[spec.shape]
        loss = _corrupt(curve.astype(float), spec.corruption)
        metrics: dict[str, np.ndarray] = {"val/L_mean": loss, "val/L_tail": loss * 1.1, "train/loss": loss * 1.05}
        if spec.accuracy:
            metrics["val/acc_mean"] = np.clip(1 - loss / 3, 0, 1)
            metrics["val/acc_tail"] = np.clip(1 - loss / 2.5, 0, 1)
        if spec.scales:
            for k in range(len(PATCH_NUMS)):
                metrics[f"val/L_scale_{k}"] = loss * (0.6 + 0.2 * k)
        if spec.compute:
            metrics["compute/flops"] = steps * batch * flops_per_image
            metrics["compute/pflops"] = metrics["compute/flops"] / 1e15
        batch_metrics = [Metric(name, float(v), 10_000 + int(s), int(s)) for name, values in metrics.items()
                         for s, v in zip(steps, values)]  # fmt: skip
        if spec.fid is not None:
            batch_metrics.append(Metric("eval/fid", float(spec.fid), 20_000, int(steps[-1])))
        client.log_batch(rid, metrics=batch_metrics)
        if spec.status != "RUNNING":
            client.set_terminated(rid, status=spec.status)
        ids.append(rid)
    return ids


def _corrupt(loss: np.ndarray, corruption: str) -> np.ndarray:
    loss = loss.copy()
    middle = len(loss) // 2
    if corruption == "nan_last":
        loss[-1] = np.nan
    elif corruption == "inf_last":
        loss[-1] = np.inf
    elif corruption == "nan_middle" and len(loss) > 2:
        loss[middle] = np.nan
    elif corruption == "inf_middle" and len(loss) > 2:
        loss[middle] = np.inf
    elif corruption == "all_nan":
        loss[:] = np.nan
    return loss


def _analyze(uri: str, experiment: str, out: Path, *extra: str) -> int:
    argv = ["--experiment", experiment, "--tracking-uri", uri, "--out", str(out), "--bootstrap", "20",
            "--chinchilla-bootstrap", "4", *extra]  # fmt: skip
    return analyze_main(argv)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    return f"sqlite:///{root / 'mlflow.db'}"


def _report(out: Path) -> str:
    return (out / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# the two known crashes, as plain regression tests

GOOD_THETAS = [(13.0, 6.0, 0.4, 0.34, 0.28), (12.6, 6.2, 0.45, 0.33, 0.29), (13.4, 5.9, 0.35, 0.35, 0.27),
               (12.9, 6.1, 0.42, 0.34, 0.285)]  # fmt: skip
#: the replicate of issue 12: log A ran off (A = inf) with alpha = 185; N^185 overflows at every N of the grid
DIVERGED = {"E": 1.5, "A": math.inf, "B": 400.0, "alpha": 185.0, "beta": 0.28, "a_opt": 0.0015, "b_opt": 0.9985,
            "G": math.inf}  # fmt: skip


def _chinchilla_fit(replicates: list[dict]) -> F.FitResult:
    values = F._chinchilla_values(np.array(GOOD_THETAS[0]))
    samples = pd.DataFrame(replicates, columns=list(F.CHINCHILLA_PARAMS))
    return F.FitResult("chinchilla", values, 20, samples, n_groups=8, n_free=5)


def test_a_diverged_chinchilla_replicate_is_dropped_before_compute_optimal():
    good = [F._chinchilla_values(np.array(t)) for t in GOOD_THETAS]
    assert np.isnan(F._optimal_one(DIVERGED, 1e20, F.six_n)).all()  # raised "All-NaN slice encountered" before
    fit = _chinchilla_fit(good + [DIVERGED])
    clean = _chinchilla_fit(good)
    assert fit["bootstrap"] == 5 and fit["bootstrap_diverged"] == 1 and len(fit.samples) == 4
    assert np.isfinite(fit.samples.to_numpy()).all()
    assert "1 of 5 bootstrap replicates diverged (non-finite parameters) and were dropped" in fit.caveats()
    for name in ("A", "alpha", "G"):  # intervals are those of the finite replicates alone
        assert fit[f"{name}_ci"] == clean[f"{name}_ci"] and np.isfinite(fit[f"{name}_ci"]).all()
    C = np.array([1e18, 1e20, 1e22])
    table = F.compute_optimal(fit, C)
    pd.testing.assert_frame_equal(table, F.compute_optimal(clean, C))
    assert np.isfinite(table.to_numpy()).all()
    ext = F.extrapolate(fit, N=[1e9], D=[1e11])
    assert np.isfinite(ext.to_numpy()).all() and ext["loss_lo"].iloc[0] <= ext["loss"].iloc[0] <= ext["loss_hi"].iloc[0]
    # every replicate diverged: no interval at all, and it says so
    lost = _chinchilla_fit([DIVERGED, DIVERGED])
    assert "A_ci" not in lost and not len(lost.samples) and "no bootstrap replicate is left" in " ".join(lost.caveats())
    assert list(F.compute_optimal(lost, C).columns) == ["C", "N_opt", "D_opt", "loss_opt"]


# points of the demo study (4 depths, val/L_mean along each run's history) whose L(N, D) bootstrap diverges
DEMO_POINTS = np.array([
    (120257, 61440, 1.25517714, 2), (120257, 122880, 1.17347395, 2), (120257, 184320, 1.11313927, 2),
    (120257, 245760, 1.06419861, 2), (700548, 61440, 1.17756486, 1), (700548, 122880, 1.15927577, 1),
    (700548, 184320, 1.0355413, 1), (700548, 245760, 0.930444539, 1), (700548, 288000, 0.886271894, 1),
    (2183753, 61440, 1.17323446, 0), (2183753, 122880, 1.13548732, 0), (2183753, 184320, 1.06657028, 0),
    (2183753, 245760, 0.872067392, 0), (2183753, 307200, 0.790450573, 0), (2183753, 330240, 0.769946158, 0),
    (5012240, 61440, 1.16798961, 3), (5012240, 122880, 1.13608074, 3), (5012240, 184320, 1.09159446, 3),
    (5012240, 245760, 1.00701237, 3), (5012240, 307200, 0.881702304, 3), (5012240, 368640, 0.817572713, 3),
])  # fmt: skip


def test_demo_study_bootstrap_divergence_is_counted_not_propagated():
    N, D, loss, run = DEMO_POINTS.T
    fit = F.fit_chinchilla(N, D, loss, bootstrap=16, seed=0, groups=run, workers=1)
    assert fit["bootstrap_diverged"] >= 1  # some replicate runs off to A = inf on this study
    assert len(fit.samples) + fit["bootstrap_diverged"] == 16
    assert np.isfinite(fit.samples[list(F.DEFINING_PARAMS["chinchilla"])].to_numpy()).all()
    assert all(np.isfinite(fit[f"{k}_ci"]).all() for k in ("A", "B", "alpha", "beta"))
    assert "E" in fit.at_bound  # E = exp(e) runs to 0 here: flagged
    table = F.compute_optimal(fit, np.geomspace(1e11, 1e14, 4), F.FlopsPerToken(N, 4.2 * N))
    assert np.isfinite(table[["N_opt_lo", "N_opt_hi", "loss_opt_lo", "loss_opt_hi"]].to_numpy()).all()


def test_usable_run_without_patch_nums(store, tmp_path):
    # 16 of 160 fuzzed studies died with TypeError: float() argument must be ... not 'NAType' in chinchilla_points
    runs = [RunSpec(depth=d, seed=d) for d in (1, 2, 3)]
    runs[1].missing = frozenset({"model.patch_nums"})
    write_study(store, "no-patch-nums", runs)
    out = tmp_path / "report"
    assert _analyze(store, "no-patch-nums", out) == 0
    report = _report(out)
    assert "1 usable run(s) logged no model.patch_nums, so their tokens seen D are unknown" in report
    # the other two runs' histories (steps 4, 9, 19, 40: the first 10% of training is skipped) are too few for L(N, D)
    assert "two-variable fit L(N, D) of val/L_mean: skipped, it needs at least 8 points and 3 distinct model sizes " \
           "(have 8 points, 2 sizes)" in report  # fmt: skip
    fits = pd.read_csv(out / "fits.csv")
    assert fits.loc[fits["key"] == "val/L_mean|N|power_law", "n_points"].item() == 3  # it still counts in laws in N
    assert "failed unexpectedly" not in report and not (out / "errors.log").exists()


# ----------------------------------------------------------------------------------------------------------------------
# what the report says about laws it cannot pin down


def test_flat_law_bounds_and_uninformative_intervals_are_reported(store, tmp_path):
    # four sizes, loss a pure power law in N (no floor: saturating E = 0), FID flat (b ~ 0: a = c^(1/b) unbounded)
    runs = [RunSpec(depth=d, size_slope=-0.1, shape="decreasing", fid=250.0 * (1 + 0.01 * (-1) ** d), seed=d)
            for d in (1, 2, 3, 5)]  # fmt: skip
    write_study(store, "flat-fid", runs)
    out = tmp_path / "report"
    assert _analyze(store, "flat-fid", out, "--chinchilla-points", "off") == 0
    report = _report(out)
    fid_row = next(line for line in report.splitlines() if line.startswith("| FID | N"))
    assert re.search(r"a = \S+ \(unconstrained: the 95% interval (reaches|spans)", fid_row), fid_row
    assert not re.search(r"a = 0 \[0, ", fid_row)
    assert "(uninformative)" in fid_row  # r's interval [-1, 1] with four runs
    assert "r: uninformative: the 95% bootstrap interval of r is [-1, 1]" in report
    sat_row = next(line for line in report.splitlines() if line.startswith("| val/L_mean | N (billions) | saturating"))
    assert "(on its lower bound 0" in sat_row
    assert "val/L_mean vs N (saturating): E = " in report and "lies on its lower bound 0" in report
    fits = pd.read_csv(out / "fits.csv")
    law = fits[fits["key"] == "val/L_mean|N|saturating"].iloc[0]
    assert law["E"] <= 1e-6 * law["A"] and "lies on its lower bound 0" in law["caveats"]


def test_interval_caveats():
    assert F.interval_caveat(0.0, 2e117, "scale") == "unconstrained: the 95% interval reaches 0"
    assert F.interval_caveat(1e-3, 1e114, "scale") == "unconstrained: the 95% interval spans 117 decades"
    assert F.interval_caveat(4.9e-324, 0.9, "scale") == "unconstrained: the 95% interval reaches 0"
    assert F.interval_caveat(12.0, 9e4, "scale") is None  # 3.9 decades: wide, but a number
    assert F.interval_caveat(1.0, math.inf, "scale") == "unconstrained: the 95% interval reaches infinity"
    assert F.interval_caveat(-1.0, 1.0, "correlation").startswith("uninformative: the 95% bootstrap interval of r")
    assert F.interval_caveat(-0.99, -0.85, "correlation") is None
    assert "spans its whole allowed range [0, 10]" in F.interval_caveat(1e-21, 10.0, "exponent", (0.0, 10.0))
    assert "includes 0" in F.interval_caveat(-0.12, 0.07, "exponent")
    assert F.interval_caveat(-0.12, -0.07, "exponent") is None
    assert F.interval_caveat(math.nan, math.nan, "scale") is None


def test_power_law_replicates_drawing_one_size_are_counted_apart():
    x = np.array([1.0, 2.0, 4.0])
    fit = F.fit_power_law(x, 3.0 * x**-0.2, bootstrap=300, seed=0)
    # P(a replicate draws one run 3 times) = 3 / 27
    assert 15 <= fit["bootstrap_degenerate"] <= 50 and fit["bootstrap_diverged"] == 0
    assert len(fit.samples) == 300 - fit["bootstrap_degenerate"] and np.isfinite(fit.samples["b"]).all()
    assert any("drew a single distinct x" in c for c in fit.caveats())
    # dropping them changes no interval: they were NaN, which the percentiles ignored before
    w = F._bootstrap_weights(np.arange(3), 300, np.random.default_rng(0))
    raw = F._power_law_weighted(np.log(x), np.log(3.0 * x**-0.2), w)[:, 1]
    assert fit["b_ci"] == F.percentile_interval(raw, fit["percentile_level"])


def test_recorder_turns_any_failure_into_a_note():
    from analysis.report import AnalysisOptions, _Recorder

    rec = _Recorder(AnalysisOptions())
    with rec.guard("a table", "more runs would make it possible"):
        raise F.InsufficientDataError("needs 3 sizes, got 2")
    with rec.guard("a plot"):
        raise KeyError("boom")
    assert rec.run("y|N|power_law", "y", "N", "billions", F.fit_power_law, [1.0], [2.0]) is None
    assert rec.notes[0] == "a table: skipped (needs 3 sizes, got 2); more runs would make it possible"
    assert rec.notes[1].startswith("a plot: failed unexpectedly (KeyError: 'boom')") and "boom" in rec.tracebacks[0]
    assert rec.notes[2].startswith("y vs N (power_law): skipped (power-law fit needs at least 2 usable points")
    assert not rec.rows and not rec.objects


def test_report_is_written_even_when_the_whole_analysis_fails(store, tmp_path):
    from analysis.report import AnalysisOptions, analyze
    from analysis.runs import load_study

    write_study(store, "bad-options", [RunSpec(depth=1), RunSpec(depth=2)])
    study = load_study("bad-options", store)
    out = tmp_path / "report"
    # a column the runs frame lacks: usable_runs raises KeyError before any fit
    result = analyze(study, out, AnalysisOptions(params_column="params_nonexistent", bootstrap=5))
    report = _report(out)
    assert result.report == out / "report.md" and "## Runs" in report and "2 runs loaded, 0 used in fits." in report
    assert "the analysis: failed unexpectedly (KeyError:" in report and "params_nonexistent" in report
    assert "KeyError" in (out / "errors.log").read_text()
    analyze(study, out, AnalysisOptions(bootstrap=5))  # a later good analysis into the same folder removes it
    assert not (out / "errors.log").exists() and "failed unexpectedly" not in _report(out)


def test_empty_and_missing_experiments_are_one_line_errors(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=store).create_experiment("empty-sweep")
    out = tmp_path / "x"
    assert _analyze(store, "empty-sweep", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experiment 'empty-sweep'" in err and "has no runs" in err
    assert "Traceback" not in err and not out.exists()
    assert _analyze(store, "no-such-sweep", out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "experiment 'no-such-sweep' not found" in err


# ----------------------------------------------------------------------------------------------------------------------
# plots: a short log axis has readable labels


def _labels(axis) -> list[str]:
    axis.figure.canvas.draw()
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs()) if t.get_text() and lo <= v <= hi]


@pytest.mark.parametrize("lo, hi", [(0.2, 0.6), (0.6, 3.0), (0.72, 1.9), (251.0, 257.0), (1.2e-5, 4e-5), (0.05, 2.0)])
def test_short_log_axes_get_several_plain_labels(lo, hi, tmp_path):
    from analysis.plots import new_figure, save_figure

    fig, ax = new_figure()
    ax.plot(np.geomspace(1e-4, 5e-3, 5), np.geomspace(lo, hi, 5), "o")
    save_figure(fig, tmp_path, "axis")
    labels = _labels(ax.yaxis)
    assert len(labels) >= 3, labels  # matplotlib alone labels 0.2..0.6 not at all and 0.6..3 with "1" only
    assert all(re.fullmatch(r"[0-9.]+(e[-+]\d+)?", t) for t in labels), labels  # plain, no mathtext 10^x
    assert len(_labels(ax.xaxis)) >= 2  # 1.7 decades: still labelled


def test_loss_per_scale_labels_every_depth(tmp_path):
    from analysis.plots import plot_scale_losses, save_figure

    runs = pd.DataFrame({"depth": [1, 2, 3, 4], **{f"final:val/L_scale_{k}": [1.0, 0.9, 0.8, 0.85] for k in range(3)}})
    fig = plot_scale_losses(runs, patch_nums=(1, 2, 3))
    save_figure(fig, tmp_path, "scales")
    assert _labels(fig.axes[0].xaxis) == ["1", "2", "3", "4"]


# ----------------------------------------------------------------------------------------------------------------------
# property: any small study the store can hold gives exit 0 and a report

_runs = st.builds(
    RunSpec,
    depth=st.integers(1, 6),  # few depths: duplicate sizes are common
    steps=st.integers(1, 60),
    points=st.integers(1, 8),
    status=st.sampled_from(["FINISHED"] * 6 + ["FAILED", "KILLED", "RUNNING"]),
    shape=st.sampled_from(SHAPES),
    level=st.floats(0.05, 20.0),
    size_slope=st.floats(-0.5, 0.3),
    corruption=st.sampled_from(("none",) * 8 + CORRUPTIONS[1:]),
    missing=st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(OPTIONAL_PARAMS), min_size=1, max_size=2)),
    fid=st.one_of(st.none(), st.floats(1.0, 400.0), st.just(math.nan)),
    accuracy=st.booleans(),
    scales=st.booleans(),
    compute=st.booleans(),
    seed=st.integers(0, 2**16),
)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(
    runs=st.integers(1, 6).flatmap(lambda n: st.lists(_runs, min_size=n, max_size=n)),
    options=st.lists(
        st.sampled_from(
            [
                ("--irreducible", "0.01"),
                ("--irreducible", "5"),
                ("--chinchilla-points", "history"),
                ("--chinchilla-points", "final"),
                ("--paper-reference",),
                ("--params-column", "params_blocks"),
            ]
        ),
        max_size=2,
        unique=True,
    ),  # fmt: skip
)
def test_analyze_writes_a_report_for_any_small_study(store, tmp_path_factory, runs, options):
    experiment = f"fuzz-{next(_EXPERIMENTS)}"
    write_study(store, experiment, runs)
    out = tmp_path_factory.mktemp("fuzz") / "report"
    extra = [word for option in options for word in option]
    assert _analyze(store, experiment, out, *extra) == 0
    report = _report(out)
    assert report.startswith(f"# Scaling report: {experiment}") and "## Runs" in report
    assert "failed unexpectedly" not in report, report[report.index("## Notes") :]
    assert not (out / "errors.log").exists()
    runs_frame = pd.read_csv(out / "runs.csv")
    assert len(runs_frame) == len(runs)
    fits = pd.read_csv(out / "fits.csv") if (out / "fits.csv").stat().st_size > 1 else pd.DataFrame()
    used = runs_frame[runs_frame["used"]]
    n_sizes = int(used["params_total"].nunique())
    target(float(n_sizes), label="usable sizes")  # steer towards studies that reach the fits in N and L(N, D)
    event(f"usable runs: {len(used)}, sizes: {n_sizes}")  # --hypothesis-show-statistics: what the fuzz reached
    event(f"fits: {', '.join(sorted(set(fits['form']))) if len(fits) else 'none'}")
    for _, row in fits.iterrows():  # a recorded law is a finite law, with ordered intervals
        assert all(np.isfinite(row[k]) for k in F.DEFINING_PARAMS[row["form"]]), row.to_dict()
        for k in F.DEFINING_PARAMS[row["form"]]:
            if f"{k}_lo" in row and pd.notna(row[f"{k}_lo"]):
                assert row[f"{k}_lo"] <= row[f"{k}_hi"], (k, row.to_dict())
    for link in re.findall(r"\]\((plots/[^)]+\.png)\)", report):  # every figure the report shows exists
        assert (out / link).stat().st_size > 1000, link
