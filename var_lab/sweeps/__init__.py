"""Sweeps: declarative grids of runs (depth and any config key), launched on SLURM, with torchrun or locally.

``schema`` reads and validates sweep files, ``expand`` turns one into tasks with their configs, ``launchers`` runs
them (idempotently, one owner per task), ``status`` reports where each stands, ``cli`` is ``var-lab sweep``.
"""

from var_lab.sweeps.schema import Sweep, SweepError, load_sweep

__all__ = ["Sweep", "SweepError", "load_sweep"]
