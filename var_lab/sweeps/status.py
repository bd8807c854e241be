"""``var-lab sweep status``: the state of every task, read from the run folders, the claims, SLURM and MLflow.

States, in order of precedence:

- ``finished``: ``DONE`` is there.
- ``outdated``: a stage the launcher marks DONE (tokenize, eval, analyze) whose inputs finished again after it;
  ``launch`` runs it again.
- ``running`` / ``queued``: the run's trainer holds its folder (``var_lab.run_lock``), or a live owner holds the claim
  (a process on this host, or a SLURM job that ``squeue`` lists; ``queued`` while SLURM has it pending).
- ``cancelled``: stopped by ``var-lab sweep cancel`` (or a signal to the launcher); ``launch`` resumes it.
- ``failed``: ``FAILED`` holds the error; ``resume`` retries it.
- ``interrupted``: started (checkpoints, an MLflow run or launch records) but neither running nor ended; ``launch``
  resumes it.
- ``pending``: never started.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from var_lab.contract import TAG_POINT, TAG_SWEEP
from var_lab.run_lock import describe as describe_trainer
from var_lab.run_lock import trainer_holding
from var_lab.sweeps.claims import (
    CANCELLED_NAME,
    CLAIM_NAME,
    claim_owner_alive,
    describe_owner,
    read_claim,
    run_has_progress,
    slurm_job_states,
)
from var_lab.sweeps.expand import Plan, Task

#: metrics shown per run: (column, MLflow key)
METRIC_COLUMNS = (
    ("train_loss", "train/loss"),
    ("val_L_mean", "val/L_mean"),
    ("pflops", "compute/pflops"),
    ("fid", "eval/fid"),
)


@dataclass
class TaskState:
    """Where a task stands (without MLflow)."""

    state: str
    owner: str = ""
    job_id: Optional[str] = None
    error: Optional[str] = None
    done: dict = field(default_factory=dict)


def task_state(task: Task, slurm_states: Optional[dict] = None) -> TaskState:
    """The state of one task from its folder, its claim and (for SLURM claims) squeue."""
    task_dir = task.task_dir
    done: dict = {}
    if task.done_file.exists():
        try:
            done = json.loads(task.done_file.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            done = {}
        if not task.writes_done and is_outdated(task):
            return TaskState("outdated")
        return TaskState("finished", done=done if isinstance(done, dict) else {})
    trainer = trainer_holding(task_dir) if task.writes_done else None
    claim = read_claim(task_dir)
    if trainer is not None:  # its trainer is alive, whatever became of the launcher that started it
        job_id = claim.get("job_id") if claim else None  # a SLURM job keeps its id while its trainer runs
        return TaskState(
            "running", owner=f"trainer {describe_trainer(trainer)}", job_id=str(job_id) if job_id else None
        )
    if claim is not None and claim_owner_alive(claim, task_dir / CLAIM_NAME, slurm_states):
        job_id = claim.get("job_id")
        state = "running"
        if claim.get("owner") == "slurm" and job_id:
            states = slurm_states if slurm_states is not None else slurm_job_states([job_id])
            if states and states.get(str(job_id).split("_")[0]) in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
                state = "queued"
        return TaskState(state, owner=describe_owner(claim), job_id=str(job_id) if job_id else None)
    if (task_dir / CANCELLED_NAME).exists():
        return TaskState("cancelled", error=_first_line(task_dir / CANCELLED_NAME))
    if task.failed_file.exists():
        return TaskState("failed", error=_error_summary(task.failed_file))
    if run_has_progress(task_dir) or (task_dir / "launches.jsonl").exists():
        return TaskState("interrupted")
    return TaskState("pending")


def is_outdated(task: Task) -> bool:
    """Whether a dependency finished after the task's DONE was written."""
    try:
        mine = task.done_file.stat().st_mtime
    except FileNotFoundError:
        return False
    for path in task.depends_done:
        try:
            if path.stat().st_mtime > mine:
                return True
        except FileNotFoundError:
            continue
    return False


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[0] if lines else ""


def _error_summary(path: Path) -> str:
    """The most telling line of a FAILED file: its first line (the lead writes 'Type: message' there), or, in one the
    launcher wrote ('var-lab fit ended with exit code 2' and the log's tail), the command's own error line (a command
    refusing bad input writes nothing itself)."""
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and re.match(r"var-lab \S+ ended with ", lines[0]):
        errors = [line for line in lines[1:] if re.match(r"var-lab [\w-]+: (error|failed): ", line)]
        if errors:
            return errors[-1][:300]
    return lines[0][:300] if lines else "failed (no message)"


def _mlflow_runs(plan: Plan) -> dict[str, Any]:
    """MLflow runs of the sweep by point key (the id in the run folder wins over the tags)."""
    uri = plan.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return {}  # nothing logged yet; reading would create an empty database
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(plan.experiment)
    found: dict[str, Any] = {}
    if experiment is not None:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_SWEEP}` = '{plan.sweep.name}'",
            max_results=10000,
            order_by=["attributes.start_time ASC"],
        )
        for run in runs:
            point = run.data.tags.get(TAG_POINT)
            if point:
                found[point] = run  # the latest started wins
    for task in plan.tasks:
        if task.stage not in ("run", "tokenizer"):
            continue
        key = task.point or task.name
        run_id_file = task.task_dir / "mlflow_run_id"
        if run_id_file.exists():
            run_id = run_id_file.read_text().strip()
            if run_id and (key not in found or found[key].info.run_id != run_id):
                try:
                    found[key] = client.get_run(run_id)
                except mlflow.exceptions.MlflowException:
                    pass
    return found


def _metrics_of(run: Any) -> dict[str, Any]:
    """Latest value and step of the status metrics of an MLflow run."""
    out: dict[str, Any] = {
        "mlflow_run_id": run.info.run_id,
        "mlflow_experiment_id": run.info.experiment_id,
        "mlflow_status": run.info.status,
    }
    latest: dict[str, tuple[int, float]] = {}
    for metric in getattr(run.data, "_metric_objs", []):
        previous = latest.get(metric.key)
        if previous is None or metric.step >= previous[0]:
            latest[metric.key] = (metric.step, metric.value)
    if not latest:
        latest = {k: (-1, v) for k, v in run.data.metrics.items()}
    step = max((s for s, _ in latest.values()), default=None)
    out["step"] = step if step is not None and step >= 0 else None
    for column, key in METRIC_COLUMNS:
        out[column] = latest[key][1] if key in latest else None
    return out


def collect_status(plan: Plan, use_mlflow: bool = True) -> list[dict]:
    """One row per task: name, stage, state, step, metrics, owner / job, error.

    Args:
        plan: the expanded sweep.
        use_mlflow: read step and metrics from the tracking store (off: folders only).
    """
    job_ids = []
    for task in plan.tasks:
        claim = read_claim(task.task_dir)
        if claim and claim.get("owner") == "slurm" and claim.get("job_id"):
            job_ids.append(str(claim["job_id"]))
    slurm_states = slurm_job_states(job_ids) if job_ids else {}
    runs = _mlflow_runs(plan) if use_mlflow else {}
    rows = []
    for task in plan.tasks:
        state = task_state(task, slurm_states)
        row: dict[str, Any] = {
            "task": task.name,
            "stage": task.stage,
            "state": state.state,
            "owner": state.owner,
            "job_id": state.job_id,
            "error": state.error,
            "step": None,
            **{column: None for column, _ in METRIC_COLUMNS},
        }
        run = runs.get(task.point or task.name) if task.stage in ("run", "tokenizer") else None
        if run is not None:
            row.update(_metrics_of(run))
        if state.done:
            row["step"] = state.done.get("global_step", row["step"])
            metrics = state.done.get("metrics", {})
            for column, key in METRIC_COLUMNS:
                if row[column] is None and key in metrics:
                    row[column] = metrics[key]
        if task.stage == "run":
            for ev in plan.evals_of(task):
                ev_state = task_state(ev, slurm_states)
                row["eval"] = ev_state.state
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def format_status(rows: list[dict], plan: Plan) -> str:
    """A text table of :func:`collect_status` rows, errors of failed tasks below it."""
    headers = ["task", "state", "step", "train/loss", "val/L_mean", "PFLOPs", "FID", "eval", "where"]
    table = []
    for row in rows:
        if row["stage"] == "eval":
            continue  # shown in the eval column of its run
        where = row["job_id"] and f"job {row['job_id']}" or row["owner"] or ""
        table.append(
            [
                row["task"],
                row["state"],
                _fmt(row["step"]),
                _fmt(row["train_loss"]),
                _fmt(row["val_L_mean"]),
                _fmt(row["pflops"]),
                _fmt(row["fid"]),
                row.get("eval", "") or "",
                where,
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]
    lines = [
        f"sweep {plan.sweep.name}: {plan.sweep_dir}",
        f"tracking {plan.tracking_uri} (experiment {plan.experiment})",
        "",
        "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    counts: dict[str, int] = {}
    for row in rows:
        if row["stage"] == "run":
            counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines.append("")
    lines.append("runs: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    tracked = [r for r in rows if r["stage"] != "eval" and r.get("mlflow_run_id")]
    if tracked:
        from var_lab.tracking import mlflow_ui, run_page

        _, command = mlflow_ui(plan.tracking_uri)
        lines += ["", "MLflow runs" + (f" (serve them with `{command}`):" if command else ":")]
        width = max(len(r["task"]) for r in tracked)
        for row in tracked:
            page = run_page(plan.tracking_uri, row.get("mlflow_experiment_id"), row["mlflow_run_id"])
            lines.append(f"  {row['task'].ljust(width)}  {page}")
    failed = [r for r in rows if r["state"] == "failed"]
    if failed:
        lines.append("")
        lines.append("errors:")
        for row in failed:
            task = plan.task(row["task"])
            lines.append(f"  {row['task']}: {row['error']}")
            lines.append(f"    (full text: {task.failed_file})")
    return "\n".join(lines)


def extra_run_dirs(plan: Plan) -> list[Path]:
    """Run folders under the sweep folder that this expansion does not name (e.g. from a launch with --patch)."""
    if not plan.sweep_dir.is_dir():
        return []
    known = {t.task_dir for t in plan.tasks}
    return sorted(p for p in plan.sweep_dir.iterdir() if p.is_dir() and p not in known and (p / "config.yaml").exists())


def status_json(rows: list[dict], plan: Plan) -> str:
    """Machine-readable status."""
    return json.dumps(
        {
            "sweep": plan.sweep.name,
            "sweep_dir": str(plan.sweep_dir),
            "tracking_uri": plan.tracking_uri,
            "experiment": plan.experiment,
            "tasks": rows,
            "extra_run_dirs": [str(p) for p in extra_run_dirs(plan)],
        },
        indent=2,
        default=str,
    )


__all__ = ["TaskState", "collect_status", "format_status", "status_json", "task_state"]
