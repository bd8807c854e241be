"""LightningModule that trains the multi-scale VQVAE tokenizer, and tokenizer loading helpers.

Losses: L1 + L2 reconstruction, VQ + commitment, optional LPIPS perceptual loss (local weights only, never a
download), optional patch discriminator (hinge loss) with the adaptive weight of taming-transformers. Logged:
``train/loss``, ``train/rec_l1``, ``train/rec_l2``, ``train/vq``, ``train/usage_scale_<k>`` (codebook usage in %, the
release's EMA measure), ``train/dead_codes_restarted``, ``val/psnr``, ``val/ssim``, ``val/rec_l1``,
``val/usage_scale_<k>`` (% of the codebook hit on the validation set at scale k), ``val/psnr_scale_<k>`` (PSNR of the
reconstruction from scales 0..k) and a reconstruction grid.

Codebook collapse (a handful of codes used, the rest never selected and so never trained) is cured by dead-code
restarts: every ``dead_code_restart_every`` steps, codes hit less than ``dead_code_threshold`` of a uniform share move
onto residual vectors of the current batch. Measured on the demo's Fashion-MNIST tokenizer (docs/tokenizer.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from var_lab.config import FitTokenizerConfig, from_dict, to_dict
from var_lab.models.checkpoints import load_tokenizer, load_tokenizer_checkpoint  # noqa: F401 - re-exported
from var_lab.models.vqvae import VQVAE
from var_lab.modules.run_files import log_run_config
from var_lab.modules.schedules import release_lr_ratio
from var_lab.resilience import restore_rng_states, rng_states

#: an untrained VQVAE of a given architecture (kept under its old name)
build_vqvae = VQVAE.from_config


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming-transformers) with GroupNorm instead of BatchNorm (DDP friendly)."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            nxt = channels * min(2**i, 8)
            mods += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        mods += [nn.Conv2d(ch, ch, 4, 1, 1, bias=False), nn.GroupNorm(8, ch), nn.LeakyReLU(0.2)]
        mods += [nn.Conv2d(ch, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(img_B3HW)


def make_lpips(weights_dir: Optional[str]) -> nn.Module:
    """torchmetrics LPIPS (VGG) from local weights; a clear error instead of a download when they are absent."""
    if not weights_dir:
        raise ValueError(
            "loss.perceptual_weight > 0 needs loss.lpips_weights: a TORCH_HOME-style folder holding "
            "hub/checkpoints/vgg16-397923af.pth (torchvision's VGG16 weights); var-lab never downloads weights"
        )
    vgg = Path(weights_dir) / "hub" / "checkpoints" / "vgg16-397923af.pth"
    if not vgg.is_file():
        raise FileNotFoundError(
            f"LPIPS backbone weights not found: {vgg}. Copy torchvision's vgg16-397923af.pth there "
            "(from a machine with internet: torchvision.models.vgg16(weights='IMAGENET1K_V1'))."
        )
    import os

    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    os.environ["TORCH_HOME"] = str(weights_dir)
    return LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=False).eval().requires_grad_(False)


class TokenizerModule(L.LightningModule):
    """Train the VQVAE (manual optimisation so that the optional discriminator gets its own step)."""

    def __init__(self, config: Union[FitTokenizerConfig, dict]):
        super().__init__()
        cfg = config if isinstance(config, FitTokenizerConfig) else from_dict(FitTokenizerConfig, config)
        self.cfg = cfg
        self.save_hyperparameters({"config": to_dict(cfg)})
        self.automatic_optimization = False
        self.vqvae = build_vqvae(cfg.tokenizer)
        self.lpips = make_lpips(cfg.loss.lpips_weights) if cfg.loss.perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator() if cfg.loss.disc_weight > 0 else None
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)

    def on_fit_start(self) -> None:
        if self.logger is not None and self.global_rank == 0:
            from var_lab.provenance import git_commit

            t = self.cfg.tokenizer
            params = {
                "tokenizer.vocab_size": t.vocab_size,
                "tokenizer.z_channels": t.z_channels,
                "tokenizer.ch": t.ch,
                "tokenizer.ch_mult": ",".join(map(str, t.ch_mult)),
                "tokenizer.params_total": sum(p.numel() for p in self.vqvae.parameters()),
                "model.patch_nums": ",".join(map(str, t.patch_nums)),
                "data.name": self.cfg.data.name,
                "data.resolution": self.cfg.data.resolution,
                "train.global_batch": self.cfg.data.batch_size * self.trainer.world_size,
                "train.epochs": self.cfg.trainer.max_epochs,
                "train.lr": self.cfg.lr,
                "git.commit": git_commit(),
            }
            for logger in self.loggers:  # MLflow, and any trainer.logger beside it
                logger.log_hyperparams(params)
        log_run_config(self)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.vqvae.parameters(), lr=self.cfg.lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay
        )
        optimizers = [opt]
        if self.discriminator is not None:
            optimizers.append(
                torch.optim.AdamW(self.discriminator.parameters(), lr=self.cfg.lr, betas=tuple(self.cfg.betas))
            )
        if self.cfg.final_lr_ratio == 1.0:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def ratio(step: int) -> float:
            return release_lr_ratio(step, 0, total, 1.0, self.cfg.final_lr_ratio)

        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, ratio) for o in optimizers]
        return optimizers, schedulers

    def _reconstruction_losses(self, img: torch.Tensor, rec: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"rec_l1": F.l1_loss(rec, img), "rec_l2": F.mse_loss(rec, img)}
        if self.lpips is not None:
            out["perceptual"] = self.lpips(rec.clamp(-1, 1), img)
        return out

    def _adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        last = self.vqvae.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def training_step(self, batch, batch_idx: int) -> None:
        img, _ = batch
        lc = self.cfg.loss
        optimizers = self.optimizers()
        opt = optimizers[0] if isinstance(optimizers, list) else optimizers
        rec, vq_loss, hits_SV = self.vqvae(img)
        parts = self._reconstruction_losses(img, rec)
        rec_loss = lc.l1_weight * parts["rec_l1"] + lc.l2_weight * parts["rec_l2"]
        if "perceptual" in parts:
            rec_loss = rec_loss + lc.perceptual_weight * parts["perceptual"]
        loss = rec_loss + lc.vq_weight * vq_loss
        use_disc = self.discriminator is not None and self.global_step >= lc.disc_start_step
        if use_disc:
            g_loss = -self.discriminator(rec).mean()
            weight = self._adaptive_weight(rec_loss, g_loss)
            loss = loss + lc.disc_weight * weight * g_loss
            self.log("train/disc_adaptive_weight", weight, batch_size=img.shape[0])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite tokenizer loss ({loss.item()}) at step {self.global_step}")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        for scheduler in self._schedulers():
            scheduler.step()
        if use_disc:
            opt_d = optimizers[1]
            real = self.discriminator(img)
            fake = self.discriminator(rec.detach())
            d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/disc_loss", d_loss, batch_size=img.shape[0])
        with torch.no_grad():
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(hits_SV)
            self.vqvae.quantize.update_usage(hits_SV)
            every = self.cfg.dead_code_restart_every
            if every > 0 and (self.global_step + 1) % every == 0:
                self._restart_dead_codes(img)
        B = img.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/vq", vq_loss, batch_size=B)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=B)
        vectors = float(hits_SV[-1].sum())
        for k, usage in enumerate(self.vqvae.quantize.usage_percent(vectors)):
            self.log(f"train/usage_scale_{k}", usage, batch_size=B)

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return schedulers if isinstance(schedulers, list) else [schedulers]

    @torch.no_grad()
    def _restart_dead_codes(self, img_B3HW: torch.Tensor) -> None:
        """Move dead codes onto shuffled residual vectors of this batch (rank 0's, broadcast: codebooks stay equal)."""
        quantizer = self.vqvae.quantize
        dead_V = quantizer.dead_codes(self.cfg.dead_code_threshold)  # same on every rank: hits were all-reduced
        n_dead = int(dead_V.sum())
        if n_dead:
            rows_NC = quantizer.residual_vectors(self.vqvae.encode(img_B3HW))
            rows_NC = rows_NC[torch.randperm(rows_NC.shape[0], device=rows_NC.device)[:n_dead]].contiguous()
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(rows_NC, src=0)  # every rank has at least as many rows: the same batch shape
            quantizer.restart_codes(dead_V, rows_NC)
        self.log("train/dead_codes_restarted", float(n_dead), batch_size=img_B3HW.shape[0])

    def on_validation_epoch_start(self) -> None:
        quantizer = self.vqvae.quantize
        self._val_hits_SV = torch.zeros(quantizer.num_scales, quantizer.vocab_size, device=self.device)
        self._val_sq_err_S = torch.zeros(quantizer.num_scales, device=self.device, dtype=torch.float64)
        self._val_pixels = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch, batch_idx: int) -> None:
        img, _ = batch
        rec, vq_loss, hits_SV = self.vqvae(img)
        rec = rec.clamp(-1, 1)
        self.val_psnr(rec, img)
        self.val_ssim(rec, img)
        self._val_hits_SV += hits_SV
        # reconstruction from the first k + 1 scales' tokens: how much each scale adds
        idx_list = self.vqvae.img_to_idx(img)
        for k in range(len(idx_list)):
            rec_k = self.vqvae.idx_to_img(idx_list[: k + 1])
            self._val_sq_err_S[k] += (rec_k.double() - img.double()).square().sum()
        self._val_pixels += img.numel()
        B = img.shape[0]
        self.log("val/rec_l1", F.l1_loss(rec, img), batch_size=B, sync_dist=True, prog_bar=True)
        self.log("val/vq", vq_loss, batch_size=B, sync_dist=True)
        self.log("val/psnr", self.val_psnr, batch_size=B)
        self.log("val/ssim", self.val_ssim, batch_size=B)
        if batch_idx == 0 and self.global_rank == 0 and not self.trainer.sanity_checking:
            self._save_grid(img[:8], rec[:8])

    def on_validation_epoch_end(self) -> None:
        """``val/usage_scale_<k>``: % of the codebook hit at least once on the validation set at scale k;
        ``val/psnr_scale_<k>``: PSNR (dB, images in [-1, 1]) of the reconstruction from scales 0..k."""
        hits_SV, sq_err_S, pixels = self._val_hits_SV, self._val_sq_err_S, self._val_pixels
        if dist.is_available() and dist.is_initialized():
            for t in (hits_SV, sq_err_S, pixels):
                dist.all_reduce(t)
        if float(pixels) == 0:
            return
        usage_S = (hits_SV > 0).float().mean(1) * 100
        psnr_S = 10 * torch.log10(4.0 / (sq_err_S / pixels))  # data range 2
        for k in range(len(usage_S)):
            self.log(f"val/usage_scale_{k}", float(usage_S[k]), rank_zero_only=True)
            self.log(f"val/psnr_scale_{k}", float(psnr_S[k]), rank_zero_only=True)

    def _save_grid(self, img: torch.Tensor, rec: torch.Tensor) -> None:
        from torchvision.utils import save_image

        out_dir = Path(self.cfg.output_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"reconstruction_step{self.global_step:07d}.png"
        save_image(torch.cat([img, rec]).add(1).mul(0.5), path, nrow=img.shape[0])
        logger = self.logger
        if logger is not None and hasattr(logger, "log_image"):
            try:
                logger.log_image(path, key="reconstructions", step=self.global_step)  # spooled while the store is down
            except Exception as exc:  # noqa: BLE001 - artifacts never stop training
                self.print(f"warning: could not log {path} to MLflow: {exc}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        run_id = None
        try:
            run_id = getattr(self.logger, "run_id", None) if self.logger is not None else None
        except Exception:  # noqa: BLE001
            pass
        checkpoint["var_lab"] = {"kind": "tokenizer", "mlflow_run_id": run_id, "rng_states": rng_states()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoint.get("var_lab", {}).get("rng_states")

    def on_train_start(self) -> None:
        # The random generators continue where the checkpoint left them (var_lab.resilience), before the first batch
        # after a resume (on_train_epoch_start is skipped when a run resumes mid-epoch).
        if getattr(self, "_resume_rng", None) is not None:
            restore_rng_states(self._resume_rng)
            self._resume_rng = None
