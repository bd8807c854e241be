"""The torchrun launcher: ``torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d ... -m var_lab.cli <command>``
per task; on several nodes, node 0 runs the claims and stages and every other node joins the runs in order."""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from var_lab.sweeps.expand import Task


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


class TorchrunBackend:
    """The torchrun part of :class:`var_lab.sweeps.launchers.Launcher` (its options and the follower nodes)."""

    def _torchrun_options(self) -> dict:
        spec = self.sweep.torchrun
        return {"rdzv_backend": spec.rdzv_backend, "max_restarts": spec.max_restarts}

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
