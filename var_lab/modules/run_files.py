"""What both training modules log at the start of a fit besides their params: the resolved ``config.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from var_lab.atomic import write_atomic
from var_lab.config import to_dict

CONFIG_FILENAME = "config.yaml"


def log_run_config(module: Any) -> None:
    """Log ``<output_dir>/config.yaml`` (the resolved config the run was started with) as an artifact of the run.

    Rank 0 only, and only with a logger that takes artifacts (the resilient MLflow logger spools it while the store
    is down). A resumed run logs it again: the artifact is the config of the latest start. The command line writes
    the file before training; a fit started from Python gets it written here, as the command would.
    """
    logger = module.logger
    if module.global_rank != 0 or logger is None or not hasattr(logger, "log_artifact"):
        return
    path = Path(module.cfg.output_dir) / CONFIG_FILENAME
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, yaml.safe_dump(to_dict(module.cfg), sort_keys=False))
    logger.log_artifact(path)
