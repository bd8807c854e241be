"""Validate once more at the last training step, so every run ends with a validation loss at its final step."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class FinalValidation(Callback):
    """Run the validation loop after the last optimiser step unless the schedule has just done so.

    Step-based validation (``val_check_interval: 50``) leaves the last steps of a run unvalidated when ``max_steps``
    is not a multiple of the interval, and an epoch that ends on ``max_steps`` is not validated at all when
    ``check_val_every_n_epoch`` is None. The scaling fits read the final ``val/*`` metrics, so they must describe the
    final weights. Lightning validates when ``trainer.should_stop`` is raised on a batch; we raise it on the last one.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.limit_val_batches == 0 or trainer.sanity_checking:
            return
        # global_step counts optimiser steps, so with gradient accumulation this fires on the last real step.
        last_step = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and last_epoch
        if last_step or last_batch:
            trainer.should_stop = True
