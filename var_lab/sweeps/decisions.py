"""What a launch does with each task: start it or skip it, and why (an enum, never text read back)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from var_lab.sweeps.expand import Plan
from var_lab.sweeps.status import task_state


class Why(enum.Enum):
    """Why a task starts or is skipped; the value is the text a launch prints."""

    FINISHED = "finished"
    RUNNING = "running"
    QUEUED = "queued"
    FAILED_WAITS = "failed (retry with `var-lab sweep resume`)"
    PENDING_WAITS = "pending (start it with `var-lab sweep launch`)"
    RETRY_FAILED = "retry failed"
    RESUME_INTERRUPTED = "resume interrupted"
    RESUME_CANCELLED = "resume cancelled"
    OUTDATED = "outdated: its inputs finished again"
    NEW = "new"
    AFTER = "after"


#: the reasons that start a task
STARTS = frozenset({Why.RETRY_FAILED, Why.RESUME_INTERRUPTED, Why.RESUME_CANCELLED, Why.OUTDATED, Why.NEW, Why.AFTER})


@dataclass(frozen=True)
class Decision:
    """Start or skip a task, and why.

    Attributes:
        why: the reason.
        detail: the owner (running, queued) or the dependency (after).
    """

    why: Why
    detail: str = ""

    @property
    def start(self) -> bool:
        return self.why in STARTS

    @property
    def action(self) -> str:
        """``start`` or ``skip``."""
        return "start" if self.start else "skip"

    @property
    def text(self) -> str:
        if self.why in (Why.RUNNING, Why.QUEUED):
            return f"{self.why.value} ({self.detail})"
        if self.why is Why.AFTER:
            return f"after {self.detail}"
        return self.why.value


def decide(plan: Plan, mode: str) -> dict[str, Decision]:
    """For every task of ``plan``: start or skip it in a ``launch`` or a ``resume`` (``mode``).

    ``launch`` starts pending and unfinished tasks and retries failed stages (tokenizer, tokenize, eval, analyze) but
    leaves failed training runs alone; ``resume`` retries failed and unfinished ones and starts no new run.
    """
    decisions: dict[str, Decision] = {}
    for task in plan.tasks:
        state = task_state(task)
        name = state.state
        if name == "finished":
            decision = Decision(Why.FINISHED)
        elif name in ("running", "queued"):
            decision = Decision(Why.RUNNING if name == "running" else Why.QUEUED, state.owner)
        elif name == "failed":
            # A stage (tokenizer, tokenize, eval, analyze) is derived from its inputs: running the sweep again is how
            # a fixed stage gets its retry. A failed training run waits for `resume`: it may have diverged.
            retry = mode == "resume" or task.stage != "run"
            decision = Decision(Why.RETRY_FAILED if retry else Why.FAILED_WAITS)
        elif name == "interrupted":
            decision = Decision(Why.RESUME_INTERRUPTED)
        elif name == "cancelled":
            decision = Decision(Why.RESUME_CANCELLED)
        elif name == "outdated":
            decision = Decision(Why.OUTDATED)
        else:  # pending
            decision = Decision(Why.PENDING_WAITS if mode == "resume" and task.stage == "run" else Why.NEW)
        decisions[task.name] = decision
    # a stage after tasks that start now (eval after its run, analyze after all) runs again after them
    for task in plan.tasks:
        current = decisions[task.name]
        if task.writes_done or current.start or current.why in (Why.RUNNING, Why.QUEUED):
            continue
        starting = [d for d in task.depends if d in decisions and decisions[d].start]
        if starting:
            decisions[task.name] = Decision(Why.AFTER, starting[0] + (" and more" if len(starting) > 1 else ""))
    return decisions
