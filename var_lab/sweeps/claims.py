"""Task folders: who owns a task (the claim), what was started (launch records) and how it ended (DONE / FAILED).

- **One owner per task.** Before starting a task a launcher creates ``<task_dir>/.claim`` with ``O_CREAT | O_EXCL``
  (JSON: owner, host, pid and process start time, or the SLURM job id). A second ``launch`` finds the claim and skips
  the task while its owner is alive: the pid on this host, the SLURM job per ``squeue``, or the trainer that holds the
  run folder (``var_lab.run_lock``: a trainer outlives a killed launcher). A claim whose owner is gone is stale and is
  broken under a second short-lived lock (``.claim.break``) after re-reading it, so two launchers cannot both break and
  re-take it.
- **Records.** Every start appends a line to ``<task_dir>/launches.jsonl`` (time, launcher, host, pid / process group
  or SLURM job id, command); ``cancel`` and ``status`` read them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from var_lab.atomic import write_atomic
from var_lab.run_lock import trainer_holding
from var_lab.sweeps.expand import Task

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
