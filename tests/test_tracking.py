"""MLflow tracking layer: URIs, the sqlite store, run continuation, the spool and `var-lab sync`.

Everything runs against real stores: an sqlite file, and for the outage tests a real `mlflow server` on localhost that
is stopped and started again on the same port and database.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow_helpers import MlflowServer, free_port, log_params_flat

from var_lab import tracking
from var_lab.config import TrackingConfig
from var_lab.tracking import (
    ResilientMLFlowLogger,
    ensure_store,
    get_or_create_experiment,
    git_commit,
    make_mlflow_logger,
    normalize_tracking_uri,
    resolve_tracking_uri,
    sync_main,
)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """An empty store built once by ensure_store; tests copy it, since building the schema takes seconds."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    ensure_store(f"sqlite:///{db}")
    return db


@pytest.fixture
def store(template_db, tmp_path) -> str:
    """URI of a ready store at ``<tmp_path>/mlflow.db`` (the default store of runs in ``<tmp_path>/<run>``)."""
    return copy_store(template_db, tmp_path / "mlflow.db")


def copy_store(template_db: Path, db: Path) -> str:
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db, db)
    return f"sqlite:///{db}"


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# -- URIs -------------------------------------------------------------------------------------------------------------


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    default = resolve_tracking_uri(None, tmp_path / "root")
    assert default == f"sqlite:///{tmp_path}/root/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute path

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5555/")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5555"
    # Explicit config beats the environment.
    explicit = sqlite_uri(tmp_path / "explicit.db")
    assert resolve_tracking_uri(explicit, tmp_path) == explicit


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path}/sub/m.db"


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("file:./mlruns", "file store"),
        ("./mlruns", "file store"),
        ("/abs/mlruns", "file store"),
        ("file:///abs/mlruns", "file store"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("ftp://host/x", "unsupported scheme"),
        ("http://", "no host"),
    ],
)
def test_bad_tracking_uris_are_refused_clearly(tmp_path, monkeypatch, uri, needle):
    with pytest.raises(ValueError, match=needle) as info:
        resolve_tracking_uri(uri, tmp_path)
    assert "tracking.tracking_uri" in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ValueError, match=r"\$MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, tmp_path)


def test_file_store_error_suggests_sqlite(tmp_path):
    with pytest.raises(ValueError, match=r"sqlite:////abs/path/mlflow.db"):
        normalize_tracking_uri("file:./mlruns", "tracking.tracking_uri")


# -- store and experiment ---------------------------------------------------------------------------------------------


def test_ensure_store_creates_then_reuses_the_database(tmp_path):
    db = tmp_path / "nested" / "mlflow.db"
    uri = sqlite_uri(db)
    ensure_store(uri)
    assert db.is_file() and (tmp_path / "nested" / "mlflow.db.lock").is_file()
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"experiments", "runs", "metrics", "params", "tags"} <= tables

    experiment_id = get_or_create_experiment(uri, "reuse")
    tracking.store._ENSURED.discard(uri)  # as a new process would: the existing database is verified, not rebuilt
    ensure_store(uri)
    assert get_or_create_experiment(uri, "reuse") == experiment_id
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (revision,)


def test_experiment_artifacts_live_next_to_the_database(tmp_path, store):
    uri = store
    experiment_id = get_or_create_experiment(uri, "my sweep/1")
    location = MlflowClient(uri).get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "mlartifacts" / "my_sweep_1").as_uri()


def test_deleted_experiment_is_restored_not_duplicated(tmp_path, store):
    uri = store
    experiment_id = get_or_create_experiment(uri, "again")
    MlflowClient(uri).delete_experiment(experiment_id)
    assert get_or_create_experiment(uri, "again") == experiment_id
    assert MlflowClient(uri).get_experiment(experiment_id).lifecycle_stage == "active"


# -- logger: run id file, resume, params, tags ------------------------------------------------------------------------


def test_run_id_file_continues_the_same_run(tmp_path, store):
    cfg = TrackingConfig(experiment="study", sweep="demo", point="depth=2", run_name="d2")
    run_dir = tmp_path / "d2"
    first = make_mlflow_logger(cfg, run_dir, tags={"var_lab.kind": "var"})
    first.log_hyperparams({"model": {"depth": 2, "patch_nums": (1, 2, 3)}, "git": {"commit": "abc"}})
    for step in range(5):
        first.log_metrics({"train/loss": 10.0 - step, "opt/lr": 0.1}, step=step)
    first.finalize("success")
    run_id = first.run_id
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    assert not list(run_dir.glob(".mlflow_run_id*.tmp"))  # written through a temporary file and a rename

    assert first._tracking_uri == store  # default: mlflow.db in the parent of the run folder
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "d2"
    assert run.data.tags["var_lab.sweep"] == "demo"
    assert run.data.tags["var_lab.point"] == "depth=2"
    assert run.data.tags["var_lab.kind"] == "var"
    assert run.data.params == {"model.depth": "2", "model.patch_nums": "[1, 2, 3]", "git.commit": "abc"}
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts" / "study").as_uri())

    # A requeued job: new logger, same folder. It continues the run, sets it RUNNING again, and the steps the killed
    # job repeats after its last checkpoint (3 and 4) are not logged twice.
    second = make_mlflow_logger(cfg, run_dir, tags={"var_lab.kind": "var"})
    assert second.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    second.log_hyperparams({"model": {"depth": 2}})  # same value again: fine
    for step in range(3, 10):
        second.log_metrics({"train/loss": 10.0 - step}, step=step)
    second.finalize("success")
    assert second.num_skipped == 2

    assert steps_of(client, run_id, "train/loss") == list(range(10))
    assert [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)] == [
        10.0 - s for s in range(10)
    ]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


def test_changed_param_on_resume_is_kept_aside_not_fatal(tmp_path, store):
    cfg = TrackingConfig(experiment="params")
    first = make_mlflow_logger(cfg, tmp_path / "run")
    first.log_hyperparams({"train": {"epochs": 10, "global_batch": 64}})
    second = make_mlflow_logger(cfg, tmp_path / "run")
    with pytest.warns(UserWarning, match="immutable"):
        second.log_hyperparams({"train": {"epochs": 20, "global_batch": 64}, "extra": 1})
    params = MlflowClient(second._tracking_uri).get_run(second.run_id).data.params
    assert params == {"train.epochs": "10", "train.global_batch": "64", "extra": "1"}
    rejected = [json.loads(x) for x in (tmp_path / "run" / "mlflow_spool.rejected.jsonl").read_text().splitlines()]
    assert [r["record"]["key"] for r in rejected] == ["train.epochs"]
    assert "'10'" in rejected[0]["reason"] and "'20'" in rejected[0]["reason"]


def test_environment_variable_overrides_the_default_store(tmp_path, monkeypatch, template_db):
    env_db = tmp_path / "env" / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", copy_store(template_db, env_db))
    logger = make_mlflow_logger(TrackingConfig(experiment="env"), tmp_path / "out" / "run")
    logger.log_metrics({"x": 1.0}, step=0)
    assert env_db.is_file()
    assert not (tmp_path / "out" / "mlflow.db").exists()
    assert MlflowClient(sqlite_uri(env_db)).get_metric_history(logger.run_id, "x")[0].value == 1.0


def test_bad_inputs_of_the_factory(tmp_path, store):
    with pytest.raises(ValueError, match=r"var_lab.kind='vae'.*tokenizer, var, eval"):
        make_mlflow_logger(TrackingConfig(), tmp_path / "run", tags={"var_lab.kind": "vae"})
    run_dir = tmp_path / "garbled"
    run_dir.mkdir()
    (run_dir / "mlflow_run_id").write_text("not a run id!\n")
    with pytest.raises(ValueError, match=r"mlflow_run_id: expected an MLflow run id"):
        make_mlflow_logger(TrackingConfig(), run_dir)
    with pytest.raises(ValueError, match="file store"):
        make_mlflow_logger(TrackingConfig(tracking_uri="file:./mlruns"), tmp_path / "run")


def test_logger_survives_pickling(tmp_path, store):
    logger = make_mlflow_logger(TrackingConfig(experiment="pickle"), tmp_path / "run")
    logger.log_metrics({"x": 0.0}, step=0)
    clone = pickle.loads(pickle.dumps(logger))  # as the ddp_spawn strategy sends the trainer to its processes
    clone.log_metrics({"x": 1.0}, step=1)
    assert clone.run_id == logger.run_id
    assert steps_of(MlflowClient(store), logger.run_id, "x") == [0, 1]


def test_run_id_of_another_store_is_a_clear_error(tmp_path, store):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef\n")
    logger = make_mlflow_logger(TrackingConfig(), run_dir)
    with pytest.raises(RuntimeError, match=r"does not exist in sqlite:///.*delete the run id file"):
        logger.log_metrics({"x": 1.0}, step=0)


def test_log_params_flat_with_a_client(tmp_path, store):
    uri = store
    client = MlflowClient(uri)
    run_id = client.create_run(get_or_create_experiment(uri, "flat")).info.run_id
    flat = log_params_flat(client, run_id, {"model": {"depth": 4, "patch_nums": (1, 2)}, "data": {"name": "fm"}})
    assert flat == {"model.depth": "4", "model.patch_nums": "[1, 2]", "data.name": "fm"}
    assert client.get_run(run_id).data.params == flat
    with pytest.raises(ValueError, match="already logged as '4'"):
        log_params_flat(client, run_id, {"model": {"depth": 5}})


def test_git_commit_is_the_checkout_head():
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(tracking.__file__).parent, capture_output=True, text=True
    )
    expected = head.stdout.strip() if head.returncode == 0 else "unknown"
    assert git_commit() == expected


def test_artifacts_land_next_to_the_store(tmp_path, store):
    logger = make_mlflow_logger(TrackingConfig(experiment="art"), tmp_path / "run")
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG fake but a real file")
    logger.log_artifact(grid, "samples")
    stored = tmp_path / "mlartifacts" / "art" / logger.run_id / "artifacts" / "samples" / "grid.png"
    assert stored.read_bytes() == grid.read_bytes()


def test_a_locked_sqlite_store_is_waited_for_not_lost(tmp_path, store):
    logger = make_mlflow_logger(TrackingConfig(experiment="locked"), tmp_path / "run")
    logger.log_metrics({"x": 0.0}, step=0)
    db = tmp_path / "mlflow.db"
    holding, release = threading.Event(), threading.Event()

    def hold_lock():
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        holding.set()
        release.wait(10)
        conn.execute("COMMIT")
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert holding.wait(10)
    threading.Timer(1.5, release.set).start()
    start = time.monotonic()
    for step in range(1, 4):
        logger.log_metrics({"x": float(step)}, step=step)
    holder.join()
    assert time.monotonic() - start >= 1.0  # the first call really waited for the lock
    assert not logger.spool.exists()
    assert steps_of(MlflowClient(logger._tracking_uri), logger.run_id, "x") == [0, 1, 2, 3]


# -- Lightning --------------------------------------------------------------------------------------------------------


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x_B4,) = batch
        loss = self.layer(x_B4).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
        return torch.utils.data.DataLoader(data, batch_size=4)


def _fit(run_dir: Path, max_steps: int, ckpt_path=None):
    logger = make_mlflow_logger(TrackingConfig(experiment="lightning"), run_dir, tags={"var_lab.kind": "var"})
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=run_dir, filename="{step}", save_top_k=-1, every_n_train_steps=1)
    trainer = pl.Trainer(
        max_steps=max_steps,
        default_root_dir=run_dir,
        logger=logger,
        log_every_n_steps=1,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
    )
    trainer.fit(TinyModule(), ckpt_path=ckpt_path)
    return logger


def test_lightning_trainer_logs_and_resumes_into_one_run(tmp_path, store):
    run_dir = tmp_path / "run"
    first = _fit(run_dir, max_steps=5)
    assert (run_dir / "mlflow_run_id").read_text().strip() == first.run_id
    # As if the job died after step 5 and its newest readable checkpoint is from step 3: the resumed job repeats
    # steps 3 and 4, which must not appear twice in the run's history.
    second = _fit(run_dir, max_steps=8, ckpt_path=run_dir / "step=3.ckpt")
    assert second.run_id == first.run_id
    client = MlflowClient(store)
    assert steps_of(client, first.run_id, "train/loss") == list(range(8))
    assert second.num_skipped >= 2
    assert client.get_run(first.run_id).info.status == "FINISHED"


# -- spool and sync ---------------------------------------------------------------------------------------------------


def _offline_logger(tmp_path: Path, store_uri: str) -> ResilientMLFlowLogger:
    """A resumed run whose store is unreachable (nothing listens on the port): everything goes to the spool."""
    run_id = MlflowClient(store_uri).create_run(get_or_create_experiment(store_uri, "offline")).info.run_id
    down = f"http://127.0.0.1:{free_port()}"
    return ResilientMLFlowLogger(
        tmp_path / "run", tracking_uri=down, run_id=run_id, http_max_retries=0, http_timeout_s=2, retry_interval_s=3600
    )


def test_sweep_parent_run_is_made_once_and_new_runs_of_the_sweep_become_its_children(tmp_path, store):
    from var_lab.tracking import find_sweep_run, get_or_create_sweep_run

    parent = get_or_create_sweep_run(store, "study", "demo", "var-lab sweep `demo`: depth=1, depth=2")
    client = MlflowClient(store)
    client.set_terminated(parent)
    assert get_or_create_sweep_run(store, "study", "demo") == parent  # a relaunch reuses it and sets it RUNNING
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags["var_lab.kind"] == "sweep"
    assert run.data.tags["mlflow.note.content"].endswith("depth=1, depth=2")
    assert find_sweep_run(store, run.info.experiment_id, "other") is None

    child = make_mlflow_logger(TrackingConfig(experiment="study", sweep="demo", point="depth=1"), tmp_path / "d1")
    alone = make_mlflow_logger(TrackingConfig(experiment="study", sweep="other", point="depth=1"), tmp_path / "o1")
    for logger in (child, alone):
        logger.log_metrics({"x": 1.0}, step=0)
        logger.finalize("success")
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent
    assert "mlflow.parentRunId" not in client.get_run(alone.run_id).data.tags  # no parent run: a plain run


def test_images_are_logged_with_their_step_also_through_the_spool(tmp_path, store):
    from PIL import Image

    grid = tmp_path / "grid.png"
    Image.new("RGB", (8, 4), (255, 0, 0)).save(grid)
    online = make_mlflow_logger(TrackingConfig(experiment="img"), tmp_path / "run")
    offline = _offline_logger(tmp_path, store)
    for logger in (online, offline):
        logger.log_image(grid, key="samples", step=7)
        logger.log_image(grid, key="samples", step=9)
    with pytest.warns(UserWarning, match="var-lab sync"):
        offline.finalize("success")
    assert sync_main(["--output-dir", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    client = MlflowClient(store)
    for run_id in (online.run_id, offline.run_id):
        pngs = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
        assert sorted(p.split("+")[2] for p in pngs) == ["7", "9"] and all(
            p.startswith("images/samples+step+") for p in pngs
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        online.log_image(tmp_path / "missing.png", key="samples", step=1)


def test_offline_points_are_spooled_and_synced_exactly_once(tmp_path, capsys, store):
    logger = _offline_logger(tmp_path, store)
    artifact = tmp_path / "plot.png"
    artifact.write_bytes(b"plot bytes")
    start = time.monotonic()
    logger.log_hyperparams({"model": {"depth": 3}})
    for step in range(20):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "val/L_mean": float(step)}, step=step)
    logger.log_artifact(artifact, "plots")
    artifact.write_bytes(b"overwritten later by training")  # the spool kept its own copy
    with pytest.warns(UserWarning, match=r"var-lab sync --output-dir"):
        logger.finalize("success")
    assert time.monotonic() - start < 15  # an unreachable store does not stall training
    spool = tmp_path / "run" / "mlflow_spool.jsonl"
    lines = [json.loads(x) for x in spool.read_text().splitlines()]
    assert sum(r["type"] == "metric" for r in lines) == 40
    assert [r["status"] for r in lines if r["type"] == "status"] == ["RUNNING", "FINISHED"]

    # A crash right after delivering, before the spool was rewritten: the same lines are delivered again.
    shutil.copytree(tmp_path / "run", tmp_path / "backup")
    assert sync_main(["--output-dir", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    assert not spool.exists() and not (tmp_path / "run" / "mlflow_spool_artifacts").exists()
    shutil.rmtree(tmp_path / "run")
    shutil.move(tmp_path / "backup", tmp_path / "run")
    assert sync_main(["--output-dir", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    assert sync_main(["--output-dir", str(tmp_path), "--tracking-uri", store]) == 0
    assert "nothing to deliver" in capsys.readouterr().out

    client = MlflowClient(store)
    for key in ("train/loss", "val/L_mean"):
        assert steps_of(client, logger.run_id, key) == list(range(20))
    run = client.get_run(logger.run_id)
    assert run.data.params == {"model.depth": "3"}
    assert run.info.status == "FINISHED"
    [folder] = client.list_artifacts(logger.run_id)
    [stored] = client.list_artifacts(logger.run_id, "plots")
    assert (folder.path, stored.path) == ("plots", "plots/plot.png")
    assert Path(client.download_artifacts(logger.run_id, "plots/plot.png", str(tmp_path))).read_bytes() == b"plot bytes"


def test_torn_spool_line_is_set_aside(tmp_path, store):
    logger = _offline_logger(tmp_path, store)
    logger.log_metrics({"x": 1.0}, step=0)
    spool = tmp_path / "run" / "mlflow_spool.jsonl"
    with open(spool, "a") as handle:
        handle.write('{"uri": "x", "run_id": "y", "type": "met')  # a crash in the middle of a write
    logger.log_metrics({"x": 2.0}, step=1)  # appended on a fresh line after the torn one
    assert sync_main(["--output-dir", str(tmp_path), "--tracking-uri", store]) == 1  # one refused line
    assert steps_of(MlflowClient(store), logger.run_id, "x") == [0, 1]
    [rejected] = (tmp_path / "run" / "mlflow_spool.rejected.jsonl").read_text().splitlines()
    assert "torn" in json.loads(rejected)["reason"]


def test_sync_argument_errors(tmp_path, capsys):
    assert sync_main(["--output-dir", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert sync_main(["--output-dir", str(tmp_path), "--tracking-uri", "file:./mlruns"]) == 2
    assert "file store" in capsys.readouterr().err


@pytest.mark.slow
def test_server_outage_points_are_kept_and_delivered(tmp_path, template_db):
    """A real `mlflow server` stops mid-run and comes back on the same port and database: every step exactly once."""
    server = MlflowServer(copy_store(template_db, tmp_path / "server.db"), log_path=tmp_path / "server.log")
    server.start()
    try:
        logger = ResilientMLFlowLogger(
            tmp_path / "run",
            tracking_uri=server.uri,
            experiment_name="outage",
            http_max_retries=0,
            http_timeout_s=5,
            retry_interval_s=0.0,  # try the store again on every call
        )
        client = MlflowClient(server.uri)
        for step in range(10):
            logger.log_metrics({"train/loss": float(step), "opt/lr": 0.5}, step=step)
        assert not logger.spool.exists()

        server.stop(kill=True)  # the server dies
        start = time.monotonic()
        for step in range(10, 20):
            logger.log_metrics({"train/loss": float(step), "opt/lr": 0.5}, step=step)
        assert time.monotonic() - start < 20  # training was not held up
        assert logger.num_spooled == 20
        plot = tmp_path / "plot.png"
        plot.write_bytes(b"grid")
        logger.log_artifact(plot)

        server.start()  # back, same port and database: the next call delivers the spool first
        for step in range(20, 30):
            logger.log_metrics({"train/loss": float(step), "opt/lr": 0.5}, step=step)
        assert not logger.spool.exists()
        for key in ("train/loss", "opt/lr"):
            assert steps_of(client, logger.run_id, key) == list(range(30))
        assert [a.path for a in client.list_artifacts(logger.run_id)] == ["plot.png"]

        # Down again at the end of training: finalize keeps the status, `var-lab sync` delivers it later.
        server.stop()
        for step in range(30, 35):
            logger.log_metrics({"train/loss": float(step), "opt/lr": 0.5}, step=step)
        with pytest.warns(UserWarning, match="var-lab sync"):
            logger.finalize("success")
        assert sync_main(["--output-dir", str(tmp_path)]) == 1  # still down: kept, not lost
        assert logger.spool.exists()
        server.start()
        assert sync_main(["--output-dir", str(tmp_path)]) == 0
        assert sync_main(["--output-dir", str(tmp_path)]) == 0  # nothing left; repeating is harmless
        for key in ("train/loss", "opt/lr"):
            assert steps_of(client, logger.run_id, key) == list(range(35))
        assert client.get_run(logger.run_id).info.status == "FINISHED"
    finally:
        server.stop()
