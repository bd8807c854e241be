"""MLflow's system metrics (CPU, memory, disk, network; NVIDIA GPUs with pynvml) logged through the run's logger.

MLflow's own ``SystemMetricsMonitor`` samples in a thread and writes with its own client, so an unreachable store
loses those points. This callback uses MLflow's collectors (``mlflow.system_metrics.metrics``) and hands their means
to the run's logger every ``every_n_steps`` optimiser steps, at that step, under MLflow's names (``system/...``):
the points take the same way as the losses, spool included. It adds ``system/torch_max_allocated_megabytes`` on CUDA.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch.callbacks import Callback


def mlflow_system_monitors() -> list:
    """MLflow's collectors that work here (psutil needed; the GPU one needs pynvml and a GPU)."""
    try:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    except ImportError as error:  # psutil is missing
        warnings.warn(f"system metrics are off: {error} (pip install psutil)", stacklevel=2)
        return []
    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception:  # noqa: BLE001 - no pynvml, no NVIDIA driver or no GPU: CPU metrics only
        pass
    return monitors


class SystemMetrics(Callback):
    """Log ``system/*`` every ``every_n_steps`` optimiser steps (rank 0, at that step).

    Args:
        every_n_steps: optimiser steps between two samples (>= 1).
    """

    def __init__(self, every_n_steps: int):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._monitors: list = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank == 0 and trainer.logger is not None:
            self._monitors = mlflow_system_monitors()

    def sample(self) -> dict[str, float]:
        """One sample of every collector, under MLflow's ``system/`` names."""
        values: dict[str, float] = {}
        for monitor in self._monitors:
            try:
                monitor.collect_metrics()
                values.update({f"system/{k}": float(v) for k, v in monitor.aggregate_metrics().items()})
            except Exception:  # noqa: BLE001 - a collector that fails now (a vanished disk) does not stop training
                pass
            finally:
                monitor.clear_metrics()
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            values["system/torch_max_allocated_megabytes"] = torch.cuda.max_memory_allocated() / 1e6
        return values

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._monitors or step == 0 or step % self.every_n_steps:
            return
        values = self.sample()
        if values:
            trainer.logger.log_metrics(values, step=step - 1)  # Lightning's label of the step that just ended
