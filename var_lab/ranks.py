"""The one rank / process-group helper: which process this is, and the default process group when one is needed.

Launchers say the rank in the environment (torchrun: ``RANK``; SLURM: ``SLURM_PROCID``; Lightning's own DDP
children: ``LOCAL_RANK``); an initialised ``torch.distributed`` group says it for collectives. Commands that spread
over processes themselves (eval, tokenize) start the group from torchrun's environment with :func:`init_from_env`.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

#: environment variables naming this process's global rank, in order of precedence
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 when nothing says otherwise)."""
    for key in RANK_VARIABLES:
        if key in os.environ:
            return int(os.environ[key])
    return 0


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """A barrier over the default process group, when there is one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_from_env(backend: str, timeout: Optional[datetime.timedelta] = None) -> bool:
    """Start the default process group from torchrun's environment when ``WORLD_SIZE`` > 1 and none exists.

    Returns:
        True when this call started it (the caller destroys it at the end).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if backend == "nccl":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout or datetime.timedelta(minutes=30))
    return True
