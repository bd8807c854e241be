"""The local launcher (and the process runner torchrun shares): each task a child process in its own session on this
machine, stages in order, runs one per free GPU set (or one after another on CPU), evals after their run.

A child writes its log file itself (``<task_dir>/logs/``; the launcher follows the file to the console), so a child
never depends on the launcher: killed, the launcher leaves its trainer running, and the trainer's folder lock
(``var_lab.run_lock``) keeps any later launch from starting a second one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from var_lab.atomic import write_atomic
from var_lab.run_lock import describe as describe_trainer
from var_lab.run_lock import trainer_holding
from var_lab.sweeps.claims import (
    CANCELLED_NAME,
    Claim,
    archive_outcome,
    describe_owner,
    now_iso,
    process_start_time,
    record_launch,
    resume_argument,
    write_outcome,
)
from var_lab.sweeps.decisions import Decision
from var_lab.sweeps.expand import Task
from var_lab.sweeps.torchrun import free_port, torchrun_command


def var_lab_command(argv: list[str]) -> list[str]:
    """The same entry point as ``var-lab``, with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "var_lab.cli", *argv]


def shell_join(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


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


def _with_argv(task: Task, argv: list) -> Task:

    return dataclasses.replace(task, argv=argv)


class ProcessBackend:
    """Running tasks as child processes: the local and torchrun part of :class:`var_lab.sweeps.launchers.Launcher`."""

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
        decision: Decision = decisions[task.name]
        if not decision.start:
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
            outcome = self._execute(task, claim, gpus, decision.text)
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
