"""The MLflow naming contract: the tag, param and metric names that training, evaluation and the analysis share.

Writers (``var_lab.train``, ``var_lab.modules``, ``var_lab.evaluate``, ``analysis.cli``) and readers
(``analysis.runs``, ``var-lab sweep status``) import these names from here, so neither side depends on the other's
code. The README's table lists them (``docs/var_reference.md``).
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------------------- tags
TAG_SWEEP = "var_lab.sweep"
"""The sweep (experiment) a run belongs to."""
TAG_POINT = "var_lab.point"
"""The point key of the run in its sweep (``depth=16``)."""
TAG_KIND = "var_lab.kind"
"""What the run is: one of ``KINDS``."""
TAG_DEPTH = "var_lab.depth"
"""The model depth of a VAR run (also the param ``model.depth``)."""
TAG_SOURCE = "var_lab.source"
"""``release`` for an evaluation of a released checkpoint."""
TAG_GIT_COMMIT = "mlflow.source.git.commit"
"""MLflow's own tag for the code's commit (also the param ``git.commit``), set on every training run."""
TAG_PARENT_RUN = "mlflow.parentRunId"
"""MLflow's own tag of a child run: every run of a launched sweep is a child of the sweep's parent run."""
KINDS = ("tokenizer", "var", "eval", "analysis", "sweep")
"""Values of ``var_lab.kind``: a tokenizer or VAR training run, an evaluation of a released model, a report, and
the parent run of a sweep (its points are its children; the analysis report is logged to it)."""

# ----------------------------------------------------------------------------------------------------------- params
#: params every VAR training run logs (``var_lab.models.VAR.scaling_metadata`` and the training module)
MODEL_PARAMS = (
    "model.depth", "model.width", "model.heads", "model.params_total", "model.params_blocks", "model.params_embed",
    "model.params_adaln", "model.params_head", "model.flops_per_image", "model.patch_nums",
)  # fmt: skip
RUN_PARAMS = ("data.name", "data.resolution", "train.global_batch", "train.epochs", "train.base_lr", "git.commit")

# ---------------------------------------------------------------------------------------------------------- metrics
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/L_mean"
VAL_LOSS_TAIL = "val/L_tail"
VAL_SCALE_PREFIX = "val/L_scale_"
"""``val/L_scale_<k>``: the validation loss of scale k."""
COMPUTE_FLOPS = "compute/flops"
"""Cumulative analytic training FLOPs: steps x global batch x ``model.flops_per_image``."""
COMPUTE_PFLOPS = "compute/pflops"
EVAL_FID = "eval/fid"
EVAL_METRICS = ("eval/fid", "eval/kid", "eval/is", "eval/precision", "eval/recall")
