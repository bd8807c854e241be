"""LightningModule that trains a VAR transformer on top of a frozen tokenizer, with the release's recipe.

Logged (names from the MLflow contract): ``train/loss``, ``train/L_mean``, ``train/L_tail``, ``train/acc_mean``,
``train/acc_tail``, ``val/*`` likewise plus ``val/L_scale_<k>``, ``opt/lr``, ``opt/grad_norm``, ``perf/images_per_s``,
``perf/tokens_per_s``, ``compute/flops`` and ``compute/pflops`` (cumulative analytic training FLOPs).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch

from var_lab.config import FitConfig, from_dict, to_dict
from var_lab.data.tokens import split_scales
from var_lab.models.checkpoints import load_tokenizer, load_var_checkpoint  # noqa: F401 - re-exported
from var_lab.models.var import VAR, loss_per_token
from var_lab.models.vqvae import VQVAE
from var_lab.modules.run_files import log_run_config
from var_lab.modules.schedules import NO_WEIGHT_DECAY, release_lr_ratio, release_weight_decay
from var_lab.resilience import FAULT_NAN_AT_STEP_ENV, find_resume_checkpoint, restore_rng_states, rng_states


class VARModule(L.LightningModule):
    """Train ``VAR`` (depth from ``config.model.depth``) with a frozen ``VQVAE``.

    Args:
        config: the run config (a ``FitConfig`` or its dict, as stored in checkpoints).
        vqvae: the frozen tokenizer; None loads ``config.tokenizer_ckpt`` (or builds an untrained one when that is
            None, for tests and shape checks).
    """

    def __init__(self, config: Union[FitConfig, dict], vqvae: Optional[VQVAE] = None):
        super().__init__()
        cfg = config if isinstance(config, FitConfig) else from_dict(FitConfig, config, "checkpoint hyper_parameters")
        self.cfg = cfg
        self.save_hyperparameters({"config": to_dict(cfg)})
        if vqvae is None:
            vqvae = (
                load_tokenizer(cfg.tokenizer_ckpt, cfg.tokenizer)
                if cfg.tokenizer_ckpt
                else VQVAE.from_config(cfg.tokenizer)
            )
        self.vqvae = vqvae.eval().requires_grad_(False)
        self.var = VAR.from_config(cfg.model, self.vqvae, init_adaln_gamma=cfg.optim.alng)
        self.var.activation_checkpointing = cfg.trainer.activation_checkpointing
        self.flops_per_image = self.var.estimate_flops()
        self.scaling_params = self.var.num_scaling_params()
        self.patch_nums = self.var.patch_nums
        self._tail_begin = self.var.begin_ends[-1][0]
        self._step_start_time: Optional[float] = None
        self._compiled = False
        self.sharded = False  # the transformer sharded with FSDP2 (trainer.strategy: fsdp2), see configure_model
        # Preemption safety (var_lab.resilience): what this training step logged, the accounting metrics of the step,
        # and what a resumed run restores before its first batch.
        self._step_metrics: Optional[dict[str, Any]] = None
        self._accounting: Optional[dict[str, float]] = None
        self._resume_rng: Optional[dict[str, Any]] = None
        self._resume_step_metrics: Optional[dict[str, Any]] = None
        self._val_count = 0  # validations so far (sample grids every N of them); checkpointed, so a resume keeps it
        fault = os.environ.get(FAULT_NAN_AT_STEP_ENV, "")
        self._fault_nan_at_step = int(fault) if fault.strip() else None  # test hook, see training_step

    # ------------------------------------------------------------------ bookkeeping
    @property
    def global_batch(self) -> int:
        """Images per optimiser step over all processes."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.cfg.data.batch_size * world * self.cfg.trainer.accumulate_grad_batches

    @property
    def peak_lr(self) -> float:
        """The release's rule lr = base_lr * global_batch / 256, times reference_width / width when that is set."""
        lr = self.cfg.optim.base_lr * self.global_batch / 256
        if self.cfg.optim.reference_width is not None:
            lr *= self.cfg.optim.reference_width / self.var.C
        return lr

    def mlflow_params(self) -> dict[str, Any]:
        """Params of the MLflow contract (var_lab.contract)."""
        from var_lab.provenance import git_commit

        return {
            **self.var.scaling_metadata(),
            "model.vocab_size": self.var.V,
            "model.num_classes": self.var.num_classes,
            "data.name": self.cfg.data.name,
            "data.resolution": self.data_resolution(),
            "train.global_batch": self.global_batch,
            "train.epochs": self.cfg.trainer.max_epochs,
            "train.base_lr": self.cfg.optim.base_lr,
            "train.reference_width": self.cfg.optim.reference_width or "",
            "train.peak_lr": self.peak_lr,
            "train.final_lr_ratio": self.cfg.optim.final_lr_ratio,
            "train.weight_decay": self.cfg.optim.weight_decay,
            "train.final_weight_decay": self.cfg.optim.final_weight_decay,
            "train.alng": self.cfg.optim.alng,
            "train.ema_decay": "" if self.cfg.optim.ema_decay is None else self.cfg.optim.ema_decay,
            "train.label_smoothing": self.cfg.optim.label_smoothing,
            "train.precision": str(self.trainer.precision) if self._trainer is not None else "",
            "train.seed": self.cfg.seed,
            "git.commit": git_commit(),
        }

    def data_resolution(self) -> int:
        """Image side of the training data (a token cache knows it better than the config)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(datamodule, "resolution", self.cfg.data.resolution))

    # ------------------------------------------------------------------ steps
    def configure_model(self) -> None:
        """``trainer.strategy: fsdp2``: shard the transformer with FSDP2, each block a unit (its parameters gathered
        just for its forward and backward) and the embeddings and head the root unit; the frozen tokenizer is kept
        whole on every rank. Other strategies: nothing to do."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self.sharded or self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.var.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.var, mesh=mesh)
        self.sharded = True

    def setup(self, stage: str) -> None:
        if self.cfg.trainer.compile and not self._compiled:
            # Regional compilation: the repeated block's teacher-forcing path is compiled once and shared by every
            # block (no per-block constants: DropPath keeps its rate in a tensor, so dynamo no longer specialises on
            # 16-30 different rates and hits its recompile limit), while the embeddings, the mask and the head run
            # eagerly. On one H200 (d16, batch 64) its bare step is 1.0-1.8% slower than a whole-model compile
            # (334-337 vs 340 images/s) and compiles 2.6x sooner (25 s vs 64 s); sampling stays eager.
            # VAR_LAB_COMPILE_SCOPE=model compiles the whole forward instead (benchmarks only).
            if os.environ.get("VAR_LAB_COMPILE_SCOPE", "block") == "model":
                self.var.compile(dynamic=False)
            else:
                for block in self.var.blocks:
                    block.compile_teacher_forcing(dynamic=False)
            self._compiled = True

    def on_fit_start(self) -> None:
        if self.loggers and self.global_rank == 0:
            params = self.mlflow_params()
            for logger in self.loggers:  # MLflow, and any trainer.logger beside it
                logger.log_hyperparams(params)
        log_run_config(self)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, also remembering what a training step logs (see ``on_save_checkpoint``)."""
        super().log(name, value, *args, **kwargs)
        if self._step_metrics is not None and self._trainer is not None and self.trainer.training:
            # As Lightning stores it (a number becomes a tensor of the default dtype), so a replay logs the same value.
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=torch.get_default_dtype())
            self._step_metrics[name] = value.detach()

    def _tokens_and_input(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images or token ids, labels) -> (target_BL, x_BLCv, labels_B); the tokenizer runs without gradients."""
        data, labels_B = batch
        with torch.no_grad():
            if data.dtype.is_floating_point:
                idx_list = self.vqvae.img_to_idx(data)
            else:
                idx_list = split_scales(data.long(), self.patch_nums)
            x_BLCv = self.vqvae.idx_to_var_input(idx_list)
        target_BL = torch.cat(idx_list, dim=1)
        return target_BL, x_BLCv, labels_B.long()

    def _metrics(
        self, logits_BLV: torch.Tensor, target_BL: torch.Tensor, ce_BL: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        if ce_BL is None:
            ce_BL = loss_per_token(logits_BLV.detach(), target_BL)
        correct_BL = (logits_BLV.detach().argmax(-1) == target_BL).float()
        tail = self._tail_begin
        return {
            "L_mean": ce_BL.mean(),
            "L_tail": ce_BL[:, tail:].mean(),
            "acc_mean": correct_BL.mean(),
            "acc_tail": correct_BL[:, tail:].mean(),
            "ce_BL": ce_BL,
        }

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        target_BL, x_BLCv, labels_B = self._tokens_and_input(batch)
        logits_BLV = self.var(labels_B, x_BLCv)
        smoothing = self.cfg.optim.label_smoothing
        train_ce_BL = loss_per_token(logits_BLV, target_BL, smoothing)
        loss = train_ce_BL.mean()
        if self._fault_nan_at_step == self.global_step:
            loss = loss * float("nan")  # test hook VAR_LAB_FAULT_NAN_AT_STEP: a diverging step, for the tests
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; {self._last_good_checkpoint()}"
            )
        # the metrics are unsmoothed cross-entropies: without smoothing that is the training loss, reused
        metrics = self._metrics(logits_BLV, target_BL, train_ce_BL.detach() if smoothing == 0 else None)
        B = target_BL.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        for name in ("L_mean", "L_tail", "acc_mean", "acc_tail"):
            self.log(f"train/{name}", metrics[name], batch_size=B)
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_metrics, self._accounting = {}, None
        self._apply_schedule()
        self._step_start_time = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        for name, value in self._step_accounting().items():
            self.log(name, value, batch_size=1)

    def _step_accounting(self) -> dict[str, float]:
        """Compute and throughput of the step that just ended (computed once: a checkpoint may need it first)."""
        if self._accounting is None:
            steps_done = self.global_step  # already incremented after the optimiser step
            flops = steps_done * self.global_batch * self.flops_per_image
            self._accounting = {"compute/flops": float(flops), "compute/pflops": flops / 1e15}
            if self._step_start_time is not None:
                elapsed = time.perf_counter() - self._step_start_time
                world = self.trainer.world_size
                images_per_s = self.cfg.data.batch_size * world / max(elapsed, 1e-9)
                self._accounting["perf/images_per_s"] = images_per_s
                self._accounting["perf/tokens_per_s"] = images_per_s * self.var.L
        return self._accounting

    def _last_good_checkpoint(self) -> str:
        ckpt_dir = Path(self.cfg.output_dir).resolve() / "checkpoints"
        found = find_resume_checkpoint(ckpt_dir) if self.global_rank == 0 else None
        if found is None:
            return f"no checkpoint was written before it (folder {ckpt_dir})"
        return f"training stopped; the last good checkpoint {found} is kept"

    def validation_step(self, batch, batch_idx: int) -> None:
        target_BL, x_BLCv, labels_B = self._tokens_and_input(batch)
        logits_BLV = self.var(labels_B, x_BLCv)
        metrics = self._metrics(logits_BLV, target_BL)
        B = target_BL.shape[0]
        for name in ("L_mean", "L_tail", "acc_mean", "acc_tail"):
            self.log(f"val/{name}", metrics[name], batch_size=B, sync_dist=True, prog_bar=name == "L_mean")
        for k, (begin, end) in enumerate(self.var.begin_ends):
            self.log(f"val/L_scale_{k}", metrics["ce_BL"][:, begin:end].mean(), batch_size=B, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        every = self.cfg.tracking.sample_grid_every_n_val
        # A sharded transformer samples on every rank (each block gathers its parameters from all of them); rank 0
        # writes the grid.
        if self.trainer.sanity_checking or every <= 0 or (self.global_rank != 0 and not self.sharded):
            return
        self._val_count += 1
        if (self._val_count - 1) % every == 0:
            self.log_sample_grid()

    @torch.no_grad()
    def log_sample_grid(self, classes: int = 8, per_class: int = 4) -> Optional[Path]:
        """Sample ``classes`` x ``per_class`` images (cfg 1.5, top-k 900, top-p 0.96), save a PNG, log it to MLflow."""
        from torchvision.utils import save_image

        n_cls = min(classes, self.var.num_classes)
        labels_B = torch.arange(n_cls, device=self.device).repeat_interleave(per_class)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        if self.sharded:  # the root unit's parameters (embeddings, head) are used outside var.forward
            self.var.unshard()
        try:
            img_B3HW = self.var.sample(labels_B, cfg=1.5, top_k=900, top_p=0.96, generator=generator)
        finally:
            if self.sharded:
                self.var.reshard()
        if self.global_rank != 0:
            return None
        out_dir = Path(self.cfg.output_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"samples_step{self.global_step:07d}.png"
        save_image(img_B3HW, path, nrow=per_class * 2)
        logger = self.logger
        if logger is not None and hasattr(logger, "log_image"):
            try:
                logger.log_image(path, key="samples", step=self.global_step)  # spooled while the store is down
            except Exception as exc:  # noqa: BLE001 - an artifact must never stop training
                self.print(f"warning: could not log {path} to MLflow: {exc}")
        return path

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.var.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim == 1 or any(key in name for key in NO_WEIGHT_DECAY):
                no_decay.append(p)
            else:
                decay.append(p)
        o = self.cfg.optim
        fused = o.fused if o.fused is not None else torch.cuda.is_available()
        groups = [
            {"params": decay, "weight_decay": o.weight_decay, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.peak_lr, betas=tuple(o.betas), fused=fused)

    def _total_and_warmup_steps(self) -> tuple[int, int]:
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(self.trainer.max_epochs or 1, 1)
        steps_per_epoch = max(total / epochs, 1)  # Lightning's estimate is already capped at max_steps
        warmup_epochs = self.cfg.optim.warmup_epochs
        if warmup_epochs is None:
            warmup_epochs = epochs / 50
        warmup = int(round(warmup_epochs * steps_per_epoch))
        return total, warmup

    def _apply_schedule(self) -> None:
        total, warmup = self._total_and_warmup_steps()
        o = self.cfg.optim
        step = self.global_step
        lr = self.peak_lr * release_lr_ratio(step, warmup, total, o.warmup_start_ratio, o.final_lr_ratio)
        wd = release_weight_decay(step, total, o.weight_decay, o.final_weight_decay)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["weight_decay"] = wd * group.get("wd_scale", 1.0)
        self.log("opt/lr", lr, batch_size=1)
        self.log("opt/weight_decay", wd, batch_size=1)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this after unscaling and before its own clipping (Trainer gradient_clip_val =
        # optim.grad_clip), so this is the norm before clipping, what the release logs.
        grads = [p.grad for p in self.var.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        # A non-finite gradient would write NaN weights into the next checkpoint; fp16's grad scaler skips such steps.
        if str(self.trainer.precision) != "16-mixed" and not torch.isfinite(grad_norm):
            raise FloatingPointError(
                f"non-finite gradient norm ({grad_norm.item()}) at step {self.global_step}; "
                f"{self._last_good_checkpoint()}"
            )
        self.log("opt/grad_norm", grad_norm, batch_size=1)

    # ------------------------------------------------------------------ checkpoint content
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["var_lab"] = {
            "kind": "var",
            "mlflow_run_id": _logger_run_id(self.logger),
            "tracking_uri": getattr(self.logger, "_tracking_uri", None),
            "flops_per_image": self.flops_per_image,
            "scaling_params": self.scaling_params,
            "rng_states": rng_states(),
            "val_count": self._val_count,
        }
        if self._step_metrics and self._trainer is not None:
            # Lightning sends a step's metrics to the logger after the checkpoint callbacks ran: keep them here so
            # that a run killed in between logs them on resume (Lightning's step label is global_step - 1).
            accounting = {name: torch.tensor(value) for name, value in self._step_accounting().items()}
            metrics = {**self._step_metrics, **accounting, "epoch": self.current_epoch}
            checkpoint["var_lab"]["step_metrics"] = {
                "step": self.global_step - 1,
                "metrics": {name: float(value) for name, value in metrics.items()},
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("var_lab", {})
        self._resume_rng = meta.get("rng_states")
        self._resume_step_metrics = meta.get("step_metrics")
        self._val_count = int(meta.get("val_count", 0))

    def on_train_start(self) -> None:
        # Restored here, after Lightning's sanity check and before the first batch is fetched (on_train_epoch_start
        # is skipped when a run resumes mid-epoch); validation and the data loaders never draw from these generators.
        if self._resume_rng is not None:
            restore_rng_states(self._resume_rng)
            self._resume_rng = None
        pending, self._resume_step_metrics = self._resume_step_metrics, None
        from var_lab.tracking import ResilientMLFlowLogger

        if pending and self.global_rank == 0 and isinstance(self.logger, ResilientMLFlowLogger):
            # A no-op when the step was logged before the kill: the logger skips steps its run already has.
            self.logger.log_metrics(pending["metrics"], step=int(pending["step"]))


def _logger_run_id(logger) -> Optional[str]:
    try:
        return getattr(logger, "run_id", None) if logger is not None else None
    except Exception:  # noqa: BLE001 - a logger whose store is down still lets us checkpoint
        return None
