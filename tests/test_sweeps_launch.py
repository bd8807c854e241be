"""Launching sweeps for real: claims across processes, idempotent relaunch, failed runs and `resume`, an interrupted
run resuming into the same MLflow run, two concurrent launches, submitit's local executor, Lightning's SLURM
requeue on SIGUSR1 (fake scontrol), and one tiny step of every shipped sweep."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from var_lab.sweeps.decisions import Decision, Why
from var_lab.sweeps.expand import expand
from var_lab.sweeps.launchers import (
    CLAIM_NAME,
    Claim,
    Launcher,
    SweepJob,
    read_claim,
    read_records,
    resume_argument,
)
from var_lab.sweeps.schema import load_sweep
from var_lab.sweeps.status import collect_status, task_state

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# A tokenizer and VAR small enough for a CPU step in well under a second (an untrained tokenizer: no checkpoint).
TINY_TOKENIZER = {
    "tokenizer.vocab_size": 64,
    "tokenizer.z_channels": 8,
    "tokenizer.ch": 16,
    "tokenizer.ch_mult": [1, 2, 2],
    "tokenizer.num_res_blocks": 1,
    "tokenizer.patch_nums": [1, 2, 4, 8],
    "tokenizer.using_sa": False,
    "tokenizer.using_mid_sa": False,
}


def tiny_sweep(tmp_path: Path, name: str = "tiny", depths=(1, 2), extra: str = "", max_steps: int = 3) -> Path:
    tok = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in TINY_TOKENIZER.items())
    text = f"""\
name: {name}
launcher: local
output_root: {tmp_path / "out"}
resources: {{nodes: 1, gpus_per_node: 0, cpus_per_task: 1, time_min: 30}}
base:
{tok}
  seed: 0
  model.num_classes: 10
  data: {{name: fashion_mnist, resolution: 32, batch_size: 8, num_workers: 0, limit_train: 64, limit_val: 16}}
  trainer: {{max_epochs: 1, max_steps: {max_steps}, log_every_n_steps: 1, limit_val_batches: 1,
            enable_progress_bar: false}}
  tracking.sample_grid_every_n_val: 0
axes:
  depth: {list(depths)}
{textwrap.dedent(extra)}"""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def var_lab(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "var_lab.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


def mlflow_runs(tracking_uri: str, experiment: str) -> list:
    """The point runs of a sweep's experiment (its parent run, ``var_lab.kind=sweep``, checked and left out)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("var_lab.kind") == "sweep"]
    assert len(parents) <= 1, "one parent run per sweep"
    points = [r for r in runs if r not in parents]
    # every run of a launched sweep is a child of its parent run
    assert not parents or all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in points)
    return points


def starts(task_dir: Path) -> list[dict]:
    return [r for r in read_records(task_dir) if r.get("phase") == "start"]


# ------------------------------------------------------------------------------------------------------ claims


def _claim_worker(root: str, names: list, seed: int, results, release) -> None:
    random.Random(seed).shuffle(names)
    won = []
    for name in names:
        claim, _ = Claim.acquire(Path(root) / name, owner="test")
        if claim is not None:
            won.append(name)
    results.put((os.getpid(), won))
    release.wait(60)  # hold the claims until every worker has tried


def test_claims_are_exclusive_across_processes(tmp_path):
    names = [f"depth={d}" for d in range(24)]
    ctx = mp.get_context("spawn")
    results, release = ctx.Queue(), ctx.Event()
    args = [(str(tmp_path), list(names), seed, results, release) for seed in range(4)]
    workers = [ctx.Process(target=_claim_worker, args=a) for a in args]
    for w in workers:
        w.start()
    won = [results.get(timeout=120) for _ in workers]
    release.set()
    for w in workers:
        w.join(60)
    claimed = [name for _, names_won in won for name in names_won]
    assert sorted(claimed) == sorted(names), "every task claimed exactly once"
    for pid, names_won in won:
        for name in names_won:
            assert read_claim(tmp_path / name)["pid"] == pid


def test_stale_and_live_claims(tmp_path):
    # a claim whose process is gone is stale: taken over
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    d = tmp_path / "a"
    d.mkdir()
    (d / CLAIM_NAME).write_text(json.dumps({"owner": "local", "host": os.uname().nodename, "pid": dead.pid}))
    claim, holder = Claim.acquire(d, owner="test")
    assert claim is not None and holder is None and read_claim(d)["pid"] == os.getpid()
    # a claim of a live process is respected, and so is one from another host
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    try:
        for i, info in enumerate(
            [
                {"owner": "local", "host": os.uname().nodename, "pid": sleeper.pid},
                {"owner": "local", "host": "some-other-node", "pid": 1},
            ]
        ):
            d = tmp_path / f"live{i}"
            d.mkdir()
            (d / CLAIM_NAME).write_text(json.dumps(info))
            claim, holder = Claim.acquire(d, owner="test")
            assert claim is None and holder["pid"] == info["pid"]
    finally:
        sleeper.kill()
        sleeper.wait()
    # a pid reused by another process is not the owner (start time differs)
    d = tmp_path / "reused"
    d.mkdir()
    info = {"owner": "local", "host": os.uname().nodename, "pid": os.getpid(), "pid_start": 1}
    (d / CLAIM_NAME).write_text(json.dumps(info))
    assert Claim.acquire(d, owner="test")[0] is not None
    # an empty claim (being written) is respected while young, broken when old
    d = tmp_path / "empty"
    d.mkdir()
    (d / CLAIM_NAME).write_text("")
    assert Claim.acquire(d, owner="test")[0] is None
    old = time.time() - 300
    os.utime(d / CLAIM_NAME, (old, old))
    claim, _ = Claim.acquire(d, owner="test")
    assert claim is not None
    claim.release()
    assert not (d / CLAIM_NAME).exists()


def test_resume_argument_prefers_a_newer_hpc_checkpoint(tmp_path):
    plan = expand(load_sweep(tiny_sweep(tmp_path, depths=(1,))))
    task = plan.runs[0]
    ckpts = task.task_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    assert resume_argument(task) == []
    (ckpts / "last.ckpt").write_bytes(b"x")
    hpc = task.task_dir / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"x")
    os.utime(ckpts / "last.ckpt", (time.time() - 100, time.time() - 100))
    assert resume_argument(task) == ["--resume", str(hpc)]
    os.utime(ckpts / "last.ckpt", None)
    os.utime(hpc, (time.time() - 100, time.time() - 100))
    assert resume_argument(task) == []  # last.ckpt is newer: resume=auto takes it


# ------------------------------------------------------------------------------------------- real runs (slow)


@pytest.mark.slow
def test_local_launch_idempotent_failed_marked_and_resume_retries_only_failed(tmp_path, fashion_mnist_dir):
    bad = 'overrides:\n  depth:\n    2: {tokenizer_ckpt: "/nonexistent/tokenizer.ckpt"}\n'
    path = tiny_sweep(tmp_path, extra=bad)
    out = tmp_path / "out"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    first = var_lab("sweep", "launch", str(path))
    assert first.returncode == 1, first.stdout + first.stderr  # one run failed
    d1, d2 = out / "tiny" / "depth=1", out / "tiny" / "depth=2"
    assert (d1 / "DONE").exists() and (d2 / "FAILED").exists() and not (d2 / "DONE").exists()
    status = json.loads(var_lab("sweep", "status", str(path), "--json").stdout)
    by_task = {row["task"]: row for row in status["tasks"]}
    assert by_task["depth=1"]["state"] == "finished" and by_task["depth=1"]["step"] == 3
    assert by_task["depth=1"]["train_loss"] > 0 and by_task["depth=1"]["pflops"] > 0
    assert by_task["depth=2"]["state"] == "failed" and "nonexistent" in by_task["depth=2"]["error"]
    table = var_lab("sweep", "status", str(path)).stdout
    assert "failed" in table and "/nonexistent/tokenizer.ckpt" in table
    runs = mlflow_runs(uri, "tiny")
    finished = [r for r in runs if r.data.tags.get("var_lab.point") == "depth=1"]
    assert len(finished) == 1 and finished[0].data.tags["var_lab.sweep"] == "tiny"
    run = finished[0].info
    assert f"(serve them with `mlflow ui --backend-store-uri {uri}`)" in table
    assert f"http://127.0.0.1:5000/#/experiments/{run.experiment_id}/runs/{run.run_id}" in table
    # its log is no terminal: the run's address and text progress, not a bar
    (log,) = (d1 / "logs").glob("run-*.log")
    assert f"var-lab fit: MLflow run {run.run_id} (training starts)" in log.read_text()

    # launching again: the finished run is skipped, the failed run left alone (resume retries it)
    second = var_lab("sweep", "launch", str(path))
    assert second.returncode == 1
    assert "skip   depth=1: finished" in second.stdout and "skip   depth=2: failed" in second.stdout
    assert len(starts(d1)) == 1 and len(starts(d2)) == 1
    assert len(mlflow_runs(uri, "tiny")) == len(runs)

    # fix the sweep, resume: only the failed run runs again
    path.write_text(path.read_text().replace(bad, ""))
    third = var_lab("sweep", "resume", str(path))
    assert third.returncode == 0, third.stdout + third.stderr
    assert "start  depth=2 (retry failed)" in third.stdout and "skip   depth=1: finished" in third.stdout
    assert (d2 / "DONE").exists() and (d2 / "FAILED.1").exists() and not (d2 / "FAILED").exists()
    assert len(starts(d1)) == 1 and len(starts(d2)) == 2
    points = sorted(r.data.tags["var_lab.point"] for r in mlflow_runs(uri, "tiny") if r.info.status == "FINISHED")
    assert points[-2:] == ["depth=1", "depth=2"] or points == ["depth=1", "depth=2"]


@pytest.mark.slow
def test_launch_again_retries_a_failed_stage_but_not_the_finished_run(tmp_path, fashion_mnist_dir):
    blocker = tmp_path / "report_is_a_file"
    blocker.write_text("not a folder\n")
    path = tiny_sweep(tmp_path, depths=(1,), extra=f"analyze: {{out: {blocker}}}\n")
    sweep_dir = tmp_path / "out" / "tiny"
    first = var_lab("sweep", "launch", str(path))
    assert first.returncode != 0, first.stdout + first.stderr
    assert (sweep_dir / "analyze" / "FAILED").exists() and (sweep_dir / "depth=1" / "DONE").exists()
    # the same command again, once the cause is gone: the failed stage runs again, the finished run does not
    blocker.unlink()
    second = var_lab("sweep", "launch", str(path))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "start  analyze (retry failed)" in second.stdout and "skip   depth=1: finished" in second.stdout
    assert (blocker / "report.md").is_file() and (sweep_dir / "analyze" / "DONE").exists()
    assert len(starts(sweep_dir / "depth=1")) == 1 and len(starts(sweep_dir / "analyze")) == 2


@pytest.mark.slow
def test_an_interrupted_run_resumes_into_the_same_mlflow_run(tmp_path, fashion_mnist_dir):
    path = tiny_sweep(tmp_path, depths=(1,), max_steps=30)
    path.write_text(
        path.read_text().replace("limit_train: 64", "limit_train: 1024")
        + "\n"
        + "overrides:\n  depth:\n    1: {trainer.checkpoint_every_n_steps: 5}\n"
    )
    run_dir = tmp_path / "out" / "tiny" / "depth=1"
    launcher = subprocess.Popen(
        [PY, "-m", "var_lab.cli", "sweep", "launch", str(path)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not list((run_dir / "checkpoints").glob("step*.ckpt")) and time.time() < deadline:
        time.sleep(0.2)
    assert list((run_dir / "checkpoints").glob("step*.ckpt")), "no step checkpoint appeared"
    # the launcher and its training process die without a word (node failure, OOM killer)
    child_pgid = read_claim(run_dir)["child_pgid"]
    os.killpg(launcher.pid, signal.SIGKILL)
    os.killpg(child_pgid, signal.SIGKILL)
    launcher.wait()
    time.sleep(0.5)
    plan = expand(load_sweep(path))
    assert task_state(plan.runs[0]).state == "interrupted"
    first_run_id = (run_dir / "mlflow_run_id").read_text().strip()

    again = var_lab("sweep", "launch", str(path))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "start  depth=1 (resume interrupted)" in again.stdout
    done = json.loads((run_dir / "DONE").read_text())
    assert done["global_step"] == 30 and done["mlflow_run_id"] == first_run_id
    log = sorted((run_dir / "logs").glob("run-*.log"))[-1].read_text()
    assert "resuming from" in log
    runs = mlflow_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "tiny")
    assert [r.info.run_id for r in runs] == [first_run_id]


@pytest.mark.slow
def test_a_trainer_outliving_its_killed_launcher_owns_its_folder(tmp_path, fashion_mnist_dir):
    """kill -9 of the launcher's process group leaves its trainer running (its own session): status says running,
    resume starts no second trainer, a second `var-lab fit` on the folder refuses naming the pid, and the one
    MLflow run holds every step once."""
    from mlflow.tracking import MlflowClient

    from var_lab.run_lock import trainer_holding

    path = tiny_sweep(tmp_path, depths=(1,), max_steps=40)
    path.write_text(path.read_text().replace("limit_train: 64", "limit_train: 1024"))
    run_dir = tmp_path / "out" / "tiny" / "depth=1"
    launcher = subprocess.Popen(
        [PY, "-m", "var_lab.cli", "sweep", "launch", str(path)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (run_dir / "mlflow_run_id").exists() and time.time() < deadline:
        time.sleep(0.2)
    holder = trainer_holding(run_dir)
    assert holder is not None and holder["pid"] == read_claim(run_dir)["child_pid"], holder
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group only: the trainer has its own session
    launcher.wait()
    assert trainer_holding(run_dir) is not None, "the trainer died with its launcher"

    # The trainer is paused (alive, holding its folder) while the checks run, so on a slow machine it cannot finish
    # its 40 steps before the second `var-lab fit` tries the folder.
    os.kill(holder["pid"], signal.SIGSTOP)
    try:
        status = var_lab("sweep", "status", str(path), "--no-mlflow")
        (row,) = [line.split() for line in status.stdout.splitlines() if line.startswith("depth=1")]
        assert row[1] == "running" and f"pid {holder['pid']}" in " ".join(row), status.stdout
        assert task_state(expand(load_sweep(path)).runs[0]).state == "running"
        resumed = var_lab("sweep", "resume", str(path))
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"skip   depth=1: running (trainer pid {holder['pid']}" in resumed.stdout
        second = var_lab("fit", "--config", str(run_dir / "config.yaml"))
    finally:
        os.kill(holder["pid"], signal.SIGCONT)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"is in use by another trainer, pid {holder['pid']} on " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr

    deadline = time.time() + 600
    while not (run_dir / "DONE").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert json.loads((run_dir / "DONE").read_text())["global_step"] == 40
    assert len(starts(run_dir)) == 1  # exactly one trainer was ever started
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    (run,) = mlflow_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "tiny")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(40)), steps  # every step once
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/L_mean")]
    assert len(val_steps) == len(set(val_steps))


@pytest.mark.slow
def test_two_concurrent_launches_start_each_run_once(tmp_path, fashion_mnist_dir):
    path = tiny_sweep(tmp_path, depths=(1, 2, 3))
    procs = [
        subprocess.Popen(
            [PY, "-m", "var_lab.cli", "sweep", "launch", str(path)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    sweep_dir = tmp_path / "out" / "tiny"
    for depth in (1, 2, 3):
        run_dir = sweep_dir / f"depth={depth}"
        assert (run_dir / "DONE").exists()
        assert len(starts(run_dir)) == 1, f"depth={depth} started {len(starts(run_dir))} times"
        assert sum(f"start  depth={depth} " in o for o in outputs) == 1
        assert not (run_dir / CLAIM_NAME).exists()  # released at the end
    runs = mlflow_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "tiny")
    assert sorted(r.data.tags["var_lab.point"] for r in runs) == ["depth=1", "depth=2", "depth=3"]


@pytest.mark.slow
def test_slurm_launcher_through_submitit_local_executor(tmp_path, fashion_mnist_dir):
    path = tiny_sweep(tmp_path, depths=(2,))
    result = var_lab("sweep", "launch", str(path), "--launcher", "slurm", "--submitit-cluster", "local")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "out" / "tiny" / "depth=2"
    assert (run_dir / "DONE").exists()
    records = read_records(run_dir)
    submit = [r for r in records if r.get("phase") == "submit"]
    start = [r for r in records if r.get("phase") == "start"]
    assert len(submit) == 1 and submit[0]["job_id"].startswith("local:")
    assert len(start) == 1 and start[0]["launcher"] == "slurm"  # written by SweepJob inside the job
    results = list((run_dir / "slurm").glob("*_result.pkl"))
    assert results, "submitit wrote no result"
    import submitit

    job = submitit.local.local.LocalJob(run_dir / "slurm", submit[0]["job_id"].split(":")[1])
    outcome = job.result()
    assert outcome["outcome"] == "finished" and outcome["done"]["global_step"] == 3
    rows = collect_status(expand(load_sweep(path)))
    assert rows[0]["state"] == "finished"


@pytest.mark.slow
def test_lightning_requeue_on_sigusr1_with_fake_scontrol(tmp_path, fashion_mnist_dir):
    """The SLURM preemption path: Lightning (not submitit) handles SIGUSR1, saves an HPC checkpoint and calls
    `scontrol requeue`; the requeued job resumes from it into the same MLflow run."""
    import mlflow
    from submitit.core.utils import DelayedSubmission, JobPaths

    path = tiny_sweep(tmp_path, depths=(1,), max_steps=80)
    path.write_text(path.read_text().replace("limit_train: 64", "limit_train: 1024"))
    plan = expand(load_sweep(path))
    Launcher(plan, out=lambda line: None).write_configs({t.name: Decision(Why.NEW) for t in plan.tasks})
    task = plan.runs[0]
    folder = task.task_dir / "slurm"
    folder.mkdir(parents=True)
    job_id = "4242"
    DelayedSubmission(SweepJob(task)).dump(JobPaths(folder, job_id=job_id).submitted_pickle)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol.calls"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "tiny:depth=1",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODELIST": "localhost",
        "SLURM_JOB_NODELIST": "localhost",
    }
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    command = [PY, "-u", "-m", "submitit.core._submit", str(folder)]  # what srun runs in the sbatch script
    log = open(tmp_path / "job.log", "wb")
    job = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        run_id_file = task.task_dir / "mlflow_run_id"
        deadline = time.time() + 300
        history = []
        while time.time() < deadline and job.poll() is None:
            if run_id_file.exists():
                client = mlflow.MlflowClient(tracking_uri=plan.tracking_uri)
                history = client.get_metric_history(run_id_file.read_text().strip(), "train/loss")
                if len(history) >= 3:
                    break
            time.sleep(0.3)
        assert len(history) >= 3, (tmp_path / "job.log").read_text()[-3000:]
        job.send_signal(signal.SIGUSR1)  # SLURM: --signal=USR1@<signal_delay_s>
        deadline = time.time() + 120
        while time.time() < deadline and not (calls.exists() and list(task.task_dir.glob("hpc_ckpt_*.ckpt"))):
            time.sleep(0.2)
        hpc = list(task.task_dir.glob("hpc_ckpt_*.ckpt"))
        assert hpc, "Lightning saved no HPC checkpoint: " + (tmp_path / "job.log").read_text()[-3000:]
        assert calls.read_text().split() == ["requeue", job_id]
        assert job.poll() is None  # the job keeps training until SLURM ends it
        job.send_signal(signal.SIGTERM)  # what `scontrol requeue` does to the running job (SIGKILL after KillWait)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    run_id = (task.task_dir / "mlflow_run_id").read_text().strip()
    assert not (task.task_dir / "DONE").exists()

    # the requeued job: same job id, same pickle, same command
    log = open(tmp_path / "job2.log", "wb")
    second = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, timeout=600)
    assert second.returncode == 0, (tmp_path / "job2.log").read_text()[-3000:]
    done = json.loads((task.task_dir / "DONE").read_text())
    assert done["global_step"] == 80 and done["mlflow_run_id"] == run_id
    ends = [r.get("outcome") for r in read_records(task.task_dir) if r.get("phase") == "end"]
    assert ends == ["requeued", "finished"]
    assert not (task.task_dir / "FAILED").exists()  # a requeue is not a failure
    resumed = [r for r in read_records(task.task_dir) if r.get("phase") == "start"]
    assert len(resumed) == 2 and resumed[1]["argv"][-2:] == ["--resume", str(hpc[0])]
    assert "resuming from" in (tmp_path / "job2.log").read_text()
    runs = mlflow_runs(plan.tracking_uri, "tiny")
    assert [r.info.run_id for r in runs] == [run_id]


# A tiny step of every shipped sweep: its first point, sizes overridden down, stages that need outside data off.
SHIPPED_TINY = {
    "demo_cpu.yaml": [
        "--patch",
        "tokenizer.train.trainer.max_steps=1",
        "--patch",
        "tokenizer.train.data.limit_train=32",
        "--patch",
        "tokenizer.train.data.limit_val=16",
        "--patch",
        "tokenizer.train.trainer.limit_val_batches=1",
        "--patch",
        "base.data.limit_train=32",
        "--patch",
        "base.data.limit_val=16",
        "--patch",
        "eval=false",
        "--patch",
        "analyze=false",
    ],
    "var_imagenet256.yaml": ["--patch", "tokenizer=null", "--patch", "tokenize=false", "--patch", "eval=false"],
    "var_scaling_ladder.yaml": ["--patch", "tokenizer=null", "--patch", "tokenize=false", "--patch", "eval=false"],
    "tokenizer.yaml": [],
}
IMAGENET_DOWN = [
    "data.name=fashion_mnist",
    "data.root=null",
    "data.resolution=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.limit_train=32",
    "data.limit_val=16",
    "trainer.precision=32-true",
    "trainer.val_check_interval=null",
    "trainer.limit_val_batches=1",
    "trainer.activation_checkpointing=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED_TINY))
def test_every_shipped_sweep_runs_one_tiny_step(name, tmp_path, fashion_mnist_dir):
    path = REPO_ROOT / "sweeps" / name
    first = expand(load_sweep(path)).runs[0].name
    args = ["sweep", "launch", str(path), "--output-root", str(tmp_path), "--only", first, "--launcher", "local"]
    args += SHIPPED_TINY[name]
    sets = ["trainer.max_steps=1", "resources.nodes=1", "resources.gpus_per_node=0"]
    if name != "demo_cpu.yaml":
        sets += IMAGENET_DOWN + [f"{k}={json.dumps(v)}" for k, v in TINY_TOKENIZER.items()]
    if name == "tokenizer.yaml":
        sets += ["loss.perceptual_weight=0", "loss.lpips_weights=null", "loss.disc_weight=0"]
    else:
        sets += ["model.depth=1"] + (["model.num_classes=10"] if name != "demo_cpu.yaml" else [])
    for item in sets:
        args += ["--set", item]
    result = var_lab(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep = load_sweep(path)
    done = json.loads((tmp_path / sweep.name / first / "DONE").read_text())
    assert done["global_step"] == 1
    runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", sweep.experiment)
    assert first in {r.data.tags.get("var_lab.point") for r in runs}


@pytest.mark.slow
def test_cancel_stops_a_local_launch_and_launch_resumes_it(tmp_path, fashion_mnist_dir):
    path = tiny_sweep(tmp_path, depths=(1, 2), max_steps=100000)
    path.write_text(path.read_text().replace("limit_train: 64", "limit_train: 1024"))
    run_dir = tmp_path / "out" / "tiny" / "depth=1"
    launcher = subprocess.Popen(
        [PY, "-m", "var_lab.cli", "sweep", "launch", str(path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "mlflow_run_id").exists():
            time.sleep(0.2)
        assert (run_dir / "mlflow_run_id").exists(), "training did not start"
        child = read_claim(run_dir)["child_pid"]
        result = var_lab("sweep", "cancel", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "cancelled depth=1" in result.stdout
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, output
    assert "start  depth=2" not in output  # the launcher stopped: nothing new started
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()
    plan = expand(load_sweep(path))
    assert [task_state(t).state for t in plan.runs] == ["cancelled", "pending"]
    assert not (run_dir / CLAIM_NAME).exists()
    dry = var_lab("sweep", "launch", str(path), "--dry-run")
    assert "## depth=1 [run]: start (resume cancelled)" in dry.stdout
