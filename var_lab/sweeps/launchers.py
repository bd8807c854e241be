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
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from var_lab.atomic import write_atomic
from var_lab.sweeps.claims import (  # noqa: F401 - re-exported: the launchers' public names  # noqa: F401 - re-exported
    CANCELLED_NAME,
    CLAIM_NAME,
    SLURM_ACTIVE_STATES,
    Claim,
    claim_owner_alive,
    describe_owner,
    hostname,
    newest_hpc_checkpoint,
    now_iso,
    process_alive,
    read_claim,
    read_records,
    record_launch,
    release_claim,
    resume_argument,
    run_has_progress,
    slurm_job_states,
)
from var_lab.sweeps.decisions import Decision, Why, decide
from var_lab.sweeps.expand import Plan, Task, config_yaml, non_default_items
from var_lab.sweeps.local import ProcessBackend, shell_join, visible_gpus
from var_lab.sweeps.schema import SweepError, flatten, is_placeholder
from var_lab.sweeps.slurm import (  # noqa: F401 - re-exported
    SlurmBackend,
    SweepJob,
    hand_preemption_to_lightning,
    sbatch_script,
    slurm_parameters,
)
from var_lab.sweeps.torchrun import TorchrunBackend, torchrun_command


class Launcher(ProcessBackend, TorchrunBackend, SlurmBackend):
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

    def decide(self) -> dict[str, Decision]:
        """For every task: start or skip, and why (``var_lab.sweeps.decisions``)."""
        return decide(self.plan, self.mode)

    def missing_files(self, decisions: dict) -> list[SweepError]:
        """Paths the starting tasks need that are placeholders or missing (checked at launch, not at expand)."""
        problems: list[SweepError] = []
        starting = [t for t in self.plan.tasks if decisions[t.name].start]
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
        starting = [t for t in self.plan.tasks if decisions[t.name].start]
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
        anything = any(d.start for d in decisions.values())
        if self.node_rank == 0 and anything:
            self.prepare_tracking()
            self.write_configs(decisions)
        self.out(f"sweep {self.sweep.name}: {len(self.plan.runs)} runs, launcher {self.launcher}, mode {self.mode}")
        for task in self.plan.tasks:
            if not decisions[task.name].start:
                self.out(f"  skip   {task.name}: {decisions[task.name].text}")
        left_failed = any(d.why is Why.FAILED_WAITS for d in decisions.values())
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
        from var_lab.tracking import ensure_store, get_or_create_sweep_run

        ensure_store(self.plan.tracking_uri)
        # The sweep's parent run: every point's run becomes its child, and the analysis report is logged to it.
        points = ", ".join(t.point or t.name for t in self.plan.tasks if t.stage == "run")
        note = f"var-lab sweep `{self.sweep.name}` ({self.sweep.source}): {points}"
        get_or_create_sweep_run(self.plan.tracking_uri, self.plan.experiment, self.sweep.name, note)

    def write_configs(self, decisions: dict) -> None:
        """Write config.yaml of the fits about to start; refuse to change a started run's config."""
        for task in self.plan.tasks:
            if task.config is None or not decisions[task.name].start:
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

    def print_dry_run(self, decisions: dict) -> None:
        out = self.out
        out(f"# sweep {self.sweep.name} ({self.sweep.source}): launcher {self.launcher}, mode {self.mode}")
        out(f"# tracking {self.plan.tracking_uri}  experiment {self.plan.experiment}")
        for task in self.plan.tasks:
            decision = decisions[task.name]
            out("")
            out(f"## {task.name} [{task.stage}]: {decision.action} ({decision.text})")
            if not decision.start:
                continue
            if task.config is not None:
                out(f"# {task.config_path} (non-default keys):")
                for key, value in non_default_items(task.config, "run" if task.stage == "run" else "tokenizer"):
                    out(f"#   {key}: {value!r}")
            if self.launcher == "slurm":
                deps = [d for d in task.depends if d in decisions and decisions[d].start]
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


def _same_value(a: Any, b: Any) -> bool:
    """Config values equal up to list/tuple and int/float representation."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


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
