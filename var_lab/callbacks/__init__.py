"""Lightning callbacks of var-lab: ``FIDCallback`` (small-N FID every K epochs during training, off by default)."""

from var_lab.callbacks.fid import FIDCallback

__all__ = ["FIDCallback"]
