"""Loading MLflow experiments into the runs and history frames, from a real sqlite MLflow store."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.runs import AnalysisWarning, load_history, load_runs, load_study, parse_patch_nums, usable_runs
from analysis.synthetic import (
    SyntheticRun,
    SyntheticStudy,
    var_flops_per_image,
    var_param_counts,
    write_synthetic_study,
)

PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # the 32px schedule: 130 tokens per image


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store with a 4-run synthetic sweep (one failed, one NaN) and a hand-logged run."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    runs = [
        SyntheticRun(depth=2, steps=400, global_batch=64),
        SyntheticRun(depth=4, steps=400, global_batch=64),
        SyntheticRun(depth=6, steps=300, global_batch=64, status="FAILED"),
        SyntheticRun(depth=3, steps=300, global_batch=64, nan_after=0.5),
    ]
    truth = write_synthetic_study(uri, "sweep-a", SyntheticStudy(runs=runs, patch_nums=PATCH_NUMS, log_points=25))
    # a run logged by hand: compute only every 10 steps, a step written twice, an infinite value, other kind
    client = MlflowClient(tracking_uri=uri)
    exp_b = client.create_experiment("sweep-b")
    run = client.create_run(exp_b, tags={"var_lab.kind": "var", "var_lab.point": "depth=2", "var_lab.sweep": "b"})
    rid = run.info.run_id
    params = {"model.depth": "2", "model.params_total": "1000000", "model.flops_per_image": "1e9",
              "train.global_batch": "8", "model.patch_nums": "[1, 2, 4]", "model.width": "not-a-number"}  # fmt: skip
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    metrics = [Metric("compute/flops", s * 8 * 1e9, 1000 + s, s) for s in (10, 20, 30)]
    metrics += [Metric("val/L_mean", 10.0 / s, 1000 + s, s) for s in range(5, 36, 5)]
    metrics += [Metric("val/L_mean", 0.123, 5000, 35)]  # step 35 written again later: the later value wins
    metrics += [Metric("train/grad_norm_max", math.inf, 1000, 35)]
    client.log_batch(rid, metrics=metrics)
    client.set_terminated(rid)
    tok = client.create_run(exp_b, tags={"var_lab.kind": "tokenizer"})
    client.log_batch(tok.info.run_id, metrics=[Metric("train/loss", 1.0, 0, 1)])
    client.set_terminated(tok.info.run_id)
    return {"uri": uri, "truth": truth, "hand_run": rid, "tokenizer_run": tok.info.run_id}


def test_runs_frame_follows_the_contract(store):
    runs = load_runs("sweep-a", store["uri"])
    assert len(runs) == 4
    truth = store["truth"].set_index("run_id")
    for _, row in runs.iterrows():
        depth = int(row["depth"])
        counts = var_param_counts(depth, patch_nums=PATCH_NUMS)
        assert row["params_total"] == counts["total"]
        assert row["params_adaln"] == counts["adaln"]
        assert row["width"] == 64 * depth and row["heads"] == depth
        assert row["flops_per_image"] == pytest.approx(var_flops_per_image(depth, patch_nums=PATCH_NUMS))
        assert row["tokens_per_image"] == sum(p * p for p in PATCH_NUMS) == 130
        steps = truth.at[row["run_id"], "steps"]
        assert row["final_step"] == steps
        assert row["images_seen"] == pytest.approx(steps * 64)
        assert row["tokens_seen"] == pytest.approx(steps * 64 * 130)
        assert row["compute_pflops"] == pytest.approx(steps * 64 * row["flops_per_image"] / 1e15)
        assert row["kind"] == "var" and row["sweep"] == "sweep-a" and row["point"].startswith(f"depth={depth}")
        assert row["experiment"] == "sweep-a"
    assert str(runs["depth"].dtype) == "Int64"
    flags = dict(zip(runs["depth"].astype(int), runs["flag"]))
    assert flags == {2: "ok", 4: "ok", 6: "failed", 3: "nan_loss"}
    # final and best of every metric
    ok = runs[runs["depth"] == 4].iloc[0]
    assert ok["best:val/L_mean"] <= ok["final:val/L_mean"]
    assert ok["best:val/acc_mean"] >= ok["final:val/acc_mean"]  # accuracy: best is the maximum
    assert "best:compute/flops" not in runs.columns and "final:compute/flops" in runs.columns
    assert np.isfinite(ok["final:eval/fid"])
    assert math.isnan(runs[runs["depth"] == 3].iloc[0]["final:val/L_mean"])


def test_history_frame_and_compute_axis(store):
    study = load_study("sweep-a", store["uri"])
    history = study.history
    assert list(history.columns) == ["run_id", "step", "compute", "metric", "value"]
    assert history["run_id"].dtype == "category" and history["metric"].dtype == "category"
    runs = study.runs.set_index("run_id")
    loss = history[history["metric"] == "val/L_mean"]
    expected = loss["step"] * 64 * runs.loc[loss["run_id"].astype(str), "flops_per_image"].to_numpy() / 1e15
    np.testing.assert_allclose(loss["compute"], expected, rtol=1e-9)
    # one row per (run, metric, step), sorted by step within each
    assert not history.duplicated(["run_id", "metric", "step"]).any()
    # a NaN run keeps its NaN points
    nan_run = runs.index[runs["flag"] == "nan_loss"][0]
    assert history[(history["run_id"] == nan_run) & (history["metric"] == "val/L_mean")]["value"].isna().any()


def test_compute_is_interpolated_by_step_and_duplicates_keep_the_last_write(store):
    with pytest.warns(AnalysisWarning, match="param model.width='not-a-number' is not a number"):
        study = load_study("sweep-b", store["uri"], kinds=["var"])
    assert len(study.runs) == 1  # the tokenizer run is filtered out by kind
    row = study.runs.iloc[0]
    assert row["tokens_per_image"] == 1 + 4 + 16
    assert pd.isna(row["width"])
    loss = study.history[study.history["metric"] == "val/L_mean"].set_index("step")
    # compute/flops was logged at steps 10, 20, 30 only: 8 images x 1e9 FLOPs per step, interpolated and
    # extrapolated at the rate of global_batch x flops_per_image
    np.testing.assert_allclose(loss["compute"], loss.index * 8 * 1e9 / 1e15, rtol=1e-12)
    assert loss.at[35, "value"] == 0.123
    assert row["final:val/L_mean"] == 0.123
    inf = study.history[study.history["metric"] == "train/grad_norm_max"]["value"]
    assert np.isinf(inf).all() and (inf > 0).all()


@pytest.mark.filterwarnings("ignore:run .* param model.width:analysis.runs.AnalysisWarning")
def test_sqlite_fast_path_equals_the_mlflow_client(store):
    fast = load_study(["sweep-a", "sweep-b"], store["uri"], backend="sqlite")
    slow = load_study(["sweep-a", "sweep-b"], store["uri"], backend="client")
    assert fast.backend == "sqlite" and slow.backend == "client"
    key = ["run_id"]
    a = fast.runs.sort_values(key).reset_index(drop=True)
    b = slow.runs.sort_values(key).reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12)
    ha = fast.history.astype({"run_id": str, "metric": str}).sort_values(["run_id", "metric", "step"])
    hb = slow.history.astype({"run_id": str, "metric": str}).sort_values(["run_id", "metric", "step"])
    pd.testing.assert_frame_equal(ha.reset_index(drop=True), hb.reset_index(drop=True), check_exact=False, rtol=1e-12)


def test_history_read_by_worker_processes_is_identical(store):
    one = load_history("sweep-a", store["uri"], workers=1)
    two = load_history("sweep-a", store["uri"], workers=2)
    pd.testing.assert_frame_equal(one, two)


def test_runs_only_load_matches_the_history_summaries(store):
    light = load_runs("sweep-a", store["uri"])  # SQL aggregates, no history
    full = load_study("sweep-a", store["uri"]).runs
    pd.testing.assert_frame_equal(light, full, check_exact=False, rtol=1e-12)


def test_experiments_by_id_and_metric_selection(store):
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(tracking_uri=store["uri"]).get_experiment_by_name("sweep-a").experiment_id
    study = load_study([exp_id], store["uri"], metrics=["val/L_*"])
    assert study.experiments == ["sweep-a"]
    metrics = set(study.history["metric"].astype(str))
    assert {"val/L_mean", "val/L_tail", "val/L_scale_0"} <= metrics
    assert all(m.startswith(("val/L_", "compute/")) for m in metrics)  # compute/* always comes along
    assert "final:train/loss" not in study.runs.columns


def test_bad_input_gives_clear_errors(store, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"experiment 'nope' not found.*'sweep-a'"):
        load_runs("nope", store["uri"])
    missing = tmp_path / "missing.db"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs("sweep-a", f"sqlite:///{missing}")
    assert not missing.exists()  # reading never creates a store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="no MLflow tracking URI"):
        load_runs("sweep-a", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert len(load_runs("sweep-a", None)) == 4
    with pytest.raises(ValueError, match="backend must be"):
        load_runs("sweep-a", store["uri"], backend="duckdb")


def test_usable_runs_drops_failed_and_nan_runs_with_a_warning(store):
    runs = load_runs("sweep-a", store["uri"])
    with pytest.warns(AnalysisWarning, match=r"dropped 2 of 4 runs: .*\((failed|nan_loss)\).*\((failed|nan_loss)\)"):
        kept = usable_runs(runs, ["params_total", "final:val/L_mean"])
    assert sorted(kept["depth"].astype(int)) == [2, 4]
    with pytest.raises(KeyError, match="no column"):
        usable_runs(runs, ["final:eval/nothing"])


def test_parse_patch_nums():
    assert parse_patch_nums("(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)") == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert parse_patch_nums("[1,2,4]") == (1, 2, 4)
    assert parse_patch_nums("1_2_4") == (1, 2, 4)
    assert parse_patch_nums(None) is None and parse_patch_nums("") is None
