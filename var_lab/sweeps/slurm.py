"""The SLURM launcher (submitit): one job per task, chained with dependencies, and the job function it runs.

Preemption belongs to Lightning alone: jobs get ``--signal=USR1@<signal_delay_s>`` and ``--requeue``; Lightning saves
a checkpoint and runs ``scontrol requeue``, and the requeued job resumes (see ``var_lab.sweeps.schema`` and
:class:`SweepJob`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

from var_lab.atomic import write_atomic
from var_lab.sweeps.claims import (
    SLURM_ACTIVE_STATES,
    Claim,
    archive_outcome,
    describe_owner,
    newest_hpc_checkpoint,
    record_launch,
    resume_argument,
    slurm_job_states,
    write_outcome,
)
from var_lab.sweeps.expand import Task
from var_lab.sweeps.schema import SweepError


def hand_preemption_to_lightning() -> None:
    """Undo the signal handlers submitit installs in each task, so that Lightning alone owns preemption.

    submitit's ``process_job`` binds SIGTERM and SIGCONT to a logging bypass and its preemption signal (USR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) to checkpoint-and-requeue. Lightning installs its SIGUSR1 requeue
    handler only where no handler is set, and chains SIGTERM to an existing handler. Restoring the defaults lets
    Lightning install both; submitit's own signal, when it is not USR1, is ignored (nobody sends it: the sbatch script
    asks for USR1).
    """
    from submitit.core.job_environment import JobEnvironment

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)
    submitit_signal = JobEnvironment._usr_sig()
    signal.signal(submitit_signal, signal.SIG_DFL if submitit_signal == signal.SIGUSR1 else signal.SIG_IGN)


def _mtime(path: Optional[Path]) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except FileNotFoundError:
        return 0.0


class SweepJob:
    """The function each task of a SLURM job runs (pickled by submitit; it defines no ``checkpoint()`` on purpose).

    Runs ``var-lab <argv>`` in-process after :func:`hand_preemption_to_lightning`, resuming from Lightning's HPC
    checkpoint when a requeue left one; rank 0 records the job, writes DONE / FAILED where the command does not, and
    releases the task's claim when the job ends.
    """

    def __init__(self, task: Task):
        self.task = task

    def __call__(self) -> dict:
        hand_preemption_to_lightning()
        import submitit

        env = submitit.JobEnvironment()
        rank = env.global_rank
        task = self.task
        if env.num_tasks > 1 and (env.cluster == "local" or task.stage not in ("run", "tokenizer")):
            # tokenize and eval read torch's RANK / WORLD_SIZE / MASTER_ADDR (Lightning reads SLURM_* itself)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        argv = list(task.argv) + resume_argument(task)
        started = time.time()
        hpc_before = _mtime(newest_hpc_checkpoint(task.task_dir))
        if rank == 0:
            record_launch(task.task_dir, launcher="slurm", job_id=env.job_id, pid=os.getpid(), argv=argv, phase="start")
            archive_outcome(task)
        from var_lab.commands import run_command

        try:
            rc = run_command(argv[0], argv[1:])
        except SystemExit as exc:  # argument errors of jsonargparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            rc = 1
            if rank == 0 and not task.failed_file.exists():
                import traceback

                write_atomic(task.failed_file, traceback.format_exc())
        outcome = None
        requeued = rc != 0 and _mtime(newest_hpc_checkpoint(task.task_dir)) > hpc_before
        if requeued:
            # Lightning saved an HPC checkpoint and requeued the job; SLURM's SIGTERM then stopped training
            outcome = "requeued"
            if rank == 0:
                archive_outcome(task)
                record_launch(task.task_dir, launcher="slurm", job_id=env.job_id, phase="end", rc=rc, outcome=outcome)
            return {"task": task.name, "rank": rank, "rc": rc, "outcome": outcome, "done": {}}
        if rank == 0:
            outcome = write_outcome(task, rc, None, started, {"job_id": env.job_id})
            # The claim stays: it names this job, and squeue says when the job is over (a requeued job still owns it).
            record_launch(task.task_dir, launcher="slurm", job_id=env.job_id, phase="end", rc=rc, outcome=outcome)
        if rc:
            raise RuntimeError(f"var-lab {' '.join(task.argv[:1])} exited with {rc}; see {task.failed_file}")
        done = {}
        with contextlib.suppress(OSError, json.JSONDecodeError):
            done = json.loads(task.done_file.read_text())
        return {"task": task.name, "rank": rank, "rc": rc, "outcome": outcome, "done": done}


# ------------------------------------------------------------------------------------------------- SLURM (submitit)


def slurm_parameters(task: Task, sweep_name: str, dependency: Optional[str] = None) -> dict:
    """SlurmExecutor parameters (sbatch options) for a task."""
    from submitit.slurm.slurm import _convert_mem

    res = task.resources
    nodes = res.nodes if task.distributed else 1
    tasks_per_node = res.processes_per_node if task.distributed else 1
    extra = {"signal": f"USR1@{res.signal_delay_s}", "requeue": True, **res.sbatch}
    params: dict[str, Any] = {
        "job_name": f"{sweep_name}:{task.name}",
        "time": res.time_min,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "signal_delay_s": res.signal_delay_s,
        "additional_parameters": extra,
    }
    if res.gpus_per_node and task.distributed:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        params["mem"] = _convert_mem(res.mem_gb)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    if res.setup:
        params["setup"] = list(res.setup)
    if dependency:
        params["dependency"] = dependency
        extra["kill-on-invalid-dep"] = "yes"
    return params


def sbatch_script(task: Task, sweep_name: str, dependency: Optional[str] = None) -> str:
    """The exact sbatch script submitit writes for a task (without submitting; works without SLURM)."""
    from submitit.slurm.slurm import SlurmExecutor

    class _DryRunExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # no srun needed to render the script
            return 1

    executor = _DryRunExecutor(folder=task.task_dir / "slurm")
    executor.update_parameters(**slurm_parameters(task, sweep_name, dependency))
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def make_executor(task: Task, sweep_name: str, cluster: str, dependency: Optional[str] = None):
    """A submitit executor for one task: SlurmExecutor, or LocalExecutor (cluster="local", one node, for tests)."""
    import submitit

    folder = task.task_dir / "slurm"
    if cluster == "slurm":
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise SweepError(
                "launcher slurm needs sbatch and srun on this machine (a SLURM login node); use --launcher torchrun "
                "or local, or --submitit-cluster local to run the same job function through submitit locally"
            )
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(task, sweep_name, dependency))
        return executor
    if cluster == "local":
        res = task.resources
        if res.nodes > 1 and task.distributed:
            raise SweepError(f"{task.name}: submitit's local executor runs one node; resources.nodes={res.nodes}")
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(
            timeout_min=res.time_min,
            tasks_per_node=res.processes_per_node if task.distributed else 1,
            gpus_per_node=res.gpus_per_node if task.distributed else 0,
            nodes=1,
            signal_delay_s=res.signal_delay_s,
        )
        return executor
    raise SweepError(f"unknown submitit cluster '{cluster}'; allowed: slurm, local")


class SlurmBackend:
    """The SLURM part of :class:`var_lab.sweeps.launchers.Launcher`."""

    def run_slurm(self, decisions: dict) -> int:
        """Submit one job per task to start, chained with SLURM dependencies; --wait waits for them."""
        from var_lab.sweeps.status import task_state

        job_of: dict[str, str] = {}
        submitted: list[tuple[Task, Any]] = []
        for task in self.plan.tasks:
            state = task_state(task)
            if state.state in ("running", "queued") and state.job_id:
                job_of[task.name] = state.job_id
        for task in self.plan.tasks:
            if not decisions[task.name].start:
                continue
            dependency_ids = []
            blocked = None
            for dep in task.depends:
                dep_task = self.plan.task(dep)
                if dep_task.done_file.exists():
                    continue
                if dep in job_of:
                    dependency_ids.append(job_of[dep])
                elif task.stage != "analyze":
                    blocked = dep
                    break
            if blocked:
                self.out(f"  skip   {task.name}: waits for {blocked}, which is neither finished nor submitted")
                continue
            if (
                task.stage == "analyze"
                and not dependency_ids
                and not any(self.plan.task(d).done_file.exists() for d in task.depends)
            ):
                self.out(f"  skip   {task.name}: nothing finished or submitted to analyze")
                continue
            kind = "afterany" if task.stage == "analyze" else "afterok"
            dependency = f"{kind}:" + ":".join(dependency_ids) if dependency_ids else None
            if self.submitit_cluster == "local" and dependency_ids:
                # the local executor has no dependencies: wait for them here
                for dep_task, dep_job in submitted:
                    if dep_task.name in task.depends:
                        self._wait_job(dep_task, dep_job)
                dependency = None
            claim, holder = Claim.acquire(task.task_dir, owner="slurm")
            if claim is None:
                self.out(f"  skip   {task.name}: claimed by {describe_owner(holder)}")
                continue
            try:
                archive_outcome(task)
                executor = make_executor(task, self.sweep.name, self.submitit_cluster, dependency)
                job = executor.submit(SweepJob(task))
            except Exception:
                claim.release()
                raise
            job_id = str(job.job_id) if self.submitit_cluster == "slurm" else f"local:{job.job_id}"
            if self.submitit_cluster == "local":
                claim.update(owner="submitit-local", job_id=job_id, pid=int(job.job_id), pid_start=None)
            else:
                claim.update(job_id=job_id)
            job_of[task.name] = str(job.job_id)
            record_launch(task.task_dir, launcher="slurm", job_id=job_id, phase="submit", dependency=dependency)
            self.out(f"  submit {task.name}: job {job_id}" + (f" ({dependency})" if dependency else ""))
            submitted.append((task, job))
        if self.wait:
            for task, job in submitted:
                self._wait_job(task, job)
        failed = any(v == "failed" for v in self.outcomes.values())
        return 1 if failed else 0

    def _wait_job(self, task: Task, job: Any) -> str:
        """Wait for a submitted job to end (squeue for SLURM: sacct may be absent); records its outcome."""
        if task.name in self.outcomes:
            return self.outcomes[task.name]
        last = 0.0
        while True:
            if job.paths.result_pickle.exists():
                break
            if self.submitit_cluster == "local":
                if job.done():
                    break
                state = "RUNNING"
            else:
                states = slurm_job_states([str(job.job_id)])
                state = (states or {}).get(str(job.job_id), "gone")
                if states is not None and state not in SLURM_ACTIVE_STATES:
                    break
            if time.time() - last > 60:
                self.out(f"  wait   {task.name}: job {job.job_id} {state}")
                last = time.time()
            time.sleep(2)
        outcome = "finished" if task.done_file.exists() else "interrupted"
        if job.paths.result_pickle.exists():
            try:
                job.result()
            except Exception as exc:  # the job function raised
                outcome = "failed"
                if not task.failed_file.exists():
                    write_atomic(task.failed_file, f"job {job.job_id} failed:\n{exc}\n")
        elif task.failed_file.exists():
            outcome = "failed"
        self.outcomes[task.name] = outcome
        self.out(f"  {outcome:<6} {task.name} (job {job.job_id})")
        return outcome
