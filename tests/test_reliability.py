"""Preemption safety: `var-lab fit` killed (SIGKILL) or stopped (SIGTERM, SIGUSR1) at random steps and resumed each
time ends with the weights of an uninterrupted run, in one MLflow run holding every step once; checkpoints are
written atomically and a truncated last.ckpt falls back to the previous good one with a warning."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from var_lab.cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8  # limit_train 64 / batch_size 8
EPOCHS = 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS


def tiny_run_config(output_dir: Path, tracking_uri: str, experiment: str) -> dict:
    """A depth-1 VAR on 64 Fashion-MNIST images with a tiny random tokenizer: 16 steps, a checkpoint after each."""
    return {
        "output_dir": str(output_dir),
        "seed": 7,
        "tokenizer": {
            "vocab_size": 64, "z_channels": 8, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
            "patch_nums": [1, 2, 3, 4, 6, 8], "using_sa": False, "using_mid_sa": False,
        },
        # Dropout, attention dropout, drop path and label dropping all on: a resume must restore the RNG exactly.
        "model": {"depth": 1, "attn_impl": "sdpa", "drop_rate": 0.1, "attn_drop_rate": 0.1, "drop_path_rate": 0.1},
        "data": {"name": "fashion_mnist", "batch_size": 8, "num_workers": 0, "limit_train": 64, "limit_val": 8},
        "optim": {"base_lr": 4.0e-3, "warmup_epochs": 0.5},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "log_every_n_steps": 1, "deterministic": True,
            "enable_progress_bar": False, "checkpoint_every_n_steps": 1, "val_check_interval": 4,
            "text_progress_every_n_steps": 4,
        },
        "tracking": {"tracking_uri": tracking_uri, "experiment": experiment, "sample_grid_every_n_val": 0},
    }  # fmt: skip


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def subprocess_env() -> dict[str, str]:
    # One thread everywhere: the same float reduction order in every process, whatever the machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_fit(config_path: Path, log_path: Path) -> subprocess.Popen:
    """``var-lab fit --config FILE`` in its own session (signals reach only it), output appended to ``log_path``."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "var_lab.cli", "fit", "--config", str(config_path)],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def steps_checkpointed(ckpt_dir: Path, since: float = 0.0) -> int:
    """Newest step checkpoint's global step (the names say it) written after ``since``; 0 when there is none."""
    steps = [0]
    for path in ckpt_dir.glob("step*.ckpt"):
        try:
            if path.stat().st_mtime >= since:
                steps.append(int(path.stem[len("step") :]))
        except (ValueError, FileNotFoundError):  # not a step name, or rotated away meanwhile
            continue
    return max(steps)


def wait_for_step(
    proc: subprocess.Popen, ckpt_dir: Path, step: int, log_path: Path, started: float, timeout_s: float = 240
) -> int:
    """Wait until ``proc`` (started at time ``started``) wrote the checkpoint of ``step`` or a later one: it is
    training by then (a file time on a coarse clock only makes this wait longer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = steps_checkpointed(ckpt_dir, since=started)
        if done >= step:
            return done
        if proc.poll() is not None:
            pytest.fail(f"fit ended (rc {proc.returncode}) before step {step}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint of step {step} within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def logged_steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, fashion_mnist_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from var_lab.tracking import ensure_store

    ensure_store(uri)  # created once here, before two processes use it
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "preempted"
    configs = [tiny_run_config(reference_dir, uri, "reference"), tiny_run_config(run_dir, uri, "preempted")]
    for config in configs:  # with an EMA of the weights (Lightning's EMAWeightAveraging), which must resume exactly
        config["optim"]["ema_decay"] = 0.9
    reference_cfg = write_config(tmp_path / "reference.yaml", configs[0])
    run_cfg = write_config(tmp_path / "preempted.yaml", configs[1])
    reference = start_fit(reference_cfg, tmp_path / "reference.log")  # runs alongside the interrupted one

    seed = int(os.environ.get("VAR_LAB_TEST_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    # Interruptions as a cluster delivers them: the OOM killer / node loss (SIGKILL, at a random moment inside a
    # step), a time limit or scancel (SIGTERM), SLURM's --signal=USR1@T warning (SIGUSR1); one lands near the end of
    # the first epoch, so a resume also crosses an epoch boundary.
    plan = [
        (signal.SIGKILL, rng.randint(1, 3)),
        (signal.SIGTERM, rng.randint(4, 6)),
        (signal.SIGKILL, STEPS_PER_EPOCH),
        (signal.SIGUSR1, rng.randint(10, 12)),
        (signal.SIGKILL, rng.randint(13, 14)),
    ]
    print(f"VAR_LAB_TEST_SEED={seed} plan={[(s.name, step) for s, step in plan]}")
    ckpt_dir = run_dir / "checkpoints"
    client = MlflowClient(uri)
    log_path = tmp_path / "preempted.log"
    run_ids = set()
    reached = 0
    for signum, step in plan:
        started = time.time()
        proc = start_fit(run_cfg, log_path)
        # A step this process trains (the previous one may have got further than planned before its signal).
        wait_for_step(proc, ckpt_dir, max(step, reached + 1), log_path, started)
        if signum != signal.SIGTERM:  # SIGTERM right after a checkpoint, the others anywhere in the next step
            time.sleep(rng.uniform(0.0, 0.15))  # compute, checkpoint write, logging, validation
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
        reached = steps_checkpointed(ckpt_dir)
        run_ids.add((run_dir / "mlflow_run_id").read_text().strip())
        assert not (run_dir / "DONE").exists() and not (run_dir / "FAILED").exists(), log_path.read_text()[-3000:]
        if signum == signal.SIGKILL:
            assert rc == -signal.SIGKILL
            continue
        # A clean stop: exit 128 + signal, a message that says how to resume, a checkpoint that covers every step
        # the run logged (nothing is redone), and the MLflow run marked KILLED until it resumes.
        assert rc == 128 + signum, log_path.read_text()[-3000:]
        assert f"stopped by {signum.name}" in log_path.read_text()
        last = load_checkpoint(ckpt_dir / "last.ckpt")
        run_id = last["var_lab"]["mlflow_run_id"]
        assert max(logged_steps(client, run_id)) == last["global_step"] - 1
        assert client.get_run(run_id).info.status == "KILLED"

    final = start_fit(run_cfg, log_path)
    assert final.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    log = log_path.read_text()
    assert log.count("resuming from") == len(plan)
    # The log is not a terminal: text lines in place of a bar, one every 4 steps, and the run's address.
    reference_id = (reference_dir / "mlflow_run_id").read_text().strip()
    reference_log = (tmp_path / "reference.log").read_text()
    lines = [x for x in reference_log.splitlines() if x.startswith("var-lab fit: step ")]
    assert [x.split()[3] for x in lines] == [f"{s}/{TOTAL_STEPS}" for s in (4, 8, 12, 16)], lines
    assert all(" loss " in x and " img/s " in x and " ETA " in x for x in lines), lines
    assert "val/L_mean" in lines[1]  # validated at step 4
    assert f"var-lab fit: MLflow run {reference_id} (training starts): `mlflow ui --backend-store-uri" in reference_log
    assert f"var-lab fit: MLflow run {reference_id} (training ended)" in reference_log

    # Same weights, optimiser state and step as the uninterrupted run: exactly (deterministic CPU, one thread).
    ours, theirs = load_checkpoint(ckpt_dir / "last.ckpt"), load_checkpoint(reference_dir / "checkpoints" / "last.ckpt")
    assert ours["global_step"] == theirs["global_step"] == TOTAL_STEPS
    for weights in ("state_dict", "current_model_state"):  # the EMA, and the trained weights
        assert ours[weights].keys() == theirs[weights].keys()
        different = [k for k in ours[weights] if not torch.equal(ours[weights][k], theirs[weights][k])]
        assert not different, f"{weights} differs from the uninterrupted run: {different[:5]}"
    assert ours["averaging_state"]["n_averaged"] == theirs["averaging_state"]["n_averaged"] == TOTAL_STEPS
    for ours_state, theirs_state in zip(ours["optimizer_states"][0]["state"].values(),
                                        theirs["optimizer_states"][0]["state"].values()):  # fmt: skip
        assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ("exp_avg", "exp_avg_sq"))

    # One MLflow run, the one named in mlflow_run_id, finished, with every step exactly once and the same losses.
    (run_id,) = run_ids
    experiment = client.get_experiment_by_name("preempted")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    for key in ("train/loss", "opt/lr", "opt/grad_norm", "compute/flops"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(TOTAL_STEPS)), key
        expected = {m.step: m.value for m in client.get_metric_history(reference_id, key)}
        assert {m.step: m.value for m in history} == expected, key
    val_steps = logged_steps(client, run_id, "val/L_mean")
    assert len(val_steps) == len(set(val_steps))  # validation is never logged twice either


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_stops_cleanly_with_dataloader_workers(tmp_path, fashion_mnist_dir):
    """scancel, a SLURM time limit, `timeout` and Ctrl-C signal the process group, DataLoader workers included; a
    worker killed by it used to fail the run ("DataLoader worker ... is killed by signal") instead of a clean stop."""
    run_dir = tmp_path / "run"
    config = tiny_run_config(run_dir, f"sqlite:///{tmp_path / 'mlflow.db'}", "process-group")
    config["data"]["num_workers"] = 2
    config["trainer"]["max_epochs"] = 50
    log_path = tmp_path / "fit.log"
    started = time.time()
    proc = start_fit(write_config(tmp_path / "run.yaml", config), log_path)
    wait_for_step(proc, run_dir / "checkpoints", 3, log_path, started)
    os.killpg(proc.pid, signal.SIGTERM)  # start_fit gave it its own session: the group is the fit and its workers
    rc = proc.wait(timeout=120)
    log = log_path.read_text()
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    assert "stopped by SIGTERM" in log and "DataLoader worker" not in log, log[-3000:]
    assert not (run_dir / "FAILED").exists()


def test_a_process_that_exits_with_live_persistent_workers_does_not_hang(tmp_path):
    """The workers ignore SIGTERM from the process group but not from their parent: Python's exit handler terminates
    daemonic children and joins them, and a worker deaf to that kept its parent (a whole test session, once) waiting
    forever. Here a script leaves a persistent loader's workers alive and exits; it must exit at once, cleanly."""
    script = tmp_path / "leave_workers.py"
    script.write_text(
        f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_data import make_image_folder
from var_lab.config import DataConfig
from var_lab.data.folders import ImageDataModule
module = ImageDataModule(DataConfig(name="folder", root=str(make_image_folder(Path({str(tmp_path)!r}) / "imgs")),
                                    batch_size=4, num_workers=2))
module.setup("fit")
loader = module.train_dataloader()
batches = list(loader)  # persistent workers: alive after the epoch, until the loader goes
import multiprocessing
print("workers alive:", len(multiprocessing.active_children()), flush=True)
"""
    )
    # a hang (the bug) raises TimeoutExpired here: the script itself takes seconds
    done = subprocess.run(
        [sys.executable, str(script)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "workers alive: 2" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "DataLoader worker" not in done.stderr, done.stderr[-3000:]


def test_truncated_last_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, fashion_mnist_dir):
    from var_lab.config import FitConfig, from_dict
    from var_lab.train import fit

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tmp_path / "run", uri, "fallback")
    config["trainer"].update(max_steps=3, val_check_interval=None)
    cfg = from_dict(FitConfig, config)
    first = fit(dataclasses.replace(cfg))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert first["global_step"] == 3 and (ckpt_dir / "step00000003.ckpt").exists()
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write torn by a crash (without our IO)

    cfg.trainer.max_steps = 5
    with pytest.warns(UserWarning, match=r"last\.ckpt is truncated or corrupt; falling back to an older one"):
        second = fit(cfg)
    assert second["global_step"] == 5 and second["mlflow_run_id"] == first["mlflow_run_id"]
    assert load_checkpoint(last)["global_step"] == 5  # rewritten whole
    assert logged_steps(MlflowClient(uri), first["mlflow_run_id"]) == [0, 1, 2, 3, 4]

    # Nothing readable left: a clear error instead of silently training from scratch into the same MLflow run.
    for path in ckpt_dir.glob("*.ckpt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"every checkpoint in .*checkpoints is truncated or corrupt.*--resume never"):
        fit(cfg)


def test_keep_checkpoints_holds_after_a_kill_before_the_first_last_checkpoint(tmp_path, fashion_mnist_dir):
    """A SIGKILL between the first step checkpoint and the first last.ckpt: the resumed run starts from that step
    checkpoint, and still ends with keep_checkpoints step checkpoints, not one more."""
    config = tiny_run_config(tmp_path / "run", "none", "keep")
    config["trainer"].update(max_steps=1, val_check_interval=None, keep_checkpoints=2)
    config_path = write_config(tmp_path / "run.yaml", config)
    assert cli_main(["fit", "--config", str(config_path)]) == 0
    ckpt_dir = tmp_path / "run" / "checkpoints"
    # What the kill leaves: step00000001.ckpt only (Lightning writes it before last.ckpt; the epoch-end save of
    # this 1-step run would come later still).
    for path in ckpt_dir.glob("*.ckpt"):
        if path.name != "step00000001.ckpt":
            path.unlink()
    (tmp_path / "run" / "DONE").unlink()
    assert cli_main(["fit", "--config", str(config_path), "--trainer.max_steps", "4"]) == 0
    assert sorted(p.name for p in ckpt_dir.glob("step*.ckpt")) == ["step00000003.ckpt", "step00000004.ckpt"]
    # Fewer kept from now on: the start of the next fit prunes the folder (the run is done: no save would).
    argv = ["fit", "--config", str(config_path), "--trainer.max_steps", "4", "--trainer.keep_checkpoints", "1"]
    assert cli_main(argv) == 0
    assert sorted(p.name for p in ckpt_dir.glob("step*.ckpt")) == ["step00000004.ckpt"]


def test_epoch_checkpoints_keep_only_the_newest(tmp_path, fashion_mnist_dir):
    """keep_checkpoints holds for epoch checkpoints too (at depth 10 each one is over a gigabyte)."""
    config = tiny_run_config(tmp_path / "run", "none", "epochs")
    config["trainer"].update(max_epochs=3, val_check_interval=None, checkpoint_every_n_steps=None, keep_checkpoints=2)
    assert cli_main(["fit", "--config", str(write_config(tmp_path / "run.yaml", config))]) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert names == ["epoch001.ckpt", "epoch002.ckpt", "last.ckpt"]


def test_epoch_is_logged_once_per_step(tmp_path, fashion_mnist_dir):
    """Lightning adds `epoch` to every batch of metrics it logs, and a step that validates logs two batches."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_run_config(tmp_path / "run", uri, "epoch")
    config["trainer"].update(max_steps=4, val_check_interval=2, checkpoint_every_n_steps=None)
    assert cli_main(["fit", "--config", str(write_config(tmp_path / "run.yaml", config))]) == 0
    client = MlflowClient(uri)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert logged_steps(client, run_id, "val/L_mean") == [1, 3]  # validations at the steps of two epoch points
    assert logged_steps(client, run_id, "epoch") == [0, 1, 2, 3]


def test_a_resumed_run_logs_the_sample_grids_of_an_uninterrupted_one(tmp_path, fashion_mnist_dir):
    """A grid every 2nd validation; validations after steps 2, 4 and 6: grids after steps 2 and 6, resumed or not."""
    config = tiny_run_config(tmp_path / "run", "none", "grids")
    config["trainer"].update(max_steps=2, val_check_interval=2, checkpoint_every_n_steps=None)
    config["tracking"]["sample_grid_every_n_val"] = 2
    config_path = write_config(tmp_path / "run.yaml", config)
    assert cli_main(["fit", "--config", str(config_path)]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["var_lab"]["val_count"] == 1
    assert cli_main(["fit", "--config", str(config_path), "--trainer.max_steps", "6"]) == 0  # resumes at step 2
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert grids == ["samples_step0000002.png", "samples_step0000006.png"]


SAVE_LOOP = """
import sys, torch
from pathlib import Path
from var_lab.resilience import save_atomic
path = Path(sys.argv[1])
for i in range(10**6):
    save_atomic({"i": i, "w": torch.full((4_000_000,), float(i))}, path)  # 16 MB per write
    print(i, flush=True)
"""


@pytest.mark.slow
def test_checkpoint_writes_are_atomic_under_sigkill(tmp_path):
    """Kill a process in the middle of rewriting a checkpoint, again and again: the file is always whole."""
    from var_lab.resilience import remove_stale_temporaries

    path = tmp_path / "ckpt" / "last.ckpt"
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2):  # at least one whole write, then a kill at a random moment of a later one
            assert proc.stdout.readline(), "the writer died"
        time.sleep(rng.uniform(0.0, 0.2))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        data = torch.load(path, weights_only=True)  # never torn
        assert torch.equal(data["w"], torch.full((4_000_000,), float(data["i"])))
        remove_stale_temporaries(path.parent)
        assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_atomic_save_failure_keeps_the_previous_file(tmp_path):
    from var_lab.resilience import save_atomic

    path = tmp_path / "last.ckpt"
    save_atomic({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resumable_loader_replays_the_epoch_and_skips_what_was_trained(tmp_path):
    from torch.utils.data import TensorDataset

    from var_lab.config import DataConfig
    from var_lab.data.folders import make_loader

    torch.manual_seed(11)
    dataset = TensorDataset(torch.arange(48))
    for workers in (0, 2):
        config = DataConfig(batch_size=4, num_workers=workers)
        whole = make_loader(dataset, config, shuffle=True, drop_last=True)
        epochs = [[b[0].tolist() for b in whole] for _ in range(2)]
        assert epochs[0] != epochs[1] and sorted(sum(epochs[1], [])) == sorted(sum(epochs[0], []))
        interrupted = make_loader(dataset, config, shuffle=True, drop_last=True)
        interrupted.sampler.set_epoch(1)  # what Lightning does at each epoch start
        iterator = iter(interrupted)
        seen = [next(iterator)[0].tolist() for _ in range(5)]
        state = interrupted.state_dict()
        assert state == {"epoch": 1, "batches_done": 5}
        resumed = make_loader(dataset, config, shuffle=True, drop_last=True)
        resumed.load_state_dict(state)
        assert len(resumed) == len(whole)  # Lightning counts the skipped batches as fetched
        assert seen + [b[0].tolist() for b in resumed] == epochs[1]
        assert resumed.state_dict() == {"epoch": 1, "batches_done": 0}  # the epoch is over


def test_validation_follows_predicts_lightnings_own_validation_steps(tmp_path):
    """``validation_follows`` reads Lightning internals (no public hook says "a validation follows this step"): this
    fails, rather than StepCheckpoint silently saving too early, when a Lightning release changes them."""
    import lightning as L

    from var_lab.resilience import validation_follows

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            self.log("v", self.layer(batch[0]).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Probe(L.Callback):
        predicted, validated = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if validation_follows(trainer):
                self.predicted.append(trainer.global_step)

        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.validated.append(trainer.global_step)

    data = torch.utils.data.TensorDataset(torch.randn(20, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # 10 steps an epoch
    for interval, expected in ((3, [3, 6, 9, 12, 15, 18]), (None, [10, 20])):
        Probe.predicted, Probe.validated = [], []
        kwargs = {"val_check_interval": interval, "check_val_every_n_epoch": None} if interval else {}
        trainer = L.Trainer(
            max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[Probe()], default_root_dir=tmp_path, limit_val_batches=1, **kwargs,
        )  # fmt: skip
        trainer.fit(Tiny(), loader, loader)
        assert Probe.validated[: len(Probe.predicted)] == Probe.predicted and Probe.predicted, (
            interval,
            Probe.__dict__,
        )
        assert Probe.validated == expected or Probe.validated == [s for s in expected if s != 20] + [20]
