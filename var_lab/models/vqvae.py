"""The multi-scale VQVAE tokenizer (the release's ``VQVAE``; state dict keys match ``vae_ch160v4096z32.pth``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from var_lab.models.quant import MultiScaleQuantizer
from var_lab.models.vae_blocks import Decoder, Encoder

if TYPE_CHECKING:
    from var_lab.config import TokenizerModelConfig


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale residual quantizer -> post_quant_conv -> decoder.

    Args:
        vocab_size: codebook size V.
        z_channels: latent channels Cvae.
        ch: base channels of encoder and decoder.
        ch_mult: channel multiplier per level; downsampling is 2 ** (len(ch_mult) - 1).
        num_res_blocks: residual blocks per encoder level (decoder: one more).
        dropout: dropout inside residual blocks.
        beta: commitment weight.
        quant_resi: phi mixing ratio.
        share_quant_resi: phi sharing mode (0: per scale, 1: shared, n: n convs).
        patch_nums: scale sides, smallest first; the last equals the latent side.
        using_sa: attention at the lowest resolution level.
        using_mid_sa: attention in the middle block.
        default_qresi_counts: phi count when ``share_quant_resi = 0`` (0: one per scale).
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        using_sa: bool = True,
        using_mid_sa: bool = True,
        default_qresi_counts: int = 0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.ch_mult = tuple(ch_mult)
        self.downsample = 2 ** (len(ch_mult) - 1)
        arch = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            in_channels=3,
            z_channels=z_channels,
            using_sa=using_sa,
            using_mid_sa=using_mid_sa,
        )
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleQuantizer(
            vocab_size=vocab_size,
            channels=z_channels,
            patch_nums=tuple(patch_nums),
            beta=beta,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
            default_qresi_counts=default_qresi_counts,
        )
        self.quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=3, stride=1, padding=1)

    @classmethod
    def from_config(cls, config: TokenizerModelConfig) -> VQVAE:
        """An untrained tokenizer of the architecture in ``config`` (its fields are this constructor's arguments)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    @property
    def resolution(self) -> int:
        """Image side that this tokenizer's scales correspond to."""
        return self.patch_nums[-1] * self.downsample

    @property
    def num_tokens(self) -> int:
        """L: tokens per image over all scales."""
        return sum(p * p for p in self.patch_nums)

    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> continuous latent (B, Cvae, H/16, W/16)."""
        return self.quant_conv(self.encoder(img_B3HW))

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct for training.

        Args:
            img_B3HW: images in [-1, 1].

        Returns:
            rec_B3HW (unclamped), vq_loss (scalar), hits_SV (code hits per scale on this process).
        """
        f_hat_BChw, vq_loss, hits_SV = self.quantize(self.encode(img_B3HW))
        rec_B3HW = self.decoder(self.post_quant_conv(f_hat_BChw))
        return rec_B3HW, vq_loss, hits_SV

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Latent (B, Cvae, h, w) -> image (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> token indices per scale, a list of LongTensor (B, p * p)."""
        return self.quantize.f_to_idx(self.encode(img_B3HW))

    def idx_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Token indices of every scale -> image (B, 3, H, W) in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Token indices of every scale -> the transformer's teacher-forcing input (B, L - 1, Cvae)."""
        return self.quantize.idx_to_var_input(idx_list)
