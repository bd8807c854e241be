"""The demo sweep end to end with its sizes cut down: tokenizer -> tokens -> VAR at two depths -> FID -> analysis."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_sweep_small(tmp_path, fashion_mnist_dir, fid_weights_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "var_lab.cli", "sweep", "launch", str(REPO / "sweeps" / "demo_cpu.yaml"),
        "--output-root", str(out),
        "--patch", "axes.depth=[1,2]",
        "--patch", "tokenizer.train.trainer.max_steps=8",
        "--patch", "tokenizer.train.data.limit_train=512",
        "--patch", "tokenizer.train.data.limit_val=64",
        "--patch", "base.data.limit_train=512",
        "--patch", "base.data.limit_val=64",
        "--patch", "overrides={}",
        "--patch", "eval.num_samples=20",
        "--set", "trainer.max_steps=12",
        "--set", "trainer.limit_val_batches=1",
        "--set", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report_dir = out / "demo_cpu" / "report"
    report = (report_dir / "report.md").read_text()
    assert "loss vs parameters" in report.lower() or "loss_vs_params" in report
    assert (report_dir / "plots" / "loss_vs_params.png").stat().st_size > 1000
    fits = pd.read_csv(report_dir / "fits.csv")
    assert len(fits) > 0
    exponents = pd.to_numeric(fits.get("b", fits.get("alpha")), errors="coerce").dropna()
    assert len(exponents) > 0 and all(math.isfinite(v) for v in exponents)
    runs = pd.read_csv(report_dir / "runs.csv")
    var_runs = runs[runs["kind"] == "var"] if "kind" in runs else runs
    assert len(var_runs) == 2
    loss_col = next(c for c in runs.columns if "val/L_mean" in c)
    assert var_runs[loss_col].map(math.isfinite).all()
    fid_col = next(c for c in runs.columns if "eval/fid" in c)
    assert var_runs[fid_col].map(lambda v: math.isfinite(float(v))).all()
    # MLflow's view: one parent run for the sweep, every run of a point its child, the report on the parent
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo_cpu")
    all_runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in all_runs if r.data.tags.get("var_lab.kind") == "sweep"]
    children = [r for r in all_runs if r.info.run_id != parent.info.run_id]
    assert {r.data.tags.get("var_lab.kind") for r in children} == {"tokenizer", "var", "analysis"}
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children), [
        (r.data.tags.get("var_lab.kind"), r.data.tags.get("mlflow.parentRunId")) for r in children
    ]
    assert parent.info.status == "FINISHED"  # the analysis has been logged to it
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/plots"} <= logged, logged
    # the sample grids of a fit as MLflow images with their steps
    var_run = next(r for r in children if r.data.tags.get("var_lab.kind") == "var")
    assert any(a.path.startswith("images/samples+step+") for a in client.list_artifacts(var_run.info.run_id, "images"))
    # running it again reuses the finished runs
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # nothing starts: every stage (tokenizer, tokenize, 2 fits, their evals, analyze) is skipped as finished
    lines = (again.stdout + again.stderr).splitlines()
    skipped = [line.strip() for line in lines if line.strip().startswith("skip ")]
    assert "nothing to start" in lines, lines[-20:]
    assert len(skipped) >= 6 and all(line.endswith(": finished") for line in skipped), skipped
    assert not [line for line in lines if line.strip().startswith("start ")]
