"""A real one-node SLURM (Debian's slurmctld + slurmd + munge, started by .ci/slurm_up.sh): sweeps submitted through
submitit's SlurmExecutor run and report their result; a job sent SIGUSR1 is checkpointed and requeued by Lightning
and resumes into the same MLflow run. Skipped when `sinfo` does not answer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from var_lab.sweeps.launchers import read_records, slurm_job_states

REPO_ROOT = Path(__file__).resolve().parents[1]


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mixed", "alloc"))


pytestmark = pytest.mark.skipif(not _slurm_answers(), reason="no SLURM cluster answers (run .ci/slurm_up.sh)")


def sweep_file(tmp_path: Path, max_steps: int, limit_train: int) -> Path:
    path = tmp_path / "sl.yaml"
    path.write_text(
        f"""\
name: sl
launcher: slurm
output_root: {tmp_path / "out"}
resources: {{nodes: 1, gpus_per_node: 0, cpus_per_task: 1, time_min: 20, signal_delay_s: 60}}
base:
  seed: 0
  tokenizer: {{vocab_size: 64, z_channels: 8, ch: 16, ch_mult: [1, 2, 2], num_res_blocks: 1,
              patch_nums: [1, 2, 4, 8], using_sa: false, using_mid_sa: false}}
  model: {{num_classes: 10}}
  data: {{name: fashion_mnist, resolution: 32, batch_size: 8, num_workers: 0, limit_train: {limit_train},
         limit_val: 16}}
  trainer: {{max_epochs: 1, max_steps: {max_steps}, log_every_n_steps: 1, limit_val_batches: 1,
            enable_progress_bar: false, text_progress_every_n_steps: 5}}
  tracking: {{sample_grid_every_n_val: 0}}
axes:
  depth: [1]
"""
    )
    return path


def var_lab(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "var_lab.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


@pytest.mark.slow
def test_sweep_run_submitted_to_real_slurm_through_submitit(tmp_path, fashion_mnist_dir):
    import submitit

    path = sweep_file(tmp_path, max_steps=3, limit_train=64)
    result = var_lab("sweep", "launch", str(path), "--wait")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "out" / "sl" / "depth=1"
    submit = [r for r in read_records(run_dir) if r.get("phase") == "submit"]
    assert len(submit) == 1 and submit[0]["job_id"].isdigit()
    job_id = submit[0]["job_id"]
    script = (run_dir / "slurm" / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --signal=USR1@60" in script and "#SBATCH --requeue" in script and "srun" in script
    # submitit's own view of the job: the pickled result of SweepJob
    job = submitit.SlurmJob(folder=run_dir / "slurm", job_id=job_id)
    outcome = job.result()
    assert outcome["outcome"] == "finished" and outcome["done"]["global_step"] == 3
    start = [r for r in read_records(run_dir) if r.get("phase") == "start"]
    assert [r["job_id"] for r in start] == [job_id]  # recorded inside the job, by rank 0
    status = json.loads(var_lab("sweep", "status", str(path), "--json").stdout)
    assert status["tasks"][0]["state"] == "finished" and status["tasks"][0]["step"] == 3
    # launching again submits nothing
    again = var_lab("sweep", "launch", str(path))
    assert "skip   depth=1: finished" in again.stdout and "submit" not in again.stdout


@pytest.mark.slow
def test_real_slurm_requeue_on_sigusr1_resumes_the_same_run(tmp_path, fashion_mnist_dir):
    import mlflow

    # long enough that the signal, sent at the job's first progress line (step 5), lands while it trains: 150
    # steps take 10 to 40 s on 2 cores, and the signal comes within a second of step 5
    max_steps = 150
    path = sweep_file(tmp_path, max_steps=max_steps, limit_train=8192)
    result = var_lab("sweep", "launch", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "out" / "sl" / "depth=1"
    job_id = next(r["job_id"] for r in read_records(run_dir) if r.get("phase") == "submit")
    status = json.loads(var_lab("sweep", "status", str(path), "--json").stdout)
    assert status["tasks"][0]["state"] in ("queued", "running") and status["tasks"][0]["job_id"] == job_id
    try:
        # wait until the job trains (its first progress line; MLflow's view of the metrics can lag behind on a fast
        # machine), then do what SLURM does signal_delay_s before the time limit
        uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
        job_log = run_dir / "slurm" / f"{job_id}_0_log.out"
        deadline = time.time() + 300
        while time.time() < deadline:
            if job_log.exists() and "var-lab fit: step " in job_log.read_text(errors="replace"):
                break
            time.sleep(0.1)
        started = job_log.exists() and "var-lab fit: step " in job_log.read_text(errors="replace")
        assert started, "training did not start"
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        assert not (run_dir / "DONE").exists(), "the job finished before it could be signalled: raise max_steps"
        signal = subprocess.run(["scancel", "--signal=USR1", job_id], capture_output=True, text=True)
        assert signal.returncode == 0, f"scancel: {signal.stderr} (job state {slurm_job_states([job_id])})"
        deadline = time.time() + 600
        while time.time() < deadline and not (run_dir / "DONE").exists():
            time.sleep(2)
        assert (run_dir / "DONE").exists(), "the requeued job did not finish"
    finally:
        if slurm_job_states([job_id]):
            subprocess.run(["scancel", job_id], check=False)
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")), "Lightning saved no HPC checkpoint"
    starts = [r for r in read_records(run_dir) if r.get("phase") == "start"]
    assert [r["job_id"] for r in starts] == [job_id, job_id]  # the same job, requeued
    ends = [r.get("outcome") for r in read_records(run_dir) if r.get("phase") == "end"]
    assert ends == ["requeued", "finished"]
    resumed_from = starts[1]["argv"][-1] if "--resume" in starts[1]["argv"] else "last.ckpt (resume=auto)"
    assert "ckpt" in resumed_from
    logs = (run_dir / "slurm" / f"{job_id}_0_log.out").read_text() + (
        run_dir / "slurm" / f"{job_id}_0_log.err"
    ).read_text()
    assert "resuming from" in logs
    done = json.loads((run_dir / "DONE").read_text())
    assert done["global_step"] == max_steps and done["mlflow_run_id"] == run_id
    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("sl")
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs([experiment.experiment_id])
    # one run of the point, resumed after the requeue (beside the sweep's parent run)
    assert [r.info.run_id for r in runs if r.data.tags.get("var_lab.kind") != "sweep"] == [run_id]
    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    if show.returncode == 0 and "Restarts=" in show.stdout:
        assert "Restarts=1" in show.stdout


@pytest.mark.slow
def test_cancel_a_real_slurm_job(tmp_path, fashion_mnist_dir):
    path = sweep_file(tmp_path, max_steps=100000, limit_train=1024)
    result = var_lab("sweep", "launch", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "out" / "sl" / "depth=1"
    job_id = next(r["job_id"] for r in read_records(run_dir) if r.get("phase") == "submit")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and slurm_job_states([job_id]).get(job_id) != "RUNNING":
            time.sleep(1)
        assert slurm_job_states([job_id]).get(job_id) == "RUNNING"
        cancel = var_lab("sweep", "cancel", str(path))
        assert cancel.returncode == 0 and f"scancel {job_id}" in cancel.stdout, cancel.stdout + cancel.stderr
        deadline = time.time() + 120
        while time.time() < deadline and slurm_job_states([job_id]).get(job_id) in ("RUNNING", "COMPLETING"):
            time.sleep(1)
        status = json.loads(var_lab("sweep", "status", str(path), "--json").stdout)
        assert status["tasks"][0]["state"] == "cancelled"
        dry = var_lab("sweep", "launch", str(path), "--dry-run")
        assert "## depth=1 [run]: start (resume cancelled)" in dry.stdout
    finally:
        subprocess.run(["scancel", job_id], check=False)
