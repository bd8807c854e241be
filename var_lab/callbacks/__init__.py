"""Lightning callbacks of var-lab: ``FIDCallback`` (small-N FID every K epochs during training, off by default) and
``FinalValidation`` (every run ends with a validation of its final weights)."""

from var_lab.callbacks.fid import FIDCallback
from var_lab.callbacks.final_validation import FinalValidation

__all__ = ["FIDCallback", "FinalValidation"]
