"""Text progress for logs: one line every N optimiser steps where stdout is not a terminal (SLURM, sweep logs).

A progress bar in a log file is a carriage-return soup, or nothing. Here a line is printed instead, e.g.::

    var-lab fit: step 1200/5000 (24%)  loss 3.412  val/L_mean 3.387  1,840 img/s  elapsed 0:06:31  ETA 0:20:39

with the MLflow run's address when training starts and ends. Rank 0 prints; the numbers are the ones the run logs.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any, Optional, TextIO

from lightning.pytorch.callbacks import Callback


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _value(metrics: dict, name: str) -> Optional[float]:
    value = metrics.get(name)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class TextProgress(Callback):
    """Print a progress line every ``every_n_steps`` optimiser steps, and the MLflow run at start and end.

    Args:
        every_n_steps: optimiser steps between two lines (>= 1).
        prefix: what each line starts with (the command).
        stream: where the lines go (default: stdout, flushed at every line).
    """

    def __init__(self, every_n_steps: int, prefix: str = "var-lab fit", stream: Optional[TextIO] = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.stream = stream
        self._start: Optional[float] = None
        self._start_step = 0

    def _print(self, trainer: Any, text: str) -> None:
        if trainer.global_rank == 0:
            print(f"{self.prefix}: {text}", file=self.stream or sys.stdout, flush=True)

    def _run_line(self, trainer: Any, when: str) -> None:
        logger = trainer.logger
        run_id = getattr(logger, "run_id", None) if logger is not None else None
        if not run_id:
            return
        from var_lab.tracking import run_address

        uri = getattr(logger, "_tracking_uri", None) or ""
        experiment_id = getattr(logger, "experiment_id", None)
        self._print(trainer, f"MLflow run {run_id} ({when}): {run_address(uri, experiment_id, run_id)}")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.monotonic()
        self._start_step = trainer.global_step  # a resumed run's rate counts its own steps only
        self._run_line(trainer, "training starts")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or self._start is None:
            return
        total = int(trainer.estimated_stepping_batches) if trainer.estimated_stepping_batches != float("inf") else 0
        elapsed = time.monotonic() - self._start
        done_here = step - self._start_step
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        metrics = trainer.callback_metrics
        for name, label in (("train/loss", "loss"), ("val/L_mean", "val/L_mean")):
            value = _value(metrics, name)
            if value is not None:
                parts.append(f"{label} {value:.4g}")
        images_per_s = _value(metrics, "perf/images_per_s")
        if images_per_s is not None:
            parts.append(f"{images_per_s:,.0f} img/s")
        parts.append(f"elapsed {_hms(elapsed)}")
        if total and done_here > 0:
            parts.append(f"ETA {_hms(elapsed / done_here * (total - step))}")
        self._print(trainer, "  ".join(parts))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._start is not None:
            self._print(
                trainer, f"training ended at step {trainer.global_step} after {_hms(time.monotonic() - self._start)}"
            )
        self._run_line(trainer, "training ended")
