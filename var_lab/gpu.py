"""One-line errors on the GPU path: a GPU asked for where CUDA is absent, and out of GPU memory (what to lower)."""

from __future__ import annotations

from typing import Optional

from var_lab.inputs import BadInputError

#: what to lower when a command runs out of GPU memory
OOM_FIX = {
    "fit": "lower --data.batch_size (keep the global batch with --trainer.accumulate_grad_batches) or set "
    "--trainer.activation_checkpointing true",
    "fit-tokenizer": "lower --data.batch_size (keep the global batch with --trainer.accumulate_grad_batches)",
    "eval": "lower --batch-size (images per sampling batch) or --feature-batch-size (images per Inception pass)",
}


def require_cuda(requested: Optional[str], option: str) -> None:
    """Refuse a GPU request (``gpu``, ``cuda``, ``cuda:N``) when PyTorch sees no CUDA device.

    Raises:
        BadInputError: naming the option, why CUDA is missing and what to pass instead.
    """
    import torch

    if not requested or str(requested).split(":")[0].lower() not in ("gpu", "cuda"):
        return
    if torch.cuda.is_available():
        return
    why = (
        f"this PyTorch ({torch.__version__}) was built without CUDA"
        if torch.version.cuda is None
        else f"PyTorch {torch.__version__} sees no CUDA device (no GPU, or no driver)"
    )
    raise BadInputError(f"{option} {requested} asks for a GPU, but {why}: run it on a GPU machine or pass {option} cpu")


def out_of_memory_message(command: str, error: BaseException) -> Optional[str]:
    """The one-line message for a CUDA out-of-memory ``error`` of ``var-lab COMMAND``; None for other errors."""
    import torch

    if not isinstance(error, torch.OutOfMemoryError):
        return None
    where = "the GPU"
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(index) / 2**30
        where = f"{torch.cuda.get_device_name(index)} ({total:.0f} GiB; {peak:.1f} GiB was allocated at the peak)"
    fix = OOM_FIX.get(command, "lower the batch size")
    return f"var-lab {command}: out of GPU memory on {where}: {fix}"
