"""``var-lab analyze --holdout-largest``: the ladder check (fit without the largest size, predict it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import fit as F
from analysis.cli import analyze_main
from analysis.report import AnalysisOptions, AnalysisResult, _holdout, _Recorder, _report_holdout
from analysis.synthetic import PlantedFID, SyntheticRun, SyntheticStudy, write_synthetic_study

PATCH_NUMS = (1, 2, 3, 4, 6, 8)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # five sizes, larger ones train longer (a compute-scaled ladder); FID a clean power law in N
    runs = [SyntheticRun(depth=d, steps=200 * d, global_batch=64) for d in (2, 3, 4, 6, 8)]
    study = SyntheticStudy(runs=runs, patch_nums=PATCH_NUMS, log_points=12, fid=PlantedFID(a=0.05, b=-0.3), seed=3)
    write_synthetic_study(uri, "ladder", study)
    return uri


def test_holdout_predicts_the_largest_size_into_csv_and_report(ladder, tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["--experiment", "ladder", "--tracking-uri", ladder, "--out", str(out), "--bootstrap", "30",
            "--chinchilla-points", "off", "--loss-metric", "val/L_mean", "--holdout-largest"]  # fmt: skip
    assert analyze_main(argv) == 0
    table = pd.read_csv(out / "holdout.csv")
    keys = set(zip(table["target"], table["against"], table["form"]))
    assert {("val/L_mean", "N", "power_law"), ("val/L_mean", "N", "saturating"), ("val/L_mean", "C", "power_law"),
            ("FID", "N", "power_law")} <= keys  # fmt: skip
    assert table["held_out"].str.startswith("depth=8").all()
    assert (table.loc[table["against"] == "N", "n_fit"] == 4).all()
    assert np.isfinite(table[["measured", "predicted", "lo", "hi"]].to_numpy(dtype=float)).all()
    assert (table["lo"] <= table["hi"]).all()
    fid = table[table["target"] == "FID"].iloc[0]
    assert abs(fid["error"]) < 0.05  # a planted power law with 1% noise extrapolates one size closely
    assert fid["error"] == pytest.approx(fid["predicted"] / fid["measured"] - 1)
    loss = table[(table["target"] == "val/L_mean") & (table["form"] == "saturating")].iloc[0]
    assert abs(loss["error"]) < 0.05
    report = (out / "report.md").read_text()
    assert "## Ladder prediction (largest size held out)" in report and "`depth=8" in report
    assert "measured inside" in report
    # the held-out fits stay out of the fitted-law table and the extrapolations
    fits = pd.read_csv(out / "fits.csv")
    assert (fits[fits["key"] == "val/L_mean|N|power_law"]["n_points"] == 5).all()


def test_holdout_needs_four_sizes_and_is_off_by_default():
    sizes = pd.DataFrame({"params_total": [1e6, 2e6, 4e6], "final:val/L_mean": [3.0, 2.9, 2.8],
                          "compute_pflops": [1.0, 2.0, 4.0], "point": ["a", "b", "c"]})  # fmt: skip
    with pytest.raises(F.InsufficientDataError, match="4 or more model sizes"):
        _holdout(sizes, sizes, pd.DataFrame(), ["val/L_mean"], "params_total", AnalysisOptions(), _Recorder(None))
    empty = AnalysisResult(out_dir=None, runs=sizes, used=sizes, fits=pd.DataFrame())
    assert _report_holdout(None, empty, AnalysisOptions()) == []
    assert "Not made" in "\n".join(_report_holdout(None, empty, AnalysisOptions(holdout_largest=True)))
