"""The release's learning-rate and weight-decay schedules, as pure functions of the step."""

from __future__ import annotations

import math


def release_lr_ratio(step: int, warmup_steps: int, total_steps: int, start_ratio: float, final_ratio: float) -> float:
    """Fraction of the peak learning rate at ``step`` (the release's ``lin0`` schedule).

    Linear warm-up from ``start_ratio`` over ``warmup_steps``; then the peak is held for the first 5% of the remaining
    steps and decays linearly to ``final_ratio`` at the last step.
    """
    if step < warmup_steps:
        return start_ratio + (1 - start_ratio) * step / warmup_steps
    span = max(total_steps - 1 - warmup_steps, 1)
    passed = min((step - warmup_steps) / span, 1.0)
    hold = 0.05
    if passed < hold:
        return 1.0
    return final_ratio + (1 - final_ratio) * (1 - passed) / (1 - hold)


def release_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Weight decay at ``step``: cosine from ``start`` to ``end`` over the whole run."""
    passed = min(step / max(total_steps - 1, 1), 1.0)
    return end + (start - end) * (0.5 + 0.5 * math.cos(math.pi * passed))


#: parameter names that never get weight decay (the release's list), besides every 1-d parameter
NO_WEIGHT_DECAY = ("pos_1LC", "pos_start", "lvl_embed", "ada_gss", "scale_mul")
