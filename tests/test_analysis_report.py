"""``var-lab analyze`` end to end on real sqlite MLflow stores: report, CSVs, plots, graceful degradation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.cli import analyze_main
from analysis.fit import fit_power_law
from analysis.plots import plot_loss_vs_params, save_figure
from analysis.runs import load_study
from analysis.synthetic import SyntheticRun, SyntheticStudy, write_synthetic_study

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
PLOTS = [
    "loss_vs_params",
    "loss_vs_compute_val_L_mean",
    "loss_vs_compute_val_L_tail",
    "error_vs_params",
    "fid_vs_params",
    "fid_vs_compute",
    "loss_per_scale_vs_depth",
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # a small depth sweep: 4 sizes (the demo's shape) plus a failed and a diverged run
    runs = [SyntheticRun(depth=d, steps=600, global_batch=64) for d in (2, 3, 4, 6)]
    runs += [SyntheticRun(depth=5, steps=300, global_batch=64, status="FAILED"),
             SyntheticRun(depth=5, steps=300, global_batch=64, nan_after=0.3)]  # fmt: skip
    write_synthetic_study(uri, "small", SyntheticStudy(runs=runs, patch_nums=PATCH_NUMS, log_points=20, seed=1))
    # two sizes only: too few for most fits
    tiny = [SyntheticRun(depth=d, steps=200, global_batch=64) for d in (2, 4)]
    write_synthetic_study(uri, "tiny", SyntheticStudy(runs=tiny, patch_nums=PATCH_NUMS, log_points=10, seed=2))
    return {"uri": uri, "root": root}


def _analyze(stores, experiment, out, *extra):
    argv = ["--experiment", experiment, "--tracking-uri", stores["uri"], "--out", str(out)]
    return analyze_main(argv + ["--bootstrap", "50", "--chinchilla-bootstrap", "8", *extra])


@pytest.mark.slow
def test_analyze_writes_report_csvs_and_plots(stores, tmp_path, capsys):
    out = tmp_path / "report"
    assert _analyze(stores, "small", out, "--paper-reference") == 0
    printed = capsys.readouterr().out
    assert "val/L_mean vs N (power_law)" in printed and "report:" in printed
    for name in PLOTS:
        for ext in ("png", "svg"):
            path = out / "plots" / f"{name}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 and runs["used"].sum() == 4
    assert set(runs.loc[~runs["used"], "flag"]) == {"failed", "nan_loss"}
    fits = pd.read_csv(out / "fits.csv")
    law = fits[(fits["key"] == "val/L_mean|N|power_law")].iloc[0]
    assert law["n_points"] == 4 and -1 <= law["r"] < -0.9 and law["b_lo"] < law["b"] < law["b_hi"]
    assert {"chinchilla", "saturating", "power_law"} <= set(fits["form"])
    paper = fits[fits["target"] == "paper FID"].iloc[0]
    assert paper["b"] == pytest.approx(fit_power_law([0.31, 0.6, 1.0, 2.0], [3.30, 2.57, 2.09, 1.92])["b"])
    fid = pd.read_csv(out / "fid_by_size.csv")
    assert len(fid) == 4 and "paper_fid" in fid.columns and fid["fid"].notna().all()
    frontier = pd.read_csv(out / "frontier_val_L_mean.csv")
    assert np.all(np.diff(frontier["value"]) < 0)
    report = (out / "report.md").read_text()
    for heading in ("## Fitted laws", "## Compute-optimal frontier", "## Two-variable law", "## FID across model sizes",
                    "## Extrapolation", "## Notes"):  # fmt: skip
        assert heading in report, heading
    assert "paper FID (ImageNet 256)" in report and "1.92" in report
    assert "(failed)" in report and "(nan_loss)" in report  # dropped runs are named
    assert "plots/loss_vs_params.png" in report


@pytest.mark.slow
def test_analyze_degrades_gracefully_on_two_runs(stores, tmp_path):
    out = tmp_path / "tiny"
    assert _analyze(stores, "tiny", out) == 0
    report = (out / "report.md").read_text()
    assert "two-variable fit L(N, D) of val/L_mean: skipped" in report
    assert "saturating fit needs at least 4 usable points" in report
    fits = pd.read_csv(out / "fits.csv")
    assert "chinchilla" not in set(fits["form"])
    assert (fits["key"] == "val/L_mean|N|power_law").any()  # two sizes still give a line
    assert (out / "plots" / "loss_vs_params.png").exists()


@pytest.mark.slow
def test_irreducible_loss_is_subtracted(stores, tmp_path):
    out = tmp_path / "irreducible"
    assert _analyze(stores, "small", out, "--irreducible", "4.0", "--chinchilla-points", "off") == 0
    fits = pd.read_csv(out / "fits.csv")
    assert not (fits["form"] == "saturating").any()
    study = load_study("small", stores["uri"])
    used = study.runs[study.runs["flag"] == "ok"]
    expected = fit_power_law(used["params_total"] / 1e9, used["final:val/L_mean"] - 4.0)
    law = fits[fits["key"] == "val/L_mean|N|power_law"].iloc[0]
    assert law["b"] == pytest.approx(expected["b"]) and law["r"] == pytest.approx(expected["r"])
    assert "minus the irreducible E = 4.0" in (out / "report.md").read_text()


def test_bad_input_exits_2_with_a_message(stores, tmp_path, capsys):
    assert _analyze(stores, "no-such-sweep", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "experiment 'no-such-sweep' not found" in err and "'small'" in err
    assert analyze_main(["--experiment", "small", "--tracking-uri", f"sqlite:///{tmp_path}/none.db",
                         "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_var_lab_dispatches_analyze_and_logs_the_report_to_mlflow(stores, tmp_path):
    from mlflow.tracking import MlflowClient

    from var_lab.cli import main

    out = tmp_path / "logged"
    argv = ["analyze", "--experiment", "tiny", "--tracking-uri", stores["uri"], "--out", str(out), "--bootstrap", "20",
            "--log-to-mlflow"]  # fmt: skip
    assert main(argv) == 0
    client = MlflowClient(tracking_uri=stores["uri"])
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`var_lab.kind` = 'analysis'")
    assert len(runs) == 1
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id, "analysis")}
    assert "analysis/report.md" in names and "analysis/plots" in names
    # the analysis run itself is not a model of the study: a second analysis ignores it
    again = tmp_path / "again"
    assert analyze_main(["--experiment", "tiny", "--tracking-uri", stores["uri"], "--out", str(again)]) == 0
    assert len(pd.read_csv(again / "runs.csv")) == 2


def test_plot_legends_carry_the_law_and_r(stores, tmp_path):
    study = load_study("small", stores["uri"])
    used = study.runs[study.runs["flag"] == "ok"]
    fit = fit_power_law(used["params_total"], used["final:val/L_mean"])
    fig = plot_loss_vs_params(used, ["val/L_mean"], [fit])
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("r = " in t and "val/L_mean = (" in t for t in texts)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    paths = save_figure(fig, tmp_path, "loss")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)
