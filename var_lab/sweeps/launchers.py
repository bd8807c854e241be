"""Launchers: run a sweep's tasks on SLURM (submitit), with torchrun, or on the local machine.

Shared rules:

- **Idempotent.** A task whose folder holds ``DONE`` is skipped; an unfinished one is started again and the training
  resumes from its checkpoints (``resume: auto``) into the same MLflow run (``mlflow_run_id`` in the run folder).
  ``launch`` starts pending and unfinished tasks and retries failed stages (tokenizer, tokenize, eval, analyze) but
  leaves failed training runs alone; ``resume`` retries failed and unfinished ones and starts no new run.
- **One owner per task.** Before starting a task the launcher creates ``<task_dir>/.claim`` with ``O_CREAT | O_EXCL``
  (JSON: owner, host, pid and process start time, or the SLURM job id). A second ``launch`` finds the claim and skips
  the task while its owner is alive: the pid on this host, or the SLURM job per ``squeue``. A claim whose owner is
  gone is stale and is broken under a second short-lived lock (``.claim.break``) after re-reading it, so two launchers
  cannot both break and re-take it.
- **Records.** Every start appends a line to ``<task_dir>/launches.jsonl`` (time, launcher, host, pid / process group
  or SLURM job id, command); ``cancel`` and ``status`` read them. Output goes to ``<task_dir>/logs/``.
- **Preemption** (SLURM): Lightning's auto-requeue owns it; see ``var_lab.sweeps.schema`` and :class:`SweepJob`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from var_lab.atomic import write_atomic
from var_lab.run_lock import describe as describe_trainer
from var_lab.run_lock import trainer_holding
from var_lab.sweeps.expand import Plan, Task, config_yaml, non_default_items
from var_lab.sweeps.schema import SweepError, flatten, is_placeholder

CLAIM_NAME = ".claim"
RECORDS_NAME = "launches.jsonl"
CANCELLED_NAME = "CANCELLED"
#: SLURM job states in which a job still owns its task
SLURM_ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "CONFIGURING",
    "COMPLETING",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
}


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def hostname() -> str:
    return socket.gethostname()


# ------------------------------------------------------------------------------------------------ processes and jobs


def process_start_time(pid: int) -> Optional[int]:
    """Start time of a process in clock ticks since boot (field 22 of /proc/<pid>/stat), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its closing parenthesis
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_alive(pid: Optional[int], start_time: Optional[int] = None) -> bool:
    """Whether ``pid`` runs on this host and is the same process (same start time, so a reused pid is not it)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    current = process_start_time(pid)
    if current is None:
        return False
    if start_time is not None and current != start_time:
        return False
    # a zombie is not alive
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def slurm_job_states(job_ids: list[str]) -> Optional[dict[str, str]]:
    """State of each SLURM job per ``squeue`` (jobs it no longer lists are absent); None when squeue is unusable."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    ids = sorted({str(j).split("_")[0] for j in job_ids})
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # squeue refuses the whole list when it has forgotten one id ("Invalid job id"): ask one by one
        if "Invalid job id" not in proc.stderr:
            return None
        if len(ids) == 1:
            return {}
        states: dict[str, str] = {}
        for job_id in ids:
            states.update(slurm_job_states([job_id]) or {})
        return states
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


# ---------------------------------------------------------------------------------------------------------- claims


def read_claim(task_dir: Path) -> Optional[dict]:
    """The claim of a task folder, {} for an unreadable (being written) one, None when there is none."""
    path = task_dir / CLAIM_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {}
    except json.JSONDecodeError:
        return {}


def claim_owner_alive(info: dict, path: Optional[Path] = None, slurm_states: Optional[dict] = None) -> bool:
    """Whether the owner of a claim still owns its task.

    A claim whose task folder is held by a live trainer (``var_lab.run_lock``) is alive, whoever wrote it. An
    unreadable claim younger than a minute is being written (alive). A SLURM claim is alive while ``squeue``
    lists its job in an active state (and when squeue cannot be asked at all); a process claim on this host while the
    process lives; a process claim from another host always (it cannot be checked from here).
    """
    if path is not None and trainer_holding(path.parent) is not None:
        return True  # the launcher may be gone, but the trainer it started still trains in the folder
    if not info:
        if path is not None:
            with contextlib.suppress(OSError):
                return time.time() - path.stat().st_mtime < 60
        return False
    job_id = info.get("job_id")
    if info.get("owner") == "slurm":
        if not job_id:
            # submission in progress
            if info.get("host") == hostname():
                return process_alive(info.get("pid"), info.get("pid_start"))
            return time.time() - info.get("unix_time", 0) < 300
        states = slurm_states if slurm_states is not None else slurm_job_states([job_id])
        if states is None:
            return True
        return states.get(str(job_id).split("_")[0]) in SLURM_ACTIVE_STATES
    if info.get("host") != hostname():
        return True
    return process_alive(info.get("pid"), info.get("pid_start"))


class Claim:
    """An exclusive claim on a task folder (see the module docstring)."""

    def __init__(self, task_dir: Path, info: dict):
        self.task_dir = task_dir
        self.path = task_dir / CLAIM_NAME
        self.info = info

    @classmethod
    def acquire(cls, task_dir: Path, owner: str, **extra: Any) -> tuple[Optional[Claim], Optional[dict]]:
        """Claim ``task_dir`` for this process.

        Returns:
            (claim, None) on success, or (None, the live owner's claim info) when someone else owns the task.
        """
        task_dir.mkdir(parents=True, exist_ok=True)
        path = task_dir / CLAIM_NAME
        info = {
            "owner": owner,
            "host": hostname(),
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
            "time": now_iso(),
            "unix_time": time.time(),
            "token": uuid.uuid4().hex,
            **extra,
        }
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = read_claim(task_dir)
                if current is None:
                    continue  # released meanwhile
                if claim_owner_alive(current, path):
                    return None, current
                if not _break_stale_claim(task_dir, current):
                    return None, current
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
            return cls(task_dir, info), None
        return None, read_claim(task_dir) or {}

    def update(self, **extra: Any) -> None:
        """Add fields (e.g. the SLURM job id or the child's pid) to the claim, atomically."""
        self.info.update(extra)
        write_atomic(self.path, json.dumps(self.info))

    def release(self) -> None:
        """Remove the claim if it is still ours."""
        release_claim(self.task_dir, self.info.get("token"))


def release_claim(task_dir: Path, token: Optional[str] = None, job_id: Optional[str] = None) -> bool:
    """Remove a task's claim when it carries ``token`` (or ``job_id``); returns whether it was removed."""
    current = read_claim(task_dir)
    if not current:
        return False
    if token is not None and current.get("token") != token:
        return False
    if job_id is not None and str(current.get("job_id")) != str(job_id):
        return False
    with contextlib.suppress(FileNotFoundError):
        (task_dir / CLAIM_NAME).unlink()
    return True


def _break_stale_claim(task_dir: Path, seen: dict) -> bool:
    """Remove a stale claim under ``.claim.break``; False when another process is breaking it right now."""
    breaker = task_dir / (CLAIM_NAME + ".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - breaker.stat().st_mtime > 60:
                breaker.unlink()  # its owner died while breaking
        return False
    os.close(fd)
    try:
        current = read_claim(task_dir)
        # only remove the very claim we judged stale (another launcher may have replaced it meanwhile)
        if current is not None and current.get("token") == seen.get("token"):
            with contextlib.suppress(FileNotFoundError):
                (task_dir / CLAIM_NAME).unlink()
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            breaker.unlink()


# --------------------------------------------------------------------------------------------------------- records


def record_launch(task_dir: Path, **info: Any) -> None:
    """Append one line to the task's launches.jsonl (O_APPEND keeps concurrent lines whole)."""
    task_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": now_iso(), "host": hostname(), **info}) + "\n"
    fd = os.open(task_dir / RECORDS_NAME, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_records(task_dir: Path) -> list[dict]:
    path = task_dir / RECORDS_NAME
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def archive_outcome(task: Task) -> None:
    """Before a (re)start: keep an old FAILED as FAILED.<n>, drop CANCELLED and an outdated launcher-written DONE,
    so that status reflects the new attempt."""
    if not task.writes_done:
        with contextlib.suppress(FileNotFoundError):
            task.done_file.unlink()
    if task.failed_file.exists():
        n = 1
        while (task.task_dir / f"FAILED.{n}").exists():
            n += 1
        os.replace(task.failed_file, task.task_dir / f"FAILED.{n}")
    with contextlib.suppress(FileNotFoundError):
        (task.task_dir / CANCELLED_NAME).unlink()


#: exit codes of a run that checkpointed and stopped on SIGTERM (143) or SIGUSR1 (138), or was killed by them
PREEMPTED_EXIT_CODES = (143, 138, -15, -10)


def write_outcome(task: Task, rc: int, log_path: Optional[Path], started: float, extra: Optional[dict] = None) -> str:
    """Write DONE / FAILED after a task's process ended; returns finished | failed | interrupted."""
    if task.writes_done:
        if task.done_file.exists():
            return "finished"
        if rc == 0 or (not task.failed_file.exists() and rc in PREEMPTED_EXIT_CODES):
            # stopped by SIGTERM/SIGUSR1 after writing last.ckpt (exit 128 + signal, no FAILED): resumable
            return "interrupted"
        if not task.failed_file.exists():
            write_atomic(task.failed_file, _failure_text(task, rc, log_path))
        return "failed"
    if rc == 0:
        info = {"time": now_iso(), "seconds": round(time.time() - started, 1), "argv": task.argv, **(extra or {})}
        write_atomic(task.done_file, json.dumps(info, indent=2))
        return "finished"
    write_atomic(task.failed_file, _failure_text(task, rc, log_path))
    return "failed"


def _failure_text(task: Task, rc: int, log_path: Optional[Path]) -> str:
    what = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    text = f"var-lab {task.argv[0]} ended with {what}\n"
    if log_path is not None and log_path.exists():
        tail = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
        tail = [line for line in tail if line.strip()][-40:]
        text += f"\nlast lines of {log_path}:\n" + "\n".join(tail) + "\n"
    return text


# ------------------------------------------------------------------------------------------------- command lines


def var_lab_command(argv: list[str]) -> list[str]:
    """The same entry point as ``var-lab``, with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "var_lab.cli", *argv]


def torchrun_executable() -> list[str]:
    """``torchrun`` next to this interpreter, else ``python -m torch.distributed.run`` (the same program)."""
    candidate = Path(sys.executable).parent / "torchrun"
    if candidate.exists():
        return [str(candidate)]
    return [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    task: Task,
    node_rank: int,
    rdzv_endpoint: str,
    rdzv_backend: str = "c10d",
    max_restarts: int = 0,
    run_id: Optional[str] = None,
) -> list[str]:
    """One node's torchrun command for a task: nnodes x nproc-per-node processes, c10d rendezvous."""
    res = task.resources
    nodes = res.nodes if task.distributed else 1
    nproc = res.processes_per_node if task.distributed else 1
    rdzv_id = run_id or re.sub(r"[^A-Za-z0-9_.-]", "_", f"{task.task_dir.parent.name}-{task.name}")
    return [
        *torchrun_executable(),
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(nproc),
        "--node-rank",
        str(node_rank),
        "--rdzv-backend",
        rdzv_backend,
        "--rdzv-endpoint",
        rdzv_endpoint,
        "--rdzv-id",
        rdzv_id,
        "--max-restarts",
        str(max_restarts),
        "-m",
        "var_lab.cli",
        *task.argv,
    ]


def shell_join(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# -------------------------------------------------------------------------------------------------------- SweepJob


def newest_hpc_checkpoint(task_dir: Path) -> Optional[Path]:
    """Lightning's newest ``hpc_ckpt_<n>.ckpt`` (written on SIGUSR1 before a requeue) in the run folder."""
    found = []
    for folder in (task_dir, task_dir / "checkpoints"):
        for path in folder.glob("hpc_ckpt_*.ckpt"):
            match = re.match(r"hpc_ckpt_(\d+)\.ckpt$", path.name)
            if match:
                found.append((path.stat().st_mtime, int(match.group(1)), path))
    return max(found)[2] if found else None


def resume_argument(task: Task) -> list[str]:
    """``--resume <hpc checkpoint>`` when Lightning's requeue checkpoint is newer than ``last.ckpt``, else nothing."""
    if task.stage not in ("run", "tokenizer"):
        return []
    hpc = newest_hpc_checkpoint(task.task_dir)
    if hpc is None:
        return []
    last = task.task_dir / "checkpoints" / "last.ckpt"
    if last.exists() and last.stat().st_mtime >= hpc.stat().st_mtime:
        return []
    return ["--resume", str(hpc)]


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
        from var_lab.cli import main

        try:
            rc = main(argv)
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


# ----------------------------------------------------------------------------------------------- the launch driver


class Launcher:
    """Runs the tasks of a plan that need running, with one of the launchers.

    Args:
        plan: the expanded sweep.
        launcher: slurm, torchrun or local.
        mode: launch (pending + unfinished) or resume (failed + unfinished).
        out: where progress lines go.
        node_rank: torchrun on several nodes: this node's rank (0 owns claims, stages, eval and analyze).
        rdzv_endpoint: torchrun rendezvous HOST:PORT (required for nodes > 1).
        submitit_cluster: slurm, or local to run the SLURM path through submitit's LocalExecutor.
        wait: SLURM: wait until the submitted jobs end.
        reconfigure: allow a started run's config.yaml to change.
    """

    def __init__(
        self,
        plan: Plan,
        launcher: Optional[str] = None,
        mode: str = "launch",
        out: Callable[[str], None] = print,
        node_rank: int = 0,
        rdzv_endpoint: Optional[str] = None,
        submitit_cluster: str = "slurm",
        wait: bool = False,
        reconfigure: bool = False,
    ):
        self.plan = plan
        self.sweep = plan.sweep
        self.launcher = launcher or plan.sweep.launcher
        self.mode = mode
        self.out = out
        self.node_rank = node_rank
        self.rdzv_endpoint = rdzv_endpoint or plan.sweep.torchrun.rdzv_endpoint
        self.submitit_cluster = submitit_cluster
        self.wait = wait or (self.launcher == "slurm" and submitit_cluster == "local")
        self.reconfigure = reconfigure
        self.outcomes: dict[str, str] = {}
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stopping = False

    # ------------------------------------------------------------------ decisions

    def decide(self) -> dict[str, tuple[str, str]]:
        """For every task: (action, reason) with action start | skip."""
        from var_lab.sweeps.status import task_state

        decisions = {}
        for task in self.plan.tasks:
            state = task_state(task)
            name = state.state
            if name == "finished":
                decisions[task.name] = ("skip", "finished")
            elif name in ("running", "queued"):
                decisions[task.name] = ("skip", f"{name} ({state.owner})")
            elif name == "failed":
                # A stage (tokenizer, tokenize, eval, analyze) is derived from its inputs: running the sweep again is
                # how a fixed stage gets its retry. A failed training run waits for `resume`: it may have diverged.
                if self.mode == "resume" or task.stage != "run":
                    decisions[task.name] = ("start", "retry failed")
                else:
                    decisions[task.name] = ("skip", "failed (retry with `var-lab sweep resume`)")
            elif name in ("interrupted", "cancelled"):
                decisions[task.name] = ("start", f"resume {name}")
            elif name == "outdated":
                decisions[task.name] = ("start", "outdated: its inputs finished again")
            else:  # pending
                if self.mode == "resume" and task.stage == "run":
                    decisions[task.name] = ("skip", "pending (start it with `var-lab sweep launch`)")
                else:
                    decisions[task.name] = ("start", "new")
        # a stage after tasks that start now (eval after its run, analyze after all) runs again after them
        for task in self.plan.tasks:
            if task.writes_done or decisions[task.name][0] == "start":
                continue
            if decisions[task.name][1].startswith(("running", "queued")):
                continue
            starting = [d for d in task.depends if decisions.get(d, ("skip",))[0] == "start"]
            if starting:
                decisions[task.name] = ("start", f"after {starting[0]}" + (" and more" if len(starting) > 1 else ""))
        return decisions

    def missing_files(self, decisions: dict) -> list[SweepError]:
        """Paths the starting tasks need that are placeholders or missing (checked at launch, not at expand)."""
        problems: list[SweepError] = []
        starting = [t for t in self.plan.tasks if decisions[t.name][0] == "start"]
        seen: set = set()

        def report(value: str, key: str, what: str) -> None:
            if (value, key) in seen:
                return
            seen.add((value, key))
            hint = " (a placeholder in the shipped sweep: set it)" if is_placeholder(value) else ""
            problems.append(self.sweep.error(f"{what} '{value}' does not exist{hint}", key))

        stage = self.sweep.tokenizer
        for task in starting:
            if task.config is not None:
                flat = flatten(task.config)
                for dotted, value in flat.items():
                    if not isinstance(value, str) or not is_placeholder(value):
                        continue
                    if dotted == "data.root" and flat.get("data.name") == "tokens":
                        continue  # the runs read the token cache; the tokenize task checks the root
                    if dotted == "tokenizer_ckpt" and stage is not None and stage.checkpoint == value:
                        report(value, "tokenizer.checkpoint", "tokenizer checkpoint")
                    else:
                        report(value, f"base.{dotted}", f"{dotted} of {task.name}")
                ckpt = task.config.get("tokenizer_ckpt")
                if ckpt and stage is not None and stage.checkpoint == ckpt and not Path(ckpt).expanduser().is_file():
                    report(ckpt, "tokenizer.checkpoint", "tokenizer checkpoint")
            else:
                for flag, value in zip(task.argv, task.argv[1:]):
                    if flag.startswith("--") and is_placeholder(value):
                        key = {
                            "--tokenizer-ckpt": "tokenizer.checkpoint",
                            "--reference": "eval.reference",
                        }.get(flag, f"base.{flag[2:]}" if flag.startswith("--data.") else f"{task.stage}.args")
                        report(value, key, f"{flag} of {task.name}")
                if task.stage == "tokenize" and stage is not None and stage.checkpoint:
                    if not Path(stage.checkpoint).expanduser().is_file():
                        report(stage.checkpoint, "tokenizer.checkpoint", "tokenizer checkpoint")
        return problems

    def check_launchable(self, decisions: dict) -> None:
        """Launch-time checks: the launcher can run the resources."""
        starting = [t for t in self.plan.tasks if decisions[t.name][0] == "start"]
        if self.launcher == "local":
            for task in starting:
                if task.distributed and task.resources.nodes > 1:
                    raise self.sweep.error(
                        f"the local launcher runs on one node but {task.name} asks for resources.nodes="
                        f"{task.resources.nodes}; use launcher slurm or torchrun, or --set resources.nodes=1",
                        "launcher",
                    )
            wanted = max((t.resources.gpus_per_node for t in starting if t.distributed), default=0)
            if wanted and len(visible_gpus()) < wanted:
                raise self.sweep.error(
                    f"tasks ask for {wanted} GPUs per node but this machine shows {len(visible_gpus())}; "
                    f"use --set resources.gpus_per_node=0 to train on CPU",
                    "resources.gpus_per_node",
                )
        if self.launcher == "torchrun":
            multi = [t for t in starting if t.distributed and t.resources.nodes > 1]
            if multi and not self.rdzv_endpoint:
                raise self.sweep.error(
                    f"{multi[0].name} spans {multi[0].resources.nodes} nodes: give torchrun.rdzv_endpoint "
                    f"(HOST:PORT of node 0) in the sweep or --rdzv-endpoint",
                    "torchrun.rdzv_endpoint",
                )

    # ------------------------------------------------------------------ entry

    def run(self, dry_run: bool = False) -> int:
        """Start what needs starting; returns 0 when nothing failed."""
        decisions = self.decide()
        problems = self.missing_files(decisions) if self.node_rank == 0 else []
        if dry_run:
            self.print_dry_run(decisions)
            for problem in problems:
                self.out(f"# WARNING: launch will refuse: {problem}")
            return 0
        if problems:
            raise problems[0]
        if self.node_rank == 0:
            self.check_launchable(decisions)
        anything = any(action == "start" for action, _ in decisions.values())
        if self.node_rank == 0 and anything:
            self.prepare_tracking()
            self.write_configs(decisions)
        self.out(f"sweep {self.sweep.name}: {len(self.plan.runs)} runs, launcher {self.launcher}, mode {self.mode}")
        for task in self.plan.tasks:
            action, reason = decisions[task.name]
            if action == "skip":
                self.out(f"  skip   {task.name}: {reason}")
        left_failed = any(a == "skip" and r.startswith("failed") for a, r in decisions.values())
        if not anything and self.node_rank == 0:
            self.out("nothing to start")
            return 1 if left_failed else 0
        if self.launcher == "slurm":
            code = self.run_slurm(decisions)
        else:
            code = self.run_processes(decisions)
        self.print_summary()
        return max(code, int(left_failed))

    def prepare_tracking(self) -> None:
        """Create the tracking store and the experiment before any parallel process touches them."""
        from var_lab.tracking import ensure_store, get_or_create_experiment

        ensure_store(self.plan.tracking_uri)
        get_or_create_experiment(self.plan.tracking_uri, self.plan.experiment)

    def write_configs(self, decisions: dict) -> None:
        """Write config.yaml of the fits about to start; refuse to change a started run's config."""
        for task in self.plan.tasks:
            if task.config is None or decisions[task.name][0] != "start":
                continue
            text = config_yaml(task.config)
            if task.config_path.exists() and not self.reconfigure and run_has_progress(task.task_dir):
                import yaml

                old = flatten(yaml.safe_load(task.config_path.read_text()) or {})
                new = flatten(task.config)
                changed = sorted(k for k in set(old) | set(new) if not _same_value(old.get(k), new.get(k)))
                if changed:
                    detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
                    raise SweepError(
                        f"run {task.name} has started with another config ({detail}); resuming it with the new one "
                        f"would mix two recipes. Restore the sweep, pick another --output-root, or pass --reconfigure",
                        file=str(task.config_path),
                    )
            task.task_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(task.config_path, text)

    # ------------------------------------------------------------------ dry run

    def print_dry_run(self, decisions: dict) -> None:
        out = self.out
        out(f"# sweep {self.sweep.name} ({self.sweep.source}): launcher {self.launcher}, mode {self.mode}")
        out(f"# tracking {self.plan.tracking_uri}  experiment {self.plan.experiment}")
        for task in self.plan.tasks:
            action, reason = decisions[task.name]
            out("")
            out(f"## {task.name} [{task.stage}]: {action} ({reason})")
            if action != "start":
                continue
            if task.config is not None:
                out(f"# {task.config_path} (non-default keys):")
                for key, value in non_default_items(task.config, "run" if task.stage == "run" else "tokenizer"):
                    out(f"#   {key}: {value!r}")
            if self.launcher == "slurm":
                deps = [d for d in task.depends if decisions.get(d, ("skip",))[0] == "start"]
                dependency = "afterok:<job of " + ",".join(deps) + ">" if deps else None
                out(f"# sbatch script ({task.task_dir / 'slurm'}), job function: var-lab {shell_join(task.argv)}")
                out(sbatch_script(task, self.sweep.name, dependency))
            elif self.launcher == "torchrun" and task.distributed:
                endpoint = self.rdzv_endpoint or "127.0.0.1:<free port>"
                nodes = task.resources.nodes
                for rank in range(nodes):
                    prefix = f"# node {rank}: " if nodes > 1 else ""
                    out(prefix + shell_join(torchrun_command(task, rank, endpoint, **self._torchrun_options())))
            else:
                gpus = task.resources.gpus_per_node if task.distributed else 0
                env = f"CUDA_VISIBLE_DEVICES=<{gpus} free GPUs> " if gpus else ""
                out(env + shell_join(self._command(task)))

    def _torchrun_options(self) -> dict:
        spec = self.sweep.torchrun
        return {"rdzv_backend": spec.rdzv_backend, "max_restarts": spec.max_restarts}

    # ------------------------------------------------------------------ local and torchrun

    def run_processes(self, decisions: dict) -> int:
        """Run tasks as child processes: stages in order, runs one per free GPU set (or one after another on CPU)."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread():
            for s in previous:
                signal.signal(s, self._on_stop_signal)
        try:
            if self.node_rank > 0:
                return self._run_follower(decisions)
            before = [t for t in self.plan.tasks if t.stage in ("tokenizer", "tokenize")]
            runs = [t for t in self.plan.tasks if t.stage == "run"]
            after = [t for t in self.plan.tasks if t.stage == "analyze"]
            for task in before:
                self._run_one(task, decisions, gpus=None)
            chain_evals = self.launcher == "local"
            wants_gpus = any(t.resources.gpus_per_node > 0 for t in runs if t.distributed)
            gpus = visible_gpus() if self.launcher == "local" and wants_gpus else []
            parallel = bool(gpus)  # one run per free GPU set; CPU runs go one after another
            if parallel:
                self._run_gpu_pool(runs, decisions, gpus)
            else:
                for run in runs:
                    self._run_one(run, decisions, gpus=None)
                    if chain_evals:
                        for ev in self.plan.evals_of(run):
                            self._run_one(ev, decisions, gpus=None)
            if not chain_evals:
                for run in runs:
                    for ev in self.plan.evals_of(run):
                        self._run_one(ev, decisions, gpus=None)
            for task in after:
                self._run_one(task, decisions, gpus=None)
        finally:
            if threading.current_thread() is threading.main_thread():
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if self._stopping:
            return 130
        return 1 if any(v == "failed" for v in self.outcomes.values()) else 0

    def _run_gpu_pool(self, runs: list, decisions: dict, gpus: list) -> None:
        """Run (fit, then its evals) chains in parallel, each on its own GPUs."""
        free = list(gpus)
        cond = threading.Condition()
        threads = []

        def chain(run: Task, mine: list) -> None:
            try:
                self._run_one(run, decisions, gpus=mine)
                for ev in self.plan.evals_of(run):
                    self._run_one(ev, decisions, gpus=mine[:1])
            finally:
                with cond:
                    free.extend(mine)
                    cond.notify_all()

        for run in runs:
            need = max(1, run.resources.gpus_per_node)
            with cond:
                while len(free) < need and not self._stopping:
                    cond.wait(1.0)
                if self._stopping:
                    break
                mine, free[:] = free[:need], free[need:]
            thread = threading.Thread(target=chain, args=(run, mine), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()

    def _deps_done(self, task: Task) -> Optional[str]:
        """None when every dependency is DONE, else the name of the first that is not."""
        for name in task.depends:
            if not self.plan.task(name).done_file.exists():
                return name
        return None

    def _run_one(self, task: Task, decisions: dict, gpus: Optional[list]) -> Optional[str]:
        """Claim, start, wait, record the outcome of one task on this node (rank 0)."""
        if self._stopping:
            return None
        action, reason = decisions[task.name]
        if action != "start":
            return None
        missing = self._deps_done(task)
        if missing is not None:
            if task.stage == "analyze":
                done = [d for d in task.depends if self.plan.task(d).done_file.exists()]
                if not done:
                    self.out(f"  skip   {task.name}: nothing finished to analyze")
                    return None
            else:
                self.out(f"  skip   {task.name}: waits for {missing}, which is not finished")
                self.outcomes[task.name] = "blocked"
                return None
        claim, holder = Claim.acquire(task.task_dir, owner=self.launcher)
        if claim is None:
            self.out(f"  skip   {task.name}: claimed by {describe_owner(holder)}")
            return None
        try:
            from var_lab.sweeps.status import task_state

            if task_state(task).state == "finished":  # finished meanwhile, or nothing new for a stage to redo
                return "finished"
            trainer = trainer_holding(task.task_dir) if task.writes_done else None
            if trainer is not None:  # a trainer started by a launcher that is gone still trains here
                self.out(f"  skip   {task.name}: running (trainer {describe_trainer(trainer)})")
                return None
            archive_outcome(task)
            outcome = self._execute(task, claim, gpus, reason)
        finally:
            claim.release()
        self.outcomes[task.name] = outcome
        return outcome

    def _command(self, task: Task, node_rank: int = 0) -> list[str]:
        argv_task = task
        extra = resume_argument(task)
        if extra:
            argv_task = _with_argv(task, task.argv + extra)
        if self.launcher == "torchrun" and task.distributed:
            endpoint = self.rdzv_endpoint if task.resources.nodes > 1 else None
            endpoint = endpoint or f"127.0.0.1:{free_port()}"
            return torchrun_command(argv_task, node_rank, endpoint, **self._torchrun_options())
        if task.stage in ("tokenize", "eval") and task.distributed and task.resources.processes_per_node > 1:
            # Lightning starts its own processes for fits; tokenize and eval need torchrun for several GPUs
            return torchrun_command(argv_task, 0, f"127.0.0.1:{free_port()}", **self._torchrun_options())
        return var_lab_command(argv_task.argv)

    def _execute(self, task: Task, claim: Optional[Claim], gpus: Optional[list], reason: str) -> str:
        cmd = self._command(task, self.node_rank)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        elif self.launcher == "local" and not (task.distributed and task.resources.gpus_per_node):
            env.setdefault("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        log_dir = task.task_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_path = log_dir / f"{task.stage}-{stamp}-node{self.node_rank}.log"
        where = f" on GPU {','.join(map(str, gpus))}" if gpus else ""
        self.out(f"  start  {task.name} ({reason}){where}: {shell_join(cmd)}")
        self.out(f"         log {log_path}")
        started = time.time()
        stream = gpus is None  # one task at a time: show its output live
        with open(log_path, "wb") as log:
            # The child writes its log itself (no pipe through this process): a trainer outlives a killed launcher.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self._lock:
                self._children[proc.pid] = proc
            if claim is not None:
                claim.update(child_pid=proc.pid, child_pgid=proc.pid, child_start=process_start_time(proc.pid))
            record_launch(
                task.task_dir,
                launcher=self.launcher,
                pid=proc.pid,
                pgid=proc.pid,
                pid_start=process_start_time(proc.pid),
                launcher_pid=os.getpid(),
                node_rank=self.node_rank,
                argv=cmd,
                phase="start",
            )
            _follow(proc, log_path, sys.stdout.buffer if stream else None)
            rc = proc.wait()
            with self._lock:
                self._children.pop(proc.pid, None)
        if self._stopping or (task.task_dir / CANCELLED_NAME).exists():
            outcome = "cancelled"
            if not (task.task_dir / CANCELLED_NAME).exists():
                write_atomic(task.task_dir / CANCELLED_NAME, f"stopped by a signal to the launcher at {now_iso()}\n")
        elif self.node_rank > 0:
            outcome = "finished" if rc == 0 else "failed"
        else:
            outcome = write_outcome(task, rc, log_path, started)
        record_launch(task.task_dir, launcher=self.launcher, pid=proc.pid, phase="end", rc=rc, outcome=outcome)
        minutes = (time.time() - started) / 60
        self.out(f"  {outcome:<6} {task.name} after {minutes:.1f} min (exit code {rc})")
        if outcome == "failed" and task.failed_file.exists():
            first = task.failed_file.read_text(errors="replace").strip().splitlines()[:1]
            self.out(f"         {first[0] if first else ''}  (full text: {task.failed_file})")
        return outcome

    def _run_follower(self, decisions: dict) -> int:
        """torchrun on node_rank > 0: join every multi-node run in order (no claims, no stages)."""
        failed = False
        for task in self.plan.runs:
            if self._stopping:
                break
            if task.resources.nodes <= self.node_rank:
                continue
            if task.done_file.exists():
                self.out(f"  skip   {task.name}: finished")
                continue
            while (missing := self._deps_done(task)) is not None and not self._stopping:
                self.out(f"  wait   {task.name}: for {missing} (node 0 runs it)")
                time.sleep(10)
            outcome = self._execute(task, None, None, f"node {self.node_rank}")
            failed |= outcome == "failed"
        return 130 if self._stopping else int(failed)

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """SIGINT/SIGTERM to the launcher: stop starting tasks and pass SIGTERM to the running ones."""
        if not self._stopping:
            self.out(f"launcher got signal {signum}: stopping the running tasks (they keep their checkpoints)")
        self._stopping = True
        with self._lock:
            children = list(self._children.values())
        for proc in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)

    # ------------------------------------------------------------------ SLURM

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
            action, reason = decisions[task.name]
            if action != "start":
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

    # ------------------------------------------------------------------ summary

    def print_summary(self) -> None:
        if not self.outcomes:
            return
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        self.out("done: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        analyze = [t for t in self.plan.tasks if t.stage == "analyze"]
        if analyze and analyze[0].done_file.exists():
            self.out(f"report: {analyze[0].argv[analyze[0].argv.index('--out') + 1]}")
        uri = self.plan.tracking_uri
        self.out(f"browse the runs: mlflow ui --backend-store-uri {uri}")


def _with_argv(task: Task, argv: list) -> Task:
    import dataclasses

    return dataclasses.replace(task, argv=argv)


def _same_value(a: Any, b: Any) -> bool:
    """Config values equal up to list/tuple and int/float representation."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def run_has_progress(task_dir: Path) -> bool:
    """Whether a run has started for real: it has an MLflow run or a checkpoint."""
    ckpts = task_dir / "checkpoints"
    return (task_dir / "mlflow_run_id").exists() or (ckpts.is_dir() and any(ckpts.glob("*.ckpt")))


def describe_owner(info: Optional[dict]) -> str:
    if not info:
        return "another launcher (claim being written)"
    if info.get("job_id"):
        return f"{info.get('owner')} job {info['job_id']}"
    return f"{info.get('owner')} pid {info.get('pid')} on {info.get('host')}"


def visible_gpus() -> list[int]:
    """GPUs this launcher may use: CUDA_VISIBLE_DEVICES, else those nvidia-smi lists with little memory in use."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [int(x) for x in env.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    limit = int(os.environ.get("VAR_LAB_GPU_BUSY_MIB", "2048"))
    gpus = []
    for line in proc.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]) < limit:
            gpus.append(int(parts[0]))
    return gpus


def _follow(proc: subprocess.Popen, log_path: Path, console) -> None:
    """Wait for a child, copying what it writes to its log file to the console as it comes (progress bars too)."""
    with open(log_path, "rb") as log:
        while True:
            running = proc.poll() is None
            chunk = log.read(65536)
            if chunk and console is not None:
                with contextlib.suppress(OSError, ValueError):
                    console.write(chunk)
                    console.flush()
            if not chunk:
                if not running:
                    break
                time.sleep(0.2)


# ------------------------------------------------------------------------------------------------------- cancel


def cancel_plan(plan: Plan, out: Callable[[str], None] = print, grace_s: float = 30.0) -> int:
    """Cancel a sweep's SLURM jobs and stop its local / torchrun processes (on this host); marks them CANCELLED."""
    job_ids: dict[str, Task] = {}
    processes: list[tuple[Task, int, Optional[int], bool]] = []  # task, pid, start time, is_group
    launchers: set[tuple[int, Optional[int]]] = set()
    for task in plan.tasks:
        claim = read_claim(task.task_dir)
        if not claim:
            continue
        if claim.get("owner") == "slurm" and claim.get("job_id"):
            job_ids[str(claim["job_id"])] = task
        elif claim.get("host") == hostname():
            if claim.get("child_pgid"):
                processes.append((task, int(claim["child_pgid"]), claim.get("child_start"), True))
            if claim.get("owner") == "submitit-local" and claim.get("pid"):
                processes.append((task, int(claim["pid"]), None, False))
            elif claim.get("pid") and claim.get("pid") != os.getpid():
                launchers.add((int(claim["pid"]), claim.get("pid_start")))
        else:
            out(f"  {task.name}: owned by {describe_owner(claim)} on another host; cancel it there")
    count = 0
    if job_ids:
        states = slurm_job_states(list(job_ids))
        active = [j for j in job_ids if states is None or states.get(j.split("_")[0]) in SLURM_ACTIVE_STATES]
        if active:
            if shutil.which("scancel") is None:
                raise SweepError(f"scancel not found; cancel jobs {' '.join(active)} on the cluster")
            subprocess.run(["scancel", *active], check=False)
            for job_id in active:
                task = job_ids[job_id]
                write_atomic(task.task_dir / CANCELLED_NAME, f"scancel {job_id} at {now_iso()}\n")
                release_claim(task.task_dir, job_id=job_id)
                out(f"  cancelled {task.name}: scancel {job_id}")
                count += 1
    # stop the launchers first so they start nothing new, then the tasks' process groups
    for pid, start in launchers:
        if process_alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
    for task, pid, start, group in processes:
        if not process_alive(pid, start):
            continue
        write_atomic(task.task_dir / CANCELLED_NAME, f"stopped by `var-lab sweep cancel` at {now_iso()}\n")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        out(f"  cancelled {task.name}: SIGTERM to {'process group' if group else 'pid'} {pid}")
        count += 1
    deadline = time.time() + grace_s
    for task, pid, start, group in processes:
        while process_alive(pid, start) and time.time() < deadline:
            time.sleep(0.2)
        if process_alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL) if group else os.kill(pid, signal.SIGKILL)
            out(f"  killed {task.name}: SIGKILL to {pid} after {grace_s:.0f} s")
    for task in plan.tasks:
        claim = read_claim(task.task_dir)
        if claim is not None and not claim_owner_alive(claim, task.task_dir / CLAIM_NAME):
            release_claim(task.task_dir, token=claim.get("token"))
    out(f"cancelled {count} task(s)" if count else "nothing to cancel")
    return 0


__all__ = [
    "Claim",
    "Launcher",
    "SweepJob",
    "cancel_plan",
    "hand_preemption_to_lightning",
    "read_claim",
    "record_launch",
    "release_claim",
    "sbatch_script",
    "slurm_parameters",
    "torchrun_command",
]
